"""What a task's status answer says about its video, and the rewrite that points clients at the gateway (pure).

>>> video_state(b'{"status": "completed", "video_url": "https://cdn.example/v.mp4"}')
('completed', 'https://cdn.example/v.mp4')
>>> rewrite_video_url(b'{"status": "completed", "video_url": "x"}', "https://gw.example", "task_1")
b'{"status":"completed","video_url":"https://gw.example/v1/videos/task_1/content"}'
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson


def _parsed(body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def video_state(body: bytes | None) -> tuple[str, str | None]:
    """The task's status (``unknown`` if the answer has none) and its ``video_url`` (None if absent)."""
    parsed = _parsed(body)
    if parsed is None:
        return "unknown", None
    status = parsed.get("status")
    url = parsed.get("video_url")
    return (status if isinstance(status, str) else "unknown"), (url if isinstance(url, str) and url else None)


def content_url(public_url: str, task_id: str) -> str:
    return f"{public_url.rstrip('/')}/v1/videos/{quote(task_id, safe='')}/content"


def rewrite_video_url(body: bytes, public_url: str, task_id: str) -> bytes:
    """``body`` with a completed task's ``video_url`` replaced by the gateway's content URL (else unchanged)."""
    parsed = _parsed(body)
    if parsed is None or parsed.get("status") != "completed" or not isinstance(parsed.get("video_url"), str):
        return body
    parsed["video_url"] = content_url(public_url, task_id)
    return orjson.dumps(parsed)
