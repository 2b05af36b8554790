"""The default upstream client over TLS (UniAll is https): a trusted certificate works, an untrusted one never does."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import UpstreamSettings
from gateway.upstream.client import ConnectFailed
from gateway.upstream.lean import LeanTransport

OPENSSL = shutil.which("openssl") or "openssl"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the test cert")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (made with the openssl command, no network)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_upstream(certificate: tuple[Path, Path]) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A keep-alive HTTPS server on loopback answering every request with a small JSON status."""
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                requests.append(head)
                body = b'{"status":"in_progress"}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, requests
    finally:
        server.close()
        await server.wait_closed()


async def test_trusted_certificate_round_trip(
    certificate: tuple[Path, Path], tls_upstream: tuple[int, list[bytes]]
) -> None:
    """With the certificate trusted, two calls share one TLS connection; SNI and Host name the upstream."""
    port, requests = tls_upstream
    transport = LeanTransport(UpstreamSettings(base_url=f"https://localhost:{port}"))
    transport._ssl = ssl.create_default_context(cafile=str(certificate[0]))  # the test CA, as a system CA would be
    try:
        for _ in range(2):
            answer = await transport.send("GET", f"https://localhost:{port}/v1/videos/t1", [("X-Trace", "1")], None)
            assert (answer.status, answer.body) == (200, b'{"status":"in_progress"}')
    finally:
        await transport.aclose()
    assert len(requests) == 2
    assert all(f"host: localhost:{port}".encode() in head.lower() for head in requests)


async def test_untrusted_certificate_refused(tls_upstream: tuple[int, list[bytes]]) -> None:
    """The default context verifies: a certificate no CA vouches for fails to connect, and nothing is sent."""
    port, requests = tls_upstream
    transport = LeanTransport(UpstreamSettings(base_url=f"https://localhost:{port}"))
    try:
        with pytest.raises(ConnectFailed):
            await transport.send("GET", f"https://localhost:{port}/v1/videos/t1", [], None)
    finally:
        await transport.aclose()
    assert requests == []


async def test_wrong_host_name_refused(certificate: tuple[Path, Path], tls_upstream: tuple[int, list[bytes]]) -> None:
    """A trusted certificate for another name is refused too (hostname checking is on)."""
    port, requests = tls_upstream
    transport = LeanTransport(UpstreamSettings(base_url=f"https://127.0.0.2:{port}"))
    transport._ssl = ssl.create_default_context(cafile=str(certificate[0]))
    try:
        with pytest.raises(ConnectFailed):
            await transport.send("GET", f"https://127.0.0.2:{port}/v1/videos/t1", [], None)
    finally:
        await transport.aclose()
    assert requests == []
