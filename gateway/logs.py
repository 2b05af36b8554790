"""structlog JSON logging, built per app (no global configuration), with secrets scrubbed before writing.

Each app gets its own logger chain: contextvars (request id) → level and timestamp → secret scrubbing → JSON.
Scrubbing is defence in depth: no code path logs a key on purpose, and the last processor before the writer
masks the configured secrets, anything that looks like a gateway key and any ``Bearer`` credential.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from gateway.known_secrets import KnownSecrets

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_KEY_PATTERN = re.compile(r"gk_[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[^\s\"',]+")
REDACTED = "[redacted]"
_REDACTED_BYTES = REDACTED.encode()
#: ``_KEY_PATTERN`` for serialized JSON: a credential also ends at a backslash, so an escape is never cut in half.
_JSON_KEY_PATTERN = re.compile(rb"gk_[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[^\s\"',\\]+")
#: The id of the request being handled in this context; every log line written on its behalf carries it.
REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)

#: The structured logger every service is given (built once per app by ``make_logs``).
Logger = FilteringBoundLogger


class SecretScrubber:
    """Replace known secrets and credential-shaped substrings in every string value of an event.

    ``secrets`` may grow while the app runs (upstream keys re-read from their file): the derived tuples are rebuilt
    when its version moves, one integer comparison per line otherwise.
    """

    def __init__(self, secrets: Iterable[str] | KnownSecrets) -> None:
        self._known = secrets if isinstance(secrets, KnownSecrets) else KnownSecrets(secrets)
        self._version = -1
        self._secrets: tuple[str, ...] = ()
        self._json_secrets: tuple[bytes, ...] = ()
        self._refresh()

    def _refresh(self) -> None:
        if self._version == self._known.version:
            return
        self._version = self._known.version
        self._secrets = self._known.values
        # The same secrets as they appear inside a JSON string (escaped), for scrubbing a serialized line.
        self._json_secrets = tuple(orjson.dumps(s)[1:-1] for s in self._secrets)

    def scrub_json_line(self, line: bytes) -> bytes:
        """Scrub one serialized JSON line in a single pass (the access line: cheaper than field by field)."""
        self._refresh()
        for secret in self._json_secrets:
            if secret in line:
                line = line.replace(secret, _REDACTED_BYTES)
        if b"gk_" in line or b"earer" in line:
            line = _JSON_KEY_PATTERN.sub(_REDACTED_BYTES, line)
        return line

    def scrub(self, text: str) -> str:
        self._refresh()
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _KEY_PATTERN.sub(REDACTED, text) if ("gk_" in text or "earer" in text) else text

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.scrub(value)
        return event


def _add_request_id(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def _add_time_and_level(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    event["ts"] = round(time.time(), 3)
    event["level"] = method
    return event


def _render(logger: WrappedLogger, method: str, event: EventDict) -> str:
    return orjson.dumps(event, default=str).decode()


class _LineWriter:
    """The only step that writes: one JSON line per event.

    On a real stream (``sys.stdout``: a file or a pipe) lines are gathered in memory and written to its byte
    buffer in one call when ``max_pending_bytes`` are waiting or ``flush_interval_s`` has passed (checked at each
    line and by the app's log-flush loop), so the access log costs no system call per request even when Python's
    own buffering is off (``PYTHONUNBUFFERED=1``, as in the Docker image). Warnings and errors are written at
    once. The access line is ``orjson`` bytes already, so nothing is decoded only to be encoded again. A stream
    without a byte buffer (``io.StringIO`` in tests) gets each line as text at once.
    """

    def __init__(self, stream: TextIO, flush_interval_s: float = 0.2, max_pending_bytes: int = 64 * 1024) -> None:
        self._interval = flush_interval_s
        self._max_pending = max_pending_bytes
        self._flushed = time.monotonic()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        binary: BinaryIO | None = getattr(stream, "buffer", None)
        self._binary = binary
        self._text = stream
        if binary is not None:
            stream.flush()  # nothing written to the text layer before may come out after our bytes

    def msg(self, line: str) -> None:
        self.line(line.encode())

    def line(self, data: bytes) -> None:
        """Write one JSON line given as bytes (without its newline)."""
        if self._binary is None:
            self._text.write(data.decode() + "\n")
            return
        self._pending.append(data + b"\n")
        self._pending_bytes += len(data) + 1
        if self._pending_bytes >= self._max_pending:
            self.flush()
        else:
            now = time.monotonic()
            if now - self._flushed >= self._interval:
                self.flush(now)

    def urgent(self, line: str) -> None:
        self.line(line.encode())
        self.flush()

    def flush(self, now: float | None = None) -> None:
        """Write what is gathered and flush the stream."""
        self._flushed = time.monotonic() if now is None else now
        if self._binary is None:
            self._text.flush()
            return
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._binary.write(data)
        self._binary.flush()

    def flush_if_due(self) -> None:
        """Flush when lines have waited ``flush_interval_s`` (the app calls this a few times a second)."""
        if self._pending and time.monotonic() - self._flushed >= self._interval:
            self.flush()

    debug = info = msg
    warning = error = critical = exception = urgent


class AccessLog:
    """The per-request line, written without the structlog chain (it is the hot path), still scrubbed."""

    def __init__(self, writer: _LineWriter, scrubber: SecretScrubber) -> None:
        self._writer = writer
        self._scrubber = scrubber

    def __call__(self, fields: dict[str, Any]) -> None:
        fields["event"] = "request"
        fields["ts"] = round(time.time(), 3)
        fields["level"] = "info"
        self._writer.line(self._scrubber.scrub_json_line(orjson.dumps(fields, default=str)))

    def flush(self) -> None:
        self._writer.flush()

    async def keep_flushed(self, interval_s: float = 0.1) -> None:
        """Run for the life of the app: lines never wait more than about the writer's flush interval."""
        while True:
            await asyncio.sleep(interval_s)
            self._writer.flush_if_due()


@dataclass(frozen=True)
class Logs:
    """One app's logging: the structured logger for events and the fast access-line writer."""

    log: Logger
    access: AccessLog


def make_logs(*, level: str = "info", secrets: Iterable[str] | KnownSecrets = (), stream: TextIO | None = None) -> Logs:
    """JSON-lines logging for one app; ``secrets`` are masked wherever they appear (also ones added later)."""
    writer = _LineWriter(stream if stream is not None else sys.stdout)
    scrubber = SecretScrubber(secrets)
    processors: list[Processor] = [
        _add_request_id,
        _add_time_and_level,
        scrubber,
        _render,
    ]
    logger: Logger = structlog.wrap_logger(
        writer,
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        cache_logger_on_first_use=True,
    )
    return Logs(log=logger, access=AccessLog(writer, scrubber))


def make_logger(*, level: str = "info", secrets: Iterable[str] = (), stream: TextIO | None = None) -> Logger:
    """Just the structured logger (for code that writes no access lines)."""
    return make_logs(level=level, secrets=secrets, stream=stream).log
