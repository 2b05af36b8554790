"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, an ephemeral port, in a thread.

``s3_server()`` yields its endpoint URL; ``make_bucket(endpoint, name)`` creates a bucket (moto does not check
signatures, so a bare PUT is enough).
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str, name: str) -> None:
    request = urllib.request.Request(f"{endpoint}/{name}", method="PUT")  # noqa: S310 - a loopback test server
    urllib.request.urlopen(request, timeout=10).close()  # noqa: S310
