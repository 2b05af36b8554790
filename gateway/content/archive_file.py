"""The archive on the local disk (``file:///path``): one file per video, written aside and renamed into place.

Blocking file calls run in the default executor, a chunk at a time, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO, Final, TypeVar

from gateway.content.archive_store import ArchiveError

T = TypeVar("T")
_WRITE_BUFFER: Final = 1024 * 1024
_READ_CHUNK: Final = 256 * 1024


async def _io(fn: Callable[[], T]) -> T:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn)
    except OSError as exc:
        raise ArchiveError(f"file archive: {exc.strerror or exc}") from exc


async def _opened(opener: Callable[[], BinaryIO], part: Path | None) -> BinaryIO:
    """Open a file in the executor; if the caller is cancelled meanwhile, the file is closed (and removed) later."""
    future = asyncio.get_running_loop().run_in_executor(None, opener)

    def discard(done: asyncio.Future[BinaryIO]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()
            if part is not None:
                part.unlink(missing_ok=True)

    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(discard)
        raise
    except OSError as exc:
        raise ArchiveError(f"file archive: {exc.strerror or exc}") from exc


class FileArchive:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.description = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        final = self._path(key)
        part = final.with_name(f".{final.name}.{secrets.token_hex(4)}.part")

        def open_part() -> BinaryIO:
            self.root.mkdir(parents=True, exist_ok=True)
            return part.open("wb")

        handle = await _opened(open_part, part)
        try:
            buffer = bytearray()
            async for chunk in chunks:
                buffer += chunk
                if len(buffer) >= _WRITE_BUFFER:
                    data = bytes(buffer)
                    buffer.clear()
                    await _io(lambda data=data: handle.write(data))  # type: ignore[misc]
            if buffer:
                await _io(lambda: handle.write(bytes(buffer)))

            def finish() -> None:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(part, final)

            await _io(finish)
        except BaseException:
            handle.close()
            part.unlink(missing_ok=True)
            raise

    async def size(self, key: str) -> int | None:
        path = self._path(key)

        def stat() -> int | None:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return None

        return await _io(stat)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        path = self._path(key)

        def open_at() -> BinaryIO:
            handle = path.open("rb")
            handle.seek(start)
            return handle

        handle = await _opened(open_at, None)
        try:
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                want = _READ_CHUNK if left is None else min(_READ_CHUNK, left)
                chunk = await _io(lambda want=want: handle.read(want))  # type: ignore[misc]
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            handle.close()

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await _io(lambda: path.unlink(missing_ok=True))

    async def check(self) -> None:
        probe = ".kling-gateway-probe"

        async def one() -> AsyncIterator[bytes]:
            yield b"probe"

        await self.put(probe, one())
        if await self.size(probe) != 5:
            raise ArchiveError("file archive: the probe file did not read back")
        await self.delete(probe)

    async def aclose(self) -> None:
        return None
