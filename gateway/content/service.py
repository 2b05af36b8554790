"""One answer to ``GET|HEAD /v1/videos/{task_id}/content`` for a task the caller owns (SPEC section 10).

Not completed: 409 ``video_not_ready`` (the task's status in the message). ``If-None-Match`` naming the answer's
``ETag`` gets 304. Archived: the copy, with its size and
SHA-256 (the ``ETag``) from the ledger; a copy that cannot be opened falls back to the upstream. Otherwise the
task's ``video_url`` through ``VideoFetcher`` (the account's key only to the upstream's own origin). Single byte
ranges are honoured either way (206, or 416 with ``Content-Range: bytes */size``); an origin that ignores a range is
sliced here. Bytes stream through in chunks; nothing holds a whole video.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.config import ContentSettings
from gateway.content.answer import video_state
from gateway.content.archive_store import ArchiveBackend, ArchiveError
from gateway.content.fetch import Fetched, VideoFetcher, video_unavailable, whole_number
from gateway.content.metrics import ContentMetrics
from gateway.content.origin import KeyForTask
from gateway.content.ranges import UNSATISFIABLE, ByteSpan, RangeSpec, parse_content_range, parse_range, resolve
from gateway.errors import Conflict, GatewayError
from gateway.store.base import ArchiveRecord, Store, TaskRecord

Poll = Callable[[TaskRecord], Awaitable[tuple[int, bytes]]]
"""The task's status answer (status code, body) through the status cache."""

_MEDIA_TYPE: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")
_ETAG: Final = re.compile(r'(W/)?"[\x21\x23-\x7e]{0,128}"')
_DEFAULT_TYPE: Final = "video/mp4"


class RangeNotSatisfiable(GatewayError):
    status = 416
    type = "invalid_request_error"
    default_code = "range_not_satisfiable"


def _unsatisfiable(size: int | None) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(
        "The requested range is outside the video.",
        param="Range",
        headers={"Content-Range": f"bytes */{size}"} if size is not None else {},
    )


def _etags(header: str | None) -> frozenset[str]:
    """The entity tags of an ``If-None-Match`` header, weak prefixes dropped (weak comparison, RFC 9110 13.1.2)."""
    if not header:
        return frozenset()
    return frozenset(tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip())


def _matches(etag: str, if_none_match: frozenset[str]) -> bool:
    return bool(if_none_match) and ("*" in if_none_match or etag.removeprefix("W/") in if_none_match)


def _not_modified(headers: dict[str, str]) -> Response:
    """304: the client's copy is current (only the validator is sent again)."""
    return Response(b"", status_code=304, headers={"ETag": headers["ETag"]})


