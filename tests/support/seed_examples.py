"""The three request bodies of the upstream page (shared/seeds/uniall-kling-video.md), verbatim.

``test_seed_page_unchanged`` re-reads the page when it is present beside the repository, so a change to the
upstream page is noticed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

# The three request bodies of the upstream page (shared/seeds/uniall-kling-video.md), verbatim.
TEXT_TO_VIDEO: dict[str, Any] = {
    "model": "kling-v3-std-silent",
    "prompt": "A wide cinematic shot of a traveler walking through dusty desert ruins, "
    "cloak moving in the wind, slow pullback, natural motion.",
    "aspect_ratio": "16:9",
    "duration": 5,
    "extra_body": {"cfg_scale": 0.5, "shot_type": "customize", "negative_prompt": "blur, low detail"},
}
IMAGE_TO_VIDEO: dict[str, Any] = {
    "model": "kling-v3-pro-audio",
    "prompt": "The person writes naturally in a notebook, subtle hand detail, small thoughtful pauses, "
    "soft classroom depth of field.",
    "image": "https://example.com/start-frame.png",
    "aspect_ratio": "16:9",
    "duration": 6,
    "extra_body": {"cfg_scale": 0.6, "shot_type": "intelligent", "negative_prompt": "artifacts, distortion"},
}
FIRST_LAST_FRAME: dict[str, Any] = {
    "model": "kling-v3-pro-silent",
    "prompt": "The portrait subject slowly turns toward the camera while keeping identity stable and motion natural.",
    "image": "https://example.com/first-frame.png",
    "last_image": "https://example.com/last-frame.png",
    "duration": 8,
}
SEEDS = {"text": TEXT_TO_VIDEO, "image": IMAGE_TO_VIDEO, "first_last": FIRST_LAST_FRAME}

SEED_PAGE = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "uniall-kling-video.md"


def bodies_in_page(text: str) -> list[dict[str, Any]]:
    """The JSON bodies of the page's curl examples (``-d '...'``)."""
    return [orjson.loads(match) for match in re.findall(r"-d '(\{.*?\})'", text, flags=re.DOTALL)]
