"""The archive on an S3-compatible store (``s3://bucket/prefix``), through obstore.

obstore (Rust ``object_store`` under Python) was chosen by measurement against aiobotocore on the same
S3-compatible server (``bench/archive_s3_bench.py``, BENCHMARKS.md): about twice the upload throughput at a third
of the CPU, multipart uploads from an async iterator built in, and one small wheel instead of botocore.
Credentials and region come from the standard AWS environment variables unless ``[archive] region`` is set.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from gateway.content.archive_store import ArchiveError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

_PART_BYTES: Final = 8 * 1024 * 1024
_READ_CHUNK: Final = 256 * 1024


def _error(exc: Exception) -> ArchiveError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ArchiveError(f"s3 archive: {first_line[:300]}")


class S3Archive:
    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str = "", region: str = "") -> None:
        config: dict[str, Any] = {}
        if endpoint_url:
            config["endpoint"] = endpoint_url
        if region:
            config["region"] = region
        client_options: ClientConfig = {"allow_http": endpoint_url.startswith("http://")}
        self.description = f"s3://{bucket}/{prefix}"
        # A few quick retries inside one call; the archiver's own back-off handles longer outages.
        retry: RetryConfig = {"max_retries": 3, "retry_timeout": timedelta(seconds=30)}
        self._store = S3Store(
            bucket, prefix=prefix or None, client_options=client_options, retry_config=retry, **config
        )

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        try:
            await obstore.put_async(self._store, key, chunks, chunk_size=_PART_BYTES, max_concurrency=4)
        except BaseError as exc:
            raise _error(exc) from exc

    async def size(self, key: str) -> int | None:
        try:
            meta = await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return None
        except BaseError as exc:
            if isinstance(exc, NotFoundError):
                return None
            raise _error(exc) from exc
        return int(meta["size"])

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        options: Any = {"range": {"offset": start} if end is None else (start, end + 1)}
        try:
            result = await obstore.get_async(self._store, key, options=options)
            async for chunk in result.stream(min_chunk_size=_READ_CHUNK):
                yield bytes(chunk)
        except BaseError as exc:
            raise _error(exc) from exc

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self._store, key)
        except FileNotFoundError:
            return
        except BaseError as exc:
            if isinstance(exc, NotFoundError):
                return
            raise _error(exc) from exc

    async def check(self) -> None:
        probe = ".kling-gateway-probe"
        try:
            await obstore.put_async(self._store, probe, b"probe")
            meta = await obstore.head_async(self._store, probe)
            await obstore.delete_async(self._store, probe)
        except BaseError as exc:
            raise _error(exc) from exc
        except OSError as exc:
            raise ArchiveError(f"s3 archive: {exc}") from exc
        if int(meta["size"]) != 5:
            raise ArchiveError("s3 archive: the probe object did not read back")

    async def aclose(self) -> None:
        return None
