"""``kling-gateway generate``: a client of a running gateway — validate locally, submit, follow, download.

The request is checked with the gateway's own ``validate`` before anything is sent; the submission carries an
``Idempotency-Key`` (so a retry never makes a second video); ``--wait`` polls ``GET /v1/videos/{id}`` every
``--poll-interval`` seconds (waiting longer when the gateway answers 429/503 with ``Retry-After``) and shows a
progress bar on a terminal, plain lines otherwise; ``--out`` downloads ``/v1/videos/{id}/content`` (or the task's
``video_url`` when the gateway has no such route). Ctrl-C leaves the task running and prints how to resume.

Results go to standard output (``task_id: ...`` lines, or one JSON object with ``--json``); progress, warnings and
errors to standard error. Exit codes: 0 done, 1 invalid request / refused / failed task / transfer failure,
2 usage or configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import email.utils
import math
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from gateway.validation.checks import validate

if TYPE_CHECKING:  # imported when the command runs: the other commands start without httpx
    import httpx

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SUBMIT_PATH = "/v1/video/generations"
TERMINAL = frozenset({"completed", "failed"})
DEFAULT_POLL_S = 2.0
MIN_POLL_S = 0.5
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0
"""A longer ``Retry-After`` (an exhausted monthly budget, say) is reported rather than waited out."""
MAX_ATTEMPTS = 6
"""Consecutive refusals or transport failures tolerated on one call before giving up."""
_TIMEOUT_S, _CONNECT_TIMEOUT_S = 30.0, 5.0
_CHUNK = 64 * 1024


# -- pure parts -------------------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date); None if absent or unreadable.

    >>> parse_retry_after("3", 0.0), parse_retry_after("soon", 0.0)
    (3.0, None)
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def next_delay(status: int | None, retry_after: float | None, *, interval: float, attempt: int) -> float | None:
    """How long to wait before asking again after a refusal or failure; None when it is time to give up.

    ``status`` is the HTTP status (None: the request did not get an answer); ``attempt`` counts the consecutive
    failures so far, from 0. 429/503 wait for ``Retry-After`` (never less than ``interval``), else back off; other
    5xx and transport failures back off; anything else is not worth repeating.
    """
    if attempt >= MAX_ATTEMPTS:
        return None
    backoff = min(interval * 2.0**attempt, MAX_BACKOFF_S)
    if status in (429, 503):
        if retry_after is None:
            return backoff
        return None if retry_after > MAX_RETRY_AFTER_S else max(retry_after, interval)
    if status is None or status >= 500:
        return backoff
    return None


def format_elapsed(seconds: float) -> str:
    """``H:MM:SS`` as a progress bar shows it."""
    whole = max(0, int(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def progress_line(status: str, progress: object, elapsed_s: float) -> str:
    """One plain progress line, for output that is not a terminal: ``in_progress   42%  0:00:03``."""
    percent = f"{int(progress)}%" if isinstance(progress, int | float) and not isinstance(progress, bool) else "-"
    return f"{status:<12} {percent:>4}  {format_elapsed(elapsed_s)}"


@dataclass(eq=False)
class Failure(Exception):
    """Why the command stops short: a stable ``code``, a message, the gateway's per-field ``errors`` if any."""

    code: str
    message: str
    errors: tuple[dict[str, Any], ...] = ()
    http_status: int | None = None
    exit_code: int = EXIT_FAILED
    retry_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "errors": list(self.errors),
            "http_status": self.http_status,
        }

    def lines(self) -> list[str]:
        """The failure as a human reads it: the message with its code, then one line per problem."""
        where = f", HTTP {self.http_status}" if self.http_status else ""
        out = [f"error: {self.message} [{self.code}{where}]"]
        out += [f"  - {e.get('param', '?')}: {e.get('message', '')} [{e.get('code', '?')}]" for e in self.errors]
        return out


