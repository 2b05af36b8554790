"""Micro-benchmark of ``gateway.validation.checks.validate`` over the three examples on the upstream page.

Run ``python bench/validation_bench.py``; prints microseconds per call for each example (best of five
``timeit`` repeats). The budget is 30 µs for a typical body. The last line uses a new image URL on every
call, so ``urllib.parse``'s internal cache of split URLs cannot flatter the media-URL checks.
"""

from __future__ import annotations

import itertools
import timeit
from typing import Any

from gateway.validation.checks import validate

SEEDS: dict[str, dict[str, Any]] = {
    "text-to-video": {
        "model": "kling-v3-std-silent",
        "prompt": (
            "A wide cinematic shot of a traveler walking through dusty desert ruins, "
            "cloak moving in the wind, slow pullback, natural motion."
        ),
        "aspect_ratio": "16:9",
        "duration": 5,
        "extra_body": {"cfg_scale": 0.5, "shot_type": "customize", "negative_prompt": "blur, low detail"},
    },
    "image-to-video": {
        "model": "kling-v3-pro-audio",
        "prompt": (
            "The person writes naturally in a notebook, subtle hand detail, small thoughtful pauses, "
            "soft classroom depth of field."
        ),
        "image": "https://example.com/start-frame.png",
        "aspect_ratio": "16:9",
        "duration": 6,
        "extra_body": {
            "cfg_scale": 0.6,
            "shot_type": "intelligent",
            "negative_prompt": "artifacts, distortion",
        },
    },
    "first-last-frame": {
        "model": "kling-v3-pro-silent",
        "prompt": (
            "The portrait subject slowly turns toward the camera while keeping identity stable and motion natural."
        ),
        "image": "https://example.com/first-frame.png",
        "last_image": "https://example.com/last-frame.png",
        "duration": 8,
    },
}


def _per_call_us(call: Any, number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def main(number: int = 20_000) -> None:
    for name, body in SEEDS.items():
        assert validate(body).valid, name
        print(f"{name:<28} {_per_call_us(lambda body=body: validate(body), number):6.2f} µs per call")
    counter = itertools.count()
    template = SEEDS["first-last-frame"]

    def fresh_urls() -> None:
        n = next(counter)
        body = dict(template, image=f"https://cdn{n}.example.com/a/{n}.png", last_image=f"https://x.org/{n}.png")
        validate(body)

    print(f"{'first-last-frame, new URLs':<28} {_per_call_us(fresh_urls, number):6.2f} µs per call")


if __name__ == "__main__":
    main()
