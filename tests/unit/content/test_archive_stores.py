"""Both archive backends against real storage: a temporary folder (file://) and moto's S3 server (s3://)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.upstream_fake import video_bytes

from gateway.config import ArchiveSettings
from gateway.content.archive_store import ArchiveBackend, ArchiveError, archive_key, open_archive

SIZE = 9 * 1024 * 1024 + 123  # more than one multipart part


async def chunks(size: int, step: int = 1024 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, size, step):
        yield video_bytes(start, min(size, start + step))


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> ArchiveBackend:
    if request.param == "file":
        settings = ArchiveSettings(url=(tmp_path / "archive").as_uri())
    else:
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_endpoint")
        settings = ArchiveSettings(url=f"s3://{bucket}/videos", endpoint_url=endpoint)
    archive = open_archive(settings)
    assert archive is not None
    return archive


async def read(backend: ArchiveBackend, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in backend.read(key, start, end)])


async def test_put_read_ranges_delete(backend: ArchiveBackend) -> None:
    """A multi-part upload reads back whole and by range; delete removes it (twice is fine)."""
    await backend.check()
    key = archive_key("task_1")
    assert await backend.size(key) is None
    await backend.put(key, chunks(SIZE))
    assert await backend.size(key) == SIZE
    whole = await read(backend, key)
    assert hashlib.sha256(whole).digest() == hashlib.sha256(video_bytes(0, SIZE)).digest()
    assert await read(backend, key, 10, 19) == video_bytes(10, 20)
    assert await read(backend, key, SIZE - 5) == video_bytes(SIZE - 5, SIZE)
    await backend.delete(key)
    await backend.delete(key)
    assert await backend.size(key) is None
    await backend.aclose()


async def test_failed_source_leaves_nothing(backend: ArchiveBackend) -> None:
    """A source that fails mid-way: no object appears under the key."""

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise ArchiveError("source broke")

    with pytest.raises(Exception):  # noqa: B017 - each backend wraps the source's failure its own way
        await backend.put(archive_key("task_2"), failing())
    assert await backend.size(archive_key("task_2")) is None


async def test_unreachable_s3_fails_check(s3_bucket: str) -> None:
    archive = open_archive(ArchiveSettings(url=f"s3://{s3_bucket}", endpoint_url="http://127.0.0.1:9"))
    assert archive is not None
    with pytest.raises(ArchiveError, match="s3 archive"):
        await archive.check()


async def test_unwritable_folder_fails_check(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    archive = open_archive(ArchiveSettings(url=(blocker / "sub").as_uri()))
    assert archive is not None
    with pytest.raises(ArchiveError, match="file archive"):
        await archive.check()


@pytest.mark.parametrize("task_id", ["../etc", ".hidden", "a/b", ""])
def test_unsafe_task_ids_name_no_object(task_id: str) -> None:
    with pytest.raises(ArchiveError):
        archive_key(task_id)