class ContentService:
    def __init__(
        self,
        settings: ContentSettings,
        fetcher: VideoFetcher,
        archive: ArchiveBackend | None,
        store: Store,
        metrics: ContentMetrics,
        key_for: KeyForTask,
        poll: Poll,
        log: Any,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.archive = archive
        self.store = store
        self.metrics = metrics
        self.key_for = key_for
        self.poll = poll
        self.log = log

    async def serve(self, request: Request, task: TaskRecord) -> Response:
        head = request.method == "HEAD"
        spec = parse_range(request.headers.get("range"))
        self_etags = _etags(request.headers.get("if-none-match"))
        body = task.terminal_body if task.status == "completed" else None
        if body is None:
            code, body = await self.poll(task)
            if not 200 <= code < 300:  # the upstream's own error, as for a status poll
                return Response(body, status_code=code, media_type="application/json")
        status, url = video_state(body)
        if status != "completed":
            raise Conflict(f"The video is not ready: the task is {status}.", code="video_not_ready", param="task_id")
        if self.archive is not None:
            record = await self.store.get_archive(task.task_id)
            if record is not None and record.state == "stored":
                archived = await self.from_archive(self.archive, record, spec, head, self_etags)
                if archived is not None:
                    return archived
        if url is None:
            raise video_unavailable("The task's final answer has no video_url.")
        return await self.from_upstream(task, url, spec, head, self_etags)

    async def from_archive(
        self,
        archive: ArchiveBackend,
        record: ArchiveRecord,
        spec: RangeSpec | None,
        head: bool,
        if_none_match: frozenset[str],
    ) -> Response | None:
        """The archived copy, or None when it cannot be opened (the upstream is asked instead)."""
        if record.key is None or record.size is None:
            return None
        size = record.size
        span = resolve(spec, size)
        if span is UNSATISFIABLE:
            raise _unsatisfiable(size)
        headers = {"Accept-Ranges": "bytes", "Content-Type": _DEFAULT_TYPE, "ETag": f'"{record.sha256}"'}
        if _matches(headers["ETag"], if_none_match):
            return _not_modified(headers)
        status, start, end = 200, 0, size - 1
        if isinstance(span, ByteSpan):
            status, start, end = 206, span.start, span.end
            headers["Content-Range"] = span.content_range(size)
        headers["Content-Length"] = str(max(0, end - start + 1))
        if head or size == 0:
            return Response(b"", status_code=status, headers=headers)
        chunks = archive.read(record.key, start, end)
        try:
            first = await anext(chunks)
        except (ArchiveError, StopAsyncIteration) as exc:
            await chunks.aclose()
            self.log.warning("archive_read_failed", task_id=record.task_id, error=str(exc) or "empty")
            return None
        return StreamingResponse(self._counted(chunks, "archive", first), status_code=status, headers=headers)

    async def from_upstream(
        self, task: TaskRecord, url: str, spec: RangeSpec | None, head: bool, if_none_match: frozenset[str]
    ) -> Response:
        fetched = await self.fetcher.open(url, self.key_for(task), range_header=spec.header() if spec else None)
        try:
            status, headers, skip, take = self._shape(task, fetched, spec)
        except BaseException:
            fetched.close()
            raise
        if _matches(headers["ETag"], if_none_match):
            fetched.close()
            return _not_modified(headers)
        if head:
            fetched.close()
            return Response(b"", status_code=status, headers=headers)
        chunks = fetched.chunks(self.settings.max_bytes, skip=skip, take=take)
        return StreamingResponse(self._counted(chunks, "upstream"), status_code=status, headers=headers)

    def _shape(
        self, task: TaskRecord, fetched: Fetched, spec: RangeSpec | None
    ) -> tuple[int, dict[str, str], int, int | None]:
        """(status, headers, bytes to skip, bytes to send) for the origin's answer to the client's range."""
        limit = self.settings.max_bytes
        if fetched.status == 416:
            raise _unsatisfiable(whole_number((fetched.header("content-range") or "").rpartition("/")[2]))
        headers: dict[str, str] = {"Content-Type": self._media_type(fetched)}
        status, skip, take = 200, 0, None
        total: int | None
        if fetched.status == 206:
            parsed = parse_content_range(fetched.header("content-range"))
            if parsed is None:
                raise video_unavailable("The video's origin answered a range without a usable Content-Range.")
            span, total = parsed
            status, take = 206, span.length
            headers["Content-Range"] = span.content_range(total)
        else:
            total = fetched.content_length
            take = total
            resolved = resolve(spec, total) if total is not None else None
            if resolved is UNSATISFIABLE:
                raise _unsatisfiable(total)
            if isinstance(resolved, ByteSpan) and total is not None:
                status, skip, take = 206, resolved.start, resolved.length
                headers["Content-Range"] = resolved.content_range(total)
        if total is not None and total > limit:
            raise video_unavailable(f"The video is {total} bytes, more than the configured limit of {limit}.")
        if total is not None:
            headers["Accept-Ranges"] = "bytes"
        if take is not None:
            headers["Content-Length"] = str(take)
        headers["ETag"] = self._etag(task, fetched, total)
        return status, headers, skip, take

    @staticmethod
    def _media_type(fetched: Fetched) -> str:
        value = (fetched.header("content-type") or "").split(";")[0].strip()
        return value if _MEDIA_TYPE.fullmatch(value) else _DEFAULT_TYPE

    @staticmethod
    def _etag(task: TaskRecord, fetched: Fetched, total: int | None) -> str:
        etag = (fetched.header("etag") or "").strip()
        if _ETAG.fullmatch(etag):
            return etag
        return f'W/"{task.task_id}-{total if total is not None else "unknown"}"'

    async def _counted(
        self, chunks: AsyncGenerator[bytes, None], source: str, first: bytes = b""
    ) -> AsyncGenerator[bytes, None]:
        counter = self.metrics.content_bytes.labels(source)
        try:
            if first:
                counter.inc(len(first))
                yield first
            async for chunk in chunks:
                counter.inc(len(chunk))
                yield chunk
        finally:
            await chunks.aclose()
