"""Kling through kling-gateway with httpx (asyncio): submit one of the upstream page's examples, poll to the end.

    KLING_GATEWAY_URL=http://127.0.0.1:8080 KLING_GATEWAY_KEY=gk_... python examples/python_httpx_async.py [MODE]

MODE is text (default), image or first_last. Prints the task id, then the final status (and the video URL).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

import httpx

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


def show_error(response: httpx.Response) -> None:
    """The gateway's JSON error: a message, a stable code, and every problem of an invalid request."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        print(f"HTTP {response.status_code}: {response.text}", file=sys.stderr)
        return
    print(f"HTTP {response.status_code} {error.get('code')}: {error.get('message')}", file=sys.stderr)
    for problem in error.get("errors") or []:
        print(f"  {problem['param']}: {problem['message']} [{problem['code']}]", file=sys.stderr)


async def main(mode: str) -> int:
    base_url = os.environ["KLING_GATEWAY_URL"]
    key = os.environ["KLING_GATEWAY_KEY"]
    interval = float(os.environ.get("KLING_POLL_INTERVAL_S", "2"))
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        # The same Idempotency-Key on a retry returns the first answer instead of making a second video.
        response = await client.post(
            "/v1/video/generations", json=BODIES[mode], headers={"Idempotency-Key": str(uuid.uuid4())}
        )
        if response.is_error:
            show_error(response)
            return 1
        task = response.json()
        task_id = task["task_id"]
        print(f"task_id: {task_id}", flush=True)
        while task["status"] not in ("completed", "failed"):
            await asyncio.sleep(interval)
            response = await client.get(f"/v1/videos/{task_id}")
            if response.status_code in (429, 503):  # busy: wait as long as the gateway asks, then poll again
                await asyncio.sleep(float(response.headers.get("Retry-After", interval)))
                continue
            if response.is_error:
                show_error(response)
                return 1
            task = response.json()
            print(f"  {task['status']} {task.get('progress', 0)}%", file=sys.stderr)
    print(f"status: {task['status']}")
    if task["status"] != "completed":
        return 1
    print(f"video_url: {task['video_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "text")))
