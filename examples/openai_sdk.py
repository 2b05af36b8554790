"""Kling through kling-gateway with the official ``openai`` SDK: one of the upstream page's examples, polled to the end.

    KLING_GATEWAY_URL=http://127.0.0.1:8080 KLING_GATEWAY_KEY=gk_... python examples/openai_sdk.py [MODE]

MODE is text (default), image or first_last. The SDK has no method for ``/v1/video/generations``, so the example
uses its generic ``client.post`` / ``client.get``: the base URL, key, retries (429/5xx, honouring ``Retry-After``)
and error types are the SDK's own. Gateway errors surface as ``openai.APIStatusError`` with the gateway's JSON body.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import openai

BODIES: dict[str, dict[str, Any]] = {
    "text": {
        "model": "kling-v3-std-silent",
        "prompt": "A wide cinematic shot of a traveler walking through dusty desert ruins, "
        "cloak moving in the wind, slow pullback, natural motion.",
        "aspect_ratio": "16:9",
        "duration": 5,
        "extra_body": {"cfg_scale": 0.5, "shot_type": "customize", "negative_prompt": "blur, low detail"},
    },
    "image": {
        "model": "kling-v3-pro-audio",
        "prompt": "The person writes naturally in a notebook, subtle hand detail, small thoughtful pauses, "
        "soft classroom depth of field.",
        "image": "https://example.com/start-frame.png",
        "aspect_ratio": "16:9",
        "duration": 6,
        "extra_body": {"cfg_scale": 0.6, "shot_type": "intelligent", "negative_prompt": "artifacts, distortion"},
    },
    "first_last": {
        "model": "kling-v3-pro-silent",
        "prompt": "The portrait subject slowly turns toward the camera "
        "while keeping identity stable and motion natural.",
        "image": "https://example.com/first-frame.png",
        "last_image": "https://example.com/last-frame.png",
        "duration": 8,
    },
}


def main(mode: str) -> int:
    client = openai.OpenAI(
        base_url=os.environ["KLING_GATEWAY_URL"].rstrip("/") + "/v1",
        api_key=os.environ["KLING_GATEWAY_KEY"],
        max_retries=3,
    )
    interval = float(os.environ.get("KLING_POLL_INTERVAL_S", "2"))
    try:
        # cast_to=dict: the parsed JSON as it came. The same Idempotency-Key on the SDK's own retries (and yours)
        # returns the first answer instead of making a second video.
        task = client.post(
            "/video/generations",
            cast_to=dict[str, Any],
            body=BODIES[mode],
            options={"headers": {"Idempotency-Key": str(uuid.uuid4())}},
        )
        task_id = task["task_id"]
        print(f"task_id: {task_id}", flush=True)
        while task["status"] not in ("completed", "failed"):
            time.sleep(interval)
            task = client.get(f"/videos/{task_id}", cast_to=dict[str, Any])
            print(f"  {task['status']} {task.get('progress', 0)}%", file=sys.stderr)
    except openai.APIStatusError as exc:
        error = exc.body if isinstance(exc.body, dict) else {}  # the SDK hands over the "error" object
        print(f"HTTP {exc.status_code} {error.get('code')}: {error.get('message', exc.message)}", file=sys.stderr)
        for problem in error.get("errors") or []:
            print(f"  {problem['param']}: {problem['message']} [{problem['code']}]", file=sys.stderr)
        return 1
    print(f"status: {task['status']}")
    if task["status"] != "completed":
        return 1
    print(f"video_url: {task['video_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "text"))
