"""Which S3 client the archive uses: obstore against aiobotocore, measured on one S3-compatible server (loopback).

Starts moto's S3 server (``moto[server]``) in its own process on 127.0.0.1, then for each library uploads and
downloads a 50 MB object several times, streaming (the archive never holds a video in memory), and prints MB/s and
the CPU seconds this process spent (all threads, so obstore's Rust runtime counts too)::

    .venv/bin/python bench/archive_s3_bench.py [--mb 50] [--rounds 3]

The server is the same for both, so the difference is the client's own cost; moto is slow, so absolute MB/s are
the server's ceiling more than the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

_CHUNK = 1024 * 1024
_PART = 8 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()  # noqa: S310 - loopback only
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


async def _chunks(size: int) -> AsyncIterator[bytes]:
    block = os.urandom(_CHUNK)
    sent = 0
    while sent < size:
        step = min(_CHUNK, size - sent)
        yield block[:step]
        sent += step


async def _obstore_round(endpoint: str, bucket: str, size: int) -> tuple[float, float]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, endpoint=endpoint, region="us-east-1", client_options={"allow_http": True})
    started = time.perf_counter()
    await obstore.put_async(store, "bench/obj", _chunks(size), chunk_size=_PART, max_concurrency=4)
    up = time.perf_counter() - started
    started = time.perf_counter()
    got = 0
    result = await obstore.get_async(store, "bench/obj")
    async for chunk in result.stream(min_chunk_size=256 * 1024):
        got += len(chunk)
    down = time.perf_counter() - started
    assert got == size, (got, size)
    return up, down


async def _aiobotocore_round(endpoint: str, bucket: str, size: int) -> tuple[float, float]:
    from aiobotocore.session import get_session

    session = get_session()
    async with session.create_client("s3", endpoint_url=endpoint, region_name="us-east-1") as client:
        started = time.perf_counter()
        upload = await client.create_multipart_upload(Bucket=bucket, Key="bench/obj")
        parts = []
        buffer = bytearray()
        number = 1
        async for chunk in _chunks(size):
            buffer += chunk
            if len(buffer) >= _PART:
                answer = await client.upload_part(
                    Bucket=bucket, Key="bench/obj", UploadId=upload["UploadId"], PartNumber=number, Body=bytes(buffer)
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                number += 1
                buffer.clear()
        if buffer:
            answer = await client.upload_part(
                Bucket=bucket, Key="bench/obj", UploadId=upload["UploadId"], PartNumber=number, Body=bytes(buffer)
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        await client.complete_multipart_upload(
            Bucket=bucket, Key="bench/obj", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
        up = time.perf_counter() - started
        started = time.perf_counter()
        got = 0
        answer = await client.get_object(Bucket=bucket, Key="bench/obj")
        async with answer["Body"] as body:
            while chunk := await body.read(256 * 1024):
                got += len(chunk)
        down = time.perf_counter() - started
        assert got == size, (got, size)
        return up, down


def _make_bucket(endpoint: str, bucket: str) -> None:
    request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")  # noqa: S310 - loopback only
    urllib.request.urlopen(request, timeout=10).close()  # noqa: S310


async def _measure(
    name: str, fn: Callable[[str, str, int], Awaitable[tuple[float, float]]], endpoint: str, mb: int, rounds: int
) -> None:
    bucket = f"bench-{name}"
    _make_bucket(endpoint, bucket)
    size = mb * 1024 * 1024
    await fn(endpoint, bucket, size)  # warm-up: imports, connections
    cpu0 = time.process_time()
    ups, downs = [], []
    for _ in range(rounds):
        up, down = await fn(endpoint, bucket, size)
        ups.append(up)
        downs.append(down)
    cpu = (time.process_time() - cpu0) / rounds
    print(
        f"| {name} | {mb / min(ups):.0f} | {mb / min(downs):.0f} | {cpu:.2f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    proc, endpoint = _start_moto()
    try:
        print(f"{args.mb} MB object, best of {args.rounds} rounds, moto server {endpoint}")
        print("| client | upload MB/s | download MB/s | client CPU s per round trip |")
        print("|---|---|---|---|")
        asyncio.run(_measure("obstore", _obstore_round, endpoint, args.mb, args.rounds))
        asyncio.run(_measure("aiobotocore", _aiobotocore_round, endpoint, args.mb, args.rounds))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