def gateway_failure(status: int, body: bytes) -> Failure:
    """The gateway's JSON error (``error.message``, ``error.code``, ``error.errors[]``) as a ``Failure``."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        snippet = body[:200].decode("utf-8", "replace").strip()
        return Failure(f"http_{status}", snippet or f"the gateway answered HTTP {status}", http_status=status)
    errors = error.get("errors")
    return Failure(
        code=str(error.get("code") or error.get("type") or f"http_{status}"),
        message=str(error.get("message") or f"the gateway answered HTTP {status}"),
        errors=tuple(e for e in errors if isinstance(e, dict)) if isinstance(errors, list) else (),
        http_status=status,
    )


def _number_or_text(text: str | None) -> object:
    """A flag's value as JSON would carry it, so ``validate`` reports a bad one exactly as the gateway would."""
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The generation request the flags describe (only the flags given)."""
    body: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
    optional = {
        "image": args.image,
        "last_image": args.last_image,
        "duration": _number_or_text(args.duration),
        "aspect_ratio": args.aspect_ratio,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    extra = {"negative_prompt": args.negative_prompt, "cfg_scale": _number_or_text(args.cfg_scale)}
    if extra := {k: v for k, v in extra.items() if v is not None}:
        body["extra_body"] = extra
    return body


def resume_command(task_id: str, out: str | None) -> str:
    """The command that picks a task up again."""
    command = f"kling-gateway generate --resume {shlex.quote(task_id)} --wait"
    return f"{command} --out {shlex.quote(out)}" if out else command


# -- command line -----------------------------------------------------------------------------------------------


_HELP_EPILOG = """\
environment:
  KLING_GATEWAY_URL   the gateway's base URL (or --url), e.g. http://127.0.0.1:8080
  KLING_GATEWAY_KEY   a gateway key, gk_... (or --key)

Results go to standard output (name: value lines, or one JSON object with --json); progress, warnings and
errors to standard error. Ctrl-C leaves the task running and prints the command that resumes it.

exit codes: 0 done, 1 invalid request / refused by the gateway / task failed / gateway unreachable / download
failed, 2 usage or configuration, 130 interrupted.
"""


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``generate`` on the CLI's subcommands."""
    p = subcommands.add_parser(
        "generate",
        help="validate, submit through a gateway, follow the task, download the video",
        description="Validate a Kling request locally, submit it through a gateway with an Idempotency-Key, "
        "follow the task, and download the video.",
        epilog=_HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="M", help="kling-v3-{std,pro}-{silent,audio}")
    p.add_argument("--prompt", metavar="P", help="what the video shows")
    p.add_argument("--image", metavar="URL", help="image URL: image-to-video, or the first frame with --last-image")
    p.add_argument("--last-image", metavar="URL", help="last-frame image URL (needs --image)")
    p.add_argument("--duration", metavar="S", help="seconds, 3-15")
    p.add_argument("--aspect-ratio", metavar="R", help="16:9, 9:16 or 1:1")
    p.add_argument("--negative-prompt", metavar="T", help="what to avoid")
    p.add_argument("--cfg-scale", metavar="X", help="prompt adherence, 0-1")
    p.add_argument("--resume", metavar="TASK_ID", help="follow a task submitted before instead of submitting")
    p.add_argument("--wait", action="store_true", help="poll until the task completes or fails")
    p.add_argument("--out", metavar="FILE", help="download the video to FILE (implies --wait)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end (errors too)")
    p.add_argument("--url", help="gateway base URL (default: $KLING_GATEWAY_URL)")
    p.add_argument("--key", help="gateway key (default: $KLING_GATEWAY_KEY)")
    p.add_argument(
        "--idempotency-key", metavar="K", help="repeat an earlier submission safely with its key (default: a new UUID)"
    )
    p.add_argument(
        "--poll-interval", metavar="S", type=float, default=DEFAULT_POLL_S, help="seconds between polls (default 2)"
    )
    p.set_defaults(handler=run)


_REQUEST_FLAGS = ("model", "prompt", "image", "last_image", "duration", "aspect_ratio", "negative_prompt", "cfg_scale")


def run(args: argparse.Namespace) -> int:
    """Run ``generate``; returns the exit code."""
    out = Output(as_json=args.json, stdout=sys.stdout, stderr=sys.stderr)
    try:
        body = _checked_request(args)
        url, key = _gateway(args)
    except Failure as failure:
        return out.fail(failure)
    job = Job(client=_client(url, key), out=out, interval=args.poll_interval, out_file=args.out)
    with job.client:
        return job.run(body, resume=args.resume, wait=args.wait or bool(args.out), idem_key=args.idempotency_key)


