"""JSON-lines logging: event and access lines in order, scrubbed, on text and real (byte-buffered) streams."""

from __future__ import annotations

import asyncio
import io

import orjson

from gateway.logs import REDACTED, make_logs


def _lines(raw: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in raw.splitlines()]


class TestLineOrder:
    def test_real_stream_keeps_order_and_earlier_text(self) -> None:
        """On a TextIOWrapper, text written before, events and access lines come out in the order written."""
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=False)
        stream.write('{"event": "before"}\n')
        logs = make_logs(stream=stream)
        logs.log.info("startup", port=1)
        logs.access({"request_id": "r1", "route": "/x", "status": 200})
        logs.log.error("boom", detail="é")
        logs.access({"request_id": "r2", "route": "/y", "status": 404})
        logs.access.flush()
        events = [line["event"] for line in _lines(raw.getvalue().decode())]
        assert events == ["before", "startup", "request", "boom", "request"]

    def test_text_only_stream(self) -> None:
        """A stream without a byte buffer (StringIO) gets the same lines."""
        stream = io.StringIO()
        logs = make_logs(stream=stream)
        logs.access({"request_id": "r1", "route": "/x", "status": 200})
        logs.log.warning("careful")
        assert [line["event"] for line in _lines(stream.getvalue())] == ["request", "careful"]


class TestScrubbing:
    def test_access_line_secrets_scrubbed_but_fixed_fields_kept(self) -> None:
        """Caller-controlled fields are scrubbed; the fixed vocabulary (method, route, cache) is written as is."""
        stream = io.StringIO()
        logs = make_logs(stream=stream, secrets=["sk-upstream-canary"])
        logs.access(
            {
                "request_id": "gk_abcdefghijklmnop",
                "method": "GET",
                "route": "/v1/videos/{task_id}",
                "cache": "HIT",
                "task_id": "x-sk-upstream-canary",
            }
        )
        (line,) = _lines(stream.getvalue())
        assert line["request_id"] == REDACTED
        assert line["task_id"] == f"x-{REDACTED}"
        assert (line["method"], line["route"], line["cache"]) == ("GET", "/v1/videos/{task_id}", "HIT")

    def test_scrubbed_line_stays_valid_json(self) -> None:
        """A credential next to an escaped quote is cut at the escape: the line still parses."""
        stream = io.StringIO()
        logs = make_logs(stream=stream, secrets=['sk-"quoted"-secret'])
        logs.access({"request_id": "r", "note": 'Bearer abc"def', "other": 'x sk-"quoted"-secret y'})
        (line,) = _lines(stream.getvalue())
        assert line["note"] == f'{REDACTED}"def'
        assert line["other"] == f"x {REDACTED} y"

    def test_event_lines_scrubbed_too(self) -> None:
        stream = io.StringIO()
        logs = make_logs(stream=stream, secrets=["sk-upstream-canary"])
        logs.log.error("upstream_said", detail="key sk-upstream-canary and Bearer gk_abcdefghijkl")
        (line,) = _lines(stream.getvalue())
        assert "canary" not in str(line["detail"]) and "gk_abcdefghijkl" not in str(line["detail"])


class TestBuffering:
    def test_lines_gathered_until_interval_or_size(self) -> None:
        """On a real stream, info lines wait (no write per line) until the flush interval or the size bound."""
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
        logs = make_logs(stream=stream)
        logs.access({"request_id": "r1", "route": "/x", "status": 200})
        assert raw.getvalue() == b""
        logs.access.flush()
        assert [line["request_id"] for line in _lines(raw.getvalue().decode())] == ["r1"]
        for n in range(1000):  # ~100 KB: past the 64 KiB bound, written without an explicit flush
            logs.access({"request_id": f"r{n}", "route": "/x", "status": 200, "pad": "p" * 40})
        assert len(raw.getvalue()) > 64 * 1024

    def test_errors_written_at_once(self) -> None:
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
        logs = make_logs(stream=stream)
        logs.access({"request_id": "r1", "route": "/x", "status": 200})
        logs.log.error("store_error", error="disk full")
        assert [line["event"] for line in _lines(raw.getvalue().decode())] == ["request", "store_error"]

    async def test_flush_loop_writes_waiting_lines(self) -> None:
        """The app's flush loop writes lines that waited past the interval even when no new line comes."""
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
        logs = make_logs(stream=stream)
        logs.access({"request_id": "r1", "route": "/x", "status": 200})
        flusher = asyncio.create_task(logs.access.keep_flushed(interval_s=0.02))
        try:
            for _ in range(100):
                if raw.getvalue():
                    break
                await asyncio.sleep(0.02)
        finally:
            flusher.cancel()
        assert [line["request_id"] for line in _lines(raw.getvalue().decode())] == ["r1"]
