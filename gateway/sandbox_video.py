"""The sandbox's finished videos: deterministic fake MP4 bytes, served with HEAD and single byte ranges.

``sandbox_video(task_id, mp4)`` is the same bytes for the same task every time: the sandbox's small MP4 (``ftyp``
and ``moov`` with the duration) whose empty ``mdat`` box is filled with bytes drawn from SHA-256 of the task id,
big enough (256 KiB) to exercise ranges and streaming;
``video_response`` answers ``GET``/``HEAD`` for it as a file server does (200, 206, 416, ``ETag``).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from starlette.requests import Request
from starlette.responses import Response

from gateway.content.ranges import UNSATISFIABLE, ByteSpan, parse_range, resolve

VIDEO_BYTES: Final = 256 * 1024


_EMPTY_MDAT: Final = struct.pack(">I", 8) + b"mdat"


def sandbox_video(task_id: str, mp4: bytes) -> bytes:
    """``mp4`` (ending in an empty ``mdat`` box) grown to ``VIDEO_BYTES``, deterministic per task."""
    if not mp4.endswith(_EMPTY_MDAT):
        raise ValueError("the MP4 must end with an empty mdat box")
    head = mp4[: -len(_EMPTY_MDAT)]
    payload_size = VIDEO_BYTES - len(head) - 8
    seed = hashlib.sha256(task_id.encode()).digest()
    blocks = bytearray()
    counter = 0
    while len(blocks) < payload_size:
        blocks += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return head + struct.pack(">I", 8 + payload_size) + b"mdat" + bytes(blocks[:payload_size])


def video_response(request: Request, data: bytes) -> Response:
    """``data`` as ``video/mp4`` for GET or HEAD, honouring one byte range."""
    size = len(data)
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": f'"{hashlib.sha256(data).hexdigest()[:32]}"',
        "Content-Type": "video/mp4",
    }
    span = resolve(parse_range(request.headers.get("range")), size)
    if span is UNSATISFIABLE:
        return Response(b"", status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    status, body = 200, data
    if isinstance(span, ByteSpan):
        status, body = 206, data[span.start : span.end + 1]
        headers["Content-Range"] = span.content_range(size)
    headers["Content-Length"] = str(len(body))
    return Response(b"" if request.method == "HEAD" else body, status_code=status, headers=headers)