@dataclass(frozen=True)
class Checked:
    """A request that passed local validation: the normalized body to submit, and any warnings."""

    body: dict[str, Any]
    warnings: list[dict[str, str]]


def _checked_request(args: argparse.Namespace) -> Checked | None:
    """The validated body to submit, or None with ``--resume``; a ``Failure`` for bad flags or an invalid body."""
    if args.poll_interval < MIN_POLL_S or not math.isfinite(args.poll_interval):
        raise Failure("usage", f"--poll-interval: at least {MIN_POLL_S:g} seconds", exit_code=EXIT_USAGE)
    given = [f"--{name.replace('_', '-')}" for name in _REQUEST_FLAGS if getattr(args, name) is not None]
    if args.resume is not None:
        if args.idempotency_key is not None:
            given.append("--idempotency-key")
        if given:
            raise Failure("usage", f"--resume follows an existing task: drop {', '.join(given)}", exit_code=EXIT_USAGE)
        if not args.resume.strip() or "/" in args.resume:
            raise Failure("usage", f"--resume: not a task id: {args.resume!r}", exit_code=EXIT_USAGE)
        return None
    missing = [flag for flag in ("--model", "--prompt") if getattr(args, flag[2:]) is None]
    if missing:
        raise Failure("usage", f"{' and '.join(missing)} required (or --resume TASK_ID)", exit_code=EXIT_USAGE)
    result = validate(request_body(args))
    if result.request is None or not result.valid:
        problems = tuple(p.as_dict() for p in result.problems)
        noun = "problem" if len(problems) == 1 else "problems"
        message = f"the request is invalid ({len(problems)} {noun}); nothing was sent"
        raise Failure("invalid_request", message, errors=problems)
    return Checked(result.request.body, [w.as_dict() for w in result.warnings])


def _gateway(args: argparse.Namespace) -> tuple[str, str | None]:
    """The gateway's base URL and key, from the flags or the environment."""
    url = (args.url or os.environ.get("KLING_GATEWAY_URL") or "").strip().rstrip("/")
    if not url:
        raise Failure("config", "no gateway: set KLING_GATEWAY_URL or pass --url", exit_code=EXIT_USAGE)
    if not url.startswith(("http://", "https://")):
        raise Failure("config", f"gateway URL must start with http:// or https://: {url!r}", exit_code=EXIT_USAGE)
    key = (args.key or os.environ.get("KLING_GATEWAY_KEY") or "").strip() or None
    return url, key


def _client(url: str, key: str | None) -> httpx.Client:
    import httpx

    headers = {"User-Agent": "kling-gateway-generate"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=url, headers=headers, timeout=_timeout())


def _timeout() -> httpx.Timeout:
    import httpx

    return httpx.Timeout(_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S)


# -- output -----------------------------------------------------------------------------------------------------


@dataclass
class Output:
    """Where results, progress and errors go: plain lines or one JSON object; a live bar only on a terminal."""

    as_json: bool
    stdout: TextIO
    stderr: TextIO
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.stderr.isatty()

    def put(self, name: str, value: Any) -> None:
        """Record a result; plain output prints it at once as ``name: value``."""
        self.result[name] = value
        if not self.as_json and value is not None:
            print(f"{name}: {value}", file=self.stdout, flush=True)

    def note(self, line: str) -> None:
        """A human-only line (hints, warnings) on standard error; silent with ``--json``."""
        if not self.as_json:
            print(line, file=self.stderr, flush=True)

    def done(self) -> int:
        if self.as_json:
            self._emit({"ok": True, **self.result})
        return EXIT_OK

    def fail(self, failure: Failure) -> int:
        if self.as_json:
            self._emit({"ok": False, **self.result, "error": failure.as_dict()})
        else:
            print("\n".join(f"kling-gateway generate: {line}" for line in failure.lines()), file=self.stderr)
        return failure.exit_code

    def _emit(self, obj: dict[str, Any]) -> None:
        self.stdout.write(orjson.dumps(obj).decode() + "\n")
        self.stdout.flush()

    @contextmanager
    def progress(self, label: str, total: float | None, *, transfer: bool = False) -> Iterator[Callable[..., None]]:
        """A progress display; yields ``update(completed, description=None)``."""
        if self.live:
            with _rich_bar(self.stderr, label, total, transfer) as update:
                yield update
        elif self.as_json or transfer:
            yield _ignore
        else:
            yield PlainProgress(self.stderr, label)


