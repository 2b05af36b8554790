"""structlog JSON logging, built per app (no global configuration), with secrets scrubbed before writing.

Each app gets its own logger chain: contextvars (request id) → level and timestamp → secret scrubbing → JSON.
Scrubbing is defence in depth: no code path logs a key on purpose, and the last processor before the writer
masks the configured secrets, anything that looks like a gateway key and any ``Bearer`` credential.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_KEY_PATTERN = re.compile(r"gk_[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[^\s\"',]+")
REDACTED = "[redacted]"
_REDACTED_BYTES = REDACTED.encode()
#: ``_KEY_PATTERN`` for serialized JSON: a credential also ends at a backslash, so an escape is never cut in half.
_JSON_KEY_PATTERN = re.compile(rb"gk_[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[^\s\"',\\]+")
#: The id of the request being handled in this context; every log line written on its behalf carries it.
REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)


class SecretScrubber:
    """Replace known secrets and credential-shaped substrings in every string value of an event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))
        # The same secrets as they appear inside a JSON string (escaped), for scrubbing a serialized line.
        self._json_secrets = tuple(orjson.dumps(s)[1:-1] for s in self._secrets)

    def scrub_json_line(self, line: bytes) -> bytes:
        """Scrub one serialized JSON line in a single pass (the access line: cheaper than field by field)."""
        for secret in self._json_secrets:
            if secret in line:
                line = line.replace(secret, _REDACTED_BYTES)
        if b"gk_" in line or b"earer" in line:
            line = _JSON_KEY_PATTERN.sub(_REDACTED_BYTES, line)
        return line

    def scrub(self, text: str) -> str:
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

    Lines are flushed at most every ``flush_interval_s`` (and by the next line after it), not one system call per
    line: under load the access log alone would otherwise cost a write per request. Errors flush at once. On a
    real stream (``sys.stdout``) lines go to its byte buffer: the access line is bytes from ``orjson`` already, and
    decoding it only for the text layer to encode it again was a visible share of a request.
    """

    def __init__(self, stream: TextIO, flush_interval_s: float = 0.2) -> None:
        self._interval = flush_interval_s
        self._flushed = time.monotonic()
        binary: BinaryIO | None = getattr(stream, "buffer", None)
        if binary is not None:
            stream.flush()  # nothing written to the text layer before may come out after our bytes
            self._write_bytes: Callable[[bytes], object] = binary.write
            self._flush: Callable[[], object] = binary.flush
        else:
            self._write_bytes = lambda data: stream.write(data.decode())
            self._flush = stream.flush

    def msg(self, line: str) -> None:
        self.line(line.encode())

    def line(self, data: bytes) -> None:
        """Write one JSON line given as bytes (without its newline)."""
        self._write_bytes(data + b"\n")
        now = time.monotonic()
        if now - self._flushed >= self._interval:
            self.flush(now)

    def urgent(self, line: str) -> None:
        self._write_bytes(line.encode() + b"\n")
        self.flush(time.monotonic())

    def flush(self, now: float | None = None) -> None:
        self._flush()
        self._flushed = time.monotonic() if now is None else now

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


@dataclass(frozen=True)
class Logs:
    """One app's logging: the structured logger for events and the fast access-line writer."""

    log: Any
    access: AccessLog


def make_logs(*, level: str = "info", secrets: Iterable[str] = (), stream: TextIO | None = None) -> Logs:
    """JSON-lines logging for one app; ``secrets`` are masked wherever they appear."""
    writer = _LineWriter(stream if stream is not None else sys.stdout)
    scrubber = SecretScrubber(secrets)
    processors: list[Processor] = [
        _add_request_id,
        _add_time_and_level,
        scrubber,
        _render,
    ]
    logger: Any = structlog.wrap_logger(
        writer,
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        cache_logger_on_first_use=True,
    )
    return Logs(log=logger, access=AccessLog(writer, scrubber))


def make_logger(
    *, level: str = "info", secrets: Iterable[str] = (), stream: TextIO | None = None
) -> structlog.typing.FilteringBoundLogger:
    """Just the structured logger (for code that writes no access lines)."""
    logger: structlog.typing.FilteringBoundLogger = make_logs(level=level, secrets=secrets, stream=stream).log
    return logger
