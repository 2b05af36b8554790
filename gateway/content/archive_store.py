"""Where archived videos live: a small protocol, and the backend chosen by ``[archive] url``'s scheme.

``file:///path`` (``archive_file``) keeps them on the local disk; ``s3://bucket/prefix`` (``archive_s3``, the
``[archive]`` extra) on any S3-compatible store, credentials from the standard AWS environment variables. Every
method streams; none holds a whole video in memory. Backend failures are :class:`ArchiveError`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, Protocol
from urllib.parse import unquote, urlsplit

from gateway.config import ArchiveSettings

_SAFE_ID: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:\-]{0,199}")


class ArchiveError(Exception):
    """The archive store failed or refused an operation."""


class ArchiveBackend(Protocol):
    """A place for video copies, addressed by key (``<task id>.mp4``)."""

    description: str

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        """Store the bytes under ``key``; visible only once complete."""

    async def size(self, key: str) -> int | None:
        """The stored object's size, None if there is none."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """The bytes ``start``..``end`` (inclusive; None: to the end) in chunks."""

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is gone already)."""

    async def check(self) -> None:
        """Write, read and delete a probe object; :class:`ArchiveError` saying why not."""

    async def aclose(self) -> None:
        """Release connections."""


def archive_key(task_id: str) -> str:
    """The object key of a task's video."""
    if not _SAFE_ID.fullmatch(task_id):
        raise ArchiveError(f"task id {task_id!r} cannot name an archive object")
    return f"{task_id}.mp4"


def open_archive(settings: ArchiveSettings) -> ArchiveBackend | None:
    """The backend ``settings.url`` names, or None when the archive is off."""
    if not settings.url:
        return None
    parts = urlsplit(settings.url)
    if parts.scheme == "file":
        from gateway.content.archive_file import FileArchive

        return FileArchive(unquote(parts.path))
    if parts.scheme == "s3":
        try:
            from gateway.content.archive_s3 import S3Archive
        except ImportError as exc:  # the [archive] extra is missing
            raise ArchiveError(f"archive.url: s3 needs obstore: pip install 'kling-gateway[archive]' ({exc})") from exc
        return S3Archive(
            parts.netloc, parts.path.strip("/"), endpoint_url=settings.endpoint_url, region=settings.region
        )
    raise ArchiveError(f"archive.url: scheme must be file or s3, got {parts.scheme!r}")