def _ignore(completed: float | None, description: str | None = None) -> None:
    """No progress to show (``--json``, or a download without a terminal)."""


class PlainProgress:
    """Progress as plain lines, one each time the status or the percentage changes."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream, self.label = stream, label
        self.started = time.monotonic()
        self.shown: tuple[str, float | None] | None = None

    def __call__(self, completed: float | None, description: str | None = None) -> None:
        now = (description or self.label, completed)
        if now != self.shown:
            self.shown = now
            print(progress_line(now[0], completed, time.monotonic() - self.started), file=self.stream, flush=True)


@contextmanager
def _rich_bar(stream: TextIO, label: str, total: float | None, transfer: bool) -> Iterator[Callable[..., None]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    columns: list[Any] = [TextColumn("{task.description:<12}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if transfer else [TaskProgressColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=Console(file=stream)) as bar:
        task = bar.add_task(label, total=total)

        def update(completed: float | None, description: str | None = None) -> None:
            bar.update(task, completed=completed or 0, description=description or label)

        yield update


# -- the job ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One run of the command: submit (or resume), follow, download."""

    client: httpx.Client
    out: Output
    interval: float
    out_file: str | None
    sleep: Callable[[float], None] = time.sleep
    task_id: str | None = None

    def run(self, request: Checked | None, *, resume: str | None, wait: bool, idem_key: str | None) -> int:
        try:
            if request is not None:
                for warning in request.warnings:
                    self.out.note(f"warning: {warning['param']}: {warning['message']}")
                if request.warnings:
                    self.out.result["warnings"] = request.warnings
                task = self.submit(request.body, idem_key or str(uuid.uuid4()))
            else:
                self.task_id = resume
                task = self.poll_once()
                self.out.put("task_id", self.task_id)
            if wait:
                task = self.follow(task)
            self.out.put("status", task.get("status"))
            self.out.result["progress"] = task.get("progress")
            if task.get("status") == "failed":
                raise _task_failed(task)
            if task.get("status") != "completed":
                self.out.note(f"follow it with: {resume_command(self.task_id or '?', self.out_file)}")
                return self.out.done()
            self.out.put("video_url", task.get("video_url"))
            if self.out_file:
                size = self.download(str(task.get("video_url") or ""), Path(self.out_file))
                self.out.put("file", self.out_file)
                self.out.put("bytes", size)
            return self.out.done()
        except Failure as failure:
            return self.out.fail(failure)
        except KeyboardInterrupt:
            return self.interrupted()

    def interrupted(self) -> int:
        idem_key = self.out.result.get("idempotency_key")
        if self.task_id is None:
            hint = "interrupted before the gateway answered; the task may exist already."
            if idem_key:
                hint += f" Repeat the command with --idempotency-key {idem_key} to get it without a second submission."
        else:
            resume = resume_command(self.task_id, self.out_file)
            self.out.result["resume"] = resume
            hint = f"interrupted; task {self.task_id} keeps running. Resume with: {resume}"
        if not self.out.as_json:
            print(f"\nkling-gateway generate: {hint}", file=self.out.stderr, flush=True)
        failure = Failure("interrupted", hint, exit_code=EXIT_INTERRUPTED)
        return self.out.fail(failure) if self.out.as_json else EXIT_INTERRUPTED

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request repeated, politely, while the gateway is busy or unreachable."""
        import httpx

        attempt = 0
        while True:
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                failure = Failure("unreachable", f"cannot reach the gateway at {self.client.base_url}: {exc}")
                if isinstance(exc, httpx.ConnectError) and self.task_id is None:
                    raise failure from None  # nothing is running yet: a wrong URL or a stopped gateway, say so now
                status, retry_after = None, None
            else:
                if response.status_code < 400:
                    return response
                status = response.status_code
                retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
                failure = gateway_failure(status, response.content)
                if status == 409 and failure.code == "idempotency_in_progress":
                    status = 503  # the first submission is still being answered: wait as for a busy gateway
            delay = next_delay(status, retry_after, interval=self.interval, attempt=attempt)
            if delay is None:
                raise failure
            self.out.note(f"  {failure.code}: retrying in {delay:g} s")
            self.sleep(delay)
            attempt += 1

    def submit(self, body: dict[str, Any], idem_key: str) -> dict[str, Any]:
        self.out.result["idempotency_key"] = idem_key
        response = self.request("POST", SUBMIT_PATH, json=body, headers={"Idempotency-Key": idem_key})
        task = _json_object(response)
        task_id = task.get("task_id") or task.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise Failure("invalid_response", "the gateway accepted the request but named no task id")
        self.task_id = task_id
        self.out.put("task_id", task_id)
        self.out.result["model"] = body.get("model")
        return task

    def poll_once(self) -> dict[str, Any]:
        return _json_object(self.request("GET", f"/v1/videos/{self.task_id}"))

    def follow(self, task: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        with self.out.progress("queued", 100) as update:
            while True:
                update(task.get("progress"), task.get("status"))
                if task.get("status") in TERMINAL:
                    break
                self.sleep(self.interval)
                task = self.poll_once()
        self.out.result["elapsed_s"] = round(time.monotonic() - started, 1)
        return task

    def download(self, video_url: str, path: Path) -> int:
        """Save the video to ``path`` (via a ``.part`` file); the number of bytes written."""
        part = path.with_name(path.name + ".part")
        try:
            size = self._download_content(part)
            if size is None:  # this gateway has no content route: fetch the task's video_url, without our key
                if not video_url.startswith(("http://", "https://")):
                    raise Failure("video_unavailable", "the task completed without a downloadable video_url")
                import httpx

                with httpx.Client(timeout=_timeout(), follow_redirects=True) as plain:
                    size = self._save(plain, "GET", video_url, part)
            part.replace(path)
            return size
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def _download_content(self, part: Path) -> int | None:
        """The bytes of ``/v1/videos/{id}/content`` saved to ``part``; None when the gateway answers 404.

        ``video_not_ready`` is waited out like a busy gateway (429/503, honouring ``Retry-After``) and a broken
        transfer is started again, up to ``MAX_ATTEMPTS`` times.
        """
        attempt = 0
        while True:
            try:
                return self._save(self.client, "GET", f"/v1/videos/{self.task_id}/content", part)
            except Failure as failure:
                if failure.http_status == 404:
                    return None
                status = 503 if failure.code == "video_not_ready" else failure.http_status
                delay = next_delay(status, failure.retry_after, interval=self.interval, attempt=attempt)
                if delay is None:
                    raise
                self.out.note(f"  {failure.code}: retrying the download in {delay:g} s")
                self.sleep(delay)
                attempt += 1

    def _save(self, client: httpx.Client, method: str, url: str, part: Path) -> int:
        import httpx

        try:
            with client.stream(method, url) as response:
                if response.status_code != 200:
                    failure = gateway_failure(response.status_code, response.read())
                    failure.retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
                    raise failure
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                written = 0
                with part.open("wb") as sink, self.out.progress("download", total, transfer=True) as update:
                    for chunk in response.iter_bytes(_CHUNK):
                        sink.write(chunk)
                        written += len(chunk)
                        update(written)
        except httpx.TransportError as exc:
            raise Failure("download_failed", f"the download broke off: {exc}") from None
        except OSError as exc:
            raise Failure("cannot_write", f"{part.with_suffix('')}: {exc.strerror or exc}") from None
        if total is not None and written != total:
            raise Failure("download_failed", f"got {written} of {total} bytes")
        return written


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        obj = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise Failure("invalid_response", f"the gateway answered HTTP {response.status_code} without a JSON object")
    return obj


def _task_failed(task: dict[str, Any]) -> Failure:
    error = task.get("error")
    if not isinstance(error, dict):
        error = {}
    return Failure(
        code=str(error.get("code") or "task_failed"),
        message=str(error.get("message") or "the task failed"),
    )
