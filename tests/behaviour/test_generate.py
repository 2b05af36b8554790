"""``kling-gateway generate`` against real servers on loopback: a gateway backed by the sandbox, or a scripted fake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.harness import SANDBOX_API_KEY
from support.loopback import Stack, serve_stack
from support.upstream_fake import FakeUpstream, dynamic, hang, text
from support.upstream_fake import json as json_answer

from gateway.cli.main import main
from gateway.sandbox import mp4_bytes

FOX = ["--model", "kling-v3-std-silent", "--prompt", "a red fox in the snow", "--duration", "5"]
FAST = ["--poll-interval", "0.5"]


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A gateway + sandbox on loopback, named to the CLI through KLING_GATEWAY_URL / KLING_GATEWAY_KEY."""
    with serve_stack(tmp_path / "data") as served:
        monkeypatch.setenv("KLING_GATEWAY_URL", served.url)
        monkeypatch.setenv("KLING_GATEWAY_KEY", served.key)
        yield served


@pytest.fixture
def fake_gateway(fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> FakeUpstream:
    """The scripted fake server standing in for a gateway (for refusals a real one will not make on demand)."""
    monkeypatch.setenv("KLING_GATEWAY_URL", fake_upstream.url)
    monkeypatch.setenv("KLING_GATEWAY_KEY", "gk_fake")
    return fake_upstream


def generate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``kling-gateway generate ARGV`` in process: exit code, standard output, standard error."""
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fields(out: str) -> dict[str, str]:
    """The ``name: value`` lines of plain output."""
    return dict(line.split(": ", 1) for line in out.splitlines())


SUBMITTED = {"id": "task_1", "task_id": "task_1", "object": "video.generation.job", "status": "queued", "progress": 0}


def status(state: str, progress: int, **extra: Any) -> dict[str, Any]:
    return {**SUBMITTED, "status": state, "progress": progress, **extra}


class TestLocalValidation:
    def test_invalid_request_never_leaves_the_machine(
        self, fake_gateway: FakeUpstream, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every problem is listed with its code, exit 1, and not one request is made."""
        code, out, err = generate(
            capsys, "--model", "kling-v3-std-silent", "--duration", "30", "--prompt", "x", "--cfg-scale", "2"
        )
        assert code == 1 and out == ""
        assert "the request is invalid (2 problems); nothing was sent" in err
        assert "duration: " in err and "[duration_out_of_range]" in err
        assert "extra_body.cfg_scale: " in err and "[cfg_scale_out_of_range]" in err
        assert fake_gateway.requests == []

    def test_invalid_as_json(self, fake_gateway: FakeUpstream, capsys: pytest.CaptureFixture[str]) -> None:
        """With --json the problems come back as one JSON object on standard output, nothing on standard error."""
        code, out, err = generate(
            capsys, "--model", "kling-v3-pro", "--prompt", "x", "--image", "http://127.0.0.1/a.png", "--json"
        )
        report = json.loads(out)
        assert code == 1 and err == ""
        assert report["ok"] is False and report["error"]["code"] == "invalid_request"
        assert {e["code"] for e in report["error"]["errors"]} == {"unknown_model", "private_media_url"}
        assert fake_gateway.requests == []

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--prompt", "x"], "--model required"),
            ([], "--model and --prompt required"),
            (["--resume", "task_1", "--model", "kling-v3-std-silent"], "drop --model"),
            (["--resume", "a/b"], "not a task id"),
            (["--resume", "task_1", "--idempotency-key", "k"], "drop --idempotency-key"),
            ([*FOX, "--poll-interval", "0.1"], "--poll-interval: at least 0.5"),
        ],
    )
    def test_usage_errors_exit_2(
        self, fake_gateway: FakeUpstream, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
    ) -> None:
        """Flags that do not make a request are usage errors (exit 2), before any network call."""
        code, _, err = generate(capsys, *argv)
        assert code == 2 and message in err
        assert fake_gateway.requests == []

    @pytest.mark.parametrize(("url", "message"), [("", "set KLING_GATEWAY_URL"), ("ftp://x", "must start with http")])
    def test_no_gateway_exit_2(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, message: str
    ) -> None:
        """Without a usable gateway URL it is a configuration error (exit 2)."""
        monkeypatch.setenv("KLING_GATEWAY_URL", url)
        code, _, err = generate(capsys, *FOX)
        assert code == 2 and message in err


class TestThroughTheGateway:
    def test_submit_and_wait_to_completion(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        """Submitted with the key and an Idempotency-Key, followed to completed; progress lines go to stderr."""
        code, out, err = generate(capsys, *FOX, "--wait", *FAST)
        result = fields(out)
        assert code == 0, err
        assert result["status"] == "completed" and result["task_id"].startswith("task_")
        assert result["video_url"].endswith(f"/sandbox/files/{result['task_id']}.mp4")
        (post,) = stack.gateway.to("POST", "/v1/video/generations")
        assert post.headers["authorization"] == f"Bearer {stack.key}"
        assert len(post.headers["idempotency-key"]) == 36  # a fresh UUID
        assert post.json() == {"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}
        lines = err.splitlines()
        assert lines[0].startswith("queued") and lines[-1].startswith("completed    100%")
        polls = stack.gateway.to("GET", f"/v1/videos/{result['task_id']}")
        assert len(polls) >= 1

    def test_json_shape(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints exactly one JSON object, and nothing else, when the task ends."""
        code, out, err = generate(capsys, *FOX, "--wait", "--json", *FAST)
        assert code == 0 and err == "" and out.count("\n") == 1
        report = json.loads(out)
        assert set(report) == {
            "ok",
            "task_id",
            "status",
            "progress",
            "model",
            "video_url",
            "idempotency_key",
            "elapsed_s",
        }
        assert (report["ok"], report["status"], report["progress"], report["model"]) == (
            True,
            "completed",
            100,
            "kling-v3-std-silent",
        )
        (post,) = stack.gateway.to("POST", "/v1/video/generations")
        assert post.headers["idempotency-key"] == report["idempotency_key"]

    def test_warnings_are_reported(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        """A local validation warning (aspect ratio in image mode) is shown, and listed in the JSON, yet submitted."""
        image = ["--image", "https://example.com/start-frame.png", "--aspect-ratio", "16:9"]
        code, out, err = generate(capsys, *FOX, *image)
        assert code == 0 and "warning: aspect_ratio: " in err
        code, out, _ = generate(capsys, *FOX, *image, "--json")
        assert [w["code"] for w in json.loads(out)["warnings"]] == ["aspect_ratio_not_guaranteed"]
        assert len(stack.gateway.to("POST", "/v1/video/generations")) == 2

    def test_given_idempotency_key_is_sent_and_replays(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        """--idempotency-key is sent as is; repeating the command returns the same task, submitted upstream once."""
        first = generate(capsys, *FOX, "--idempotency-key", "order-42", "--json")
        second = generate(capsys, *FOX, "--idempotency-key", "order-42", "--json")
        assert first[0] == second[0] == 0
        assert json.loads(first[1])["task_id"] == json.loads(second[1])["task_id"]
        assert [r.headers["idempotency-key"] for r in stack.gateway.to("POST", "/v1/video/generations")] == [
            "order-42"
        ] * 2
        assert len(stack.upstream.to("POST", "/v1/video/generations")) == 1

    def test_out_downloads_the_video(self, stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--out waits, then saves the video's exact bytes through the gateway's content route."""
        target = tmp_path / "fox.mp4"
        code, out, err = generate(capsys, *FOX, "--out", str(target), *FAST)
        result = fields(out)
        assert code == 0, err
        assert target.read_bytes() == mp4_bytes(5)
        assert result["file"] == str(target) and result["bytes"] == str(len(mp4_bytes(5)))
        assert not (tmp_path / "fox.mp4.part").exists()
        assert stack.gateway.to("GET", f"/v1/videos/{result['task_id']}/content")
        # The gateway fetched the file from the upstream's own origin with the account's key; the client's gateway
        # key never left the gateway.
        (fetch,) = stack.upstream.to("GET", f"/sandbox/files/{result['task_id']}.mp4")
        assert fetch.headers["authorization"] == f"Bearer {SANDBOX_API_KEY}"
        assert stack.key not in str(fetch.headers)

    def test_resume_follows_without_submitting(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        """A task submitted without --wait is followed later by --resume; nothing is submitted again."""
        code, out, _ = generate(capsys, *FOX)
        task_id = fields(out)["task_id"]
        assert code == 0 and fields(out)["status"] == "queued"
        code, out, err = generate(capsys, "--resume", task_id, "--wait", "--json", *FAST)
        report = json.loads(out)
        assert code == 0, err
        assert (report["task_id"], report["status"]) == (task_id, "completed")
        assert len(stack.gateway.to("POST", "/v1/video/generations")) == 1

    def test_failed_task_exit_1(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        """A task that fails ends with exit 1 and the task's own error."""
        code, out, err = generate(
            capsys, "--model", "kling-v3-std-silent", "--prompt", "[sandbox:fail]", "--wait", *FAST
        )
        assert code == 1 and fields(out)["status"] == "failed"
        assert "The video generation failed (sandbox). [generation_failed]" in err

    def test_gateway_refusals_are_shown(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The gateway's error (message, code, status) is shown as it said it: a model not allowed, a bad key."""
        with serve_stack(tmp_path / "data", models="kling-v3-pro-*") as served:
            monkeypatch.setenv("KLING_GATEWAY_URL", served.url)
            monkeypatch.setenv("KLING_GATEWAY_KEY", served.key)
            code, _, err = generate(capsys, *FOX)
            assert code == 1 and "[model_not_allowed, HTTP 403]" in err
            code, out, _ = generate(capsys, *FOX, "--json", "--key", "gk_not-a-key")
            report = json.loads(out)
            assert code == 1 and report["ok"] is False and "task_id" not in report
            assert (report["error"]["http_status"], report["error"]["code"]) == (401, "invalid_api_key")

    def test_unknown_task_on_resume(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        """Resuming a task the gateway does not know (or that is another key's) is the gateway's 404, exit 1."""
        code, _, err = generate(capsys, "--resume", "task_nope", "--wait")
        assert code == 1 and "HTTP 404" in err


class TestUnreachable:
    def test_no_gateway_listening_fails_at_once(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A gateway that refuses connections before anything was submitted is exit 1 at once, naming the URL."""
        url = FakeUpstream.closed_port()
        monkeypatch.setenv("KLING_GATEWAY_URL", url)
        started = time.monotonic()
        code, out, err = generate(capsys, *FOX, "--json")
        report = json.loads(out)
        assert code == 1 and err == "" and time.monotonic() - started < 5
        assert report["error"]["code"] == "unreachable" and url in report["error"]["message"]
        assert "task_id" not in report and len(report["idempotency_key"]) == 36


class TestPoliteness:
    def test_retry_after_is_honoured(self, fake_gateway: FakeUpstream, capsys: pytest.CaptureFixture[str]) -> None:
        """429 and 503 with Retry-After are waited out (not the shorter poll interval); the retry reuses the key."""
        busy = {"error": {"message": "Slow down.", "type": "rate_limit_error", "code": "rate_limited"}}
        fake_gateway.script(
            "POST",
            "/v1/video/generations",
            json_answer(429, busy, headers={"Retry-After": "2"}),
            json_answer(200, SUBMITTED),
        )
        fake_gateway.script(
            "GET",
            "/v1/videos/task_1",
            json_answer(503, busy, headers={"Retry-After": "1"}),
            json_answer(200, status("completed", 100, video_url="https://cdn.example/v.mp4")),
        )
        started = time.monotonic()
        code, out, err = generate(capsys, *FOX, "--wait", *FAST)
        elapsed = time.monotonic() - started
        assert code == 0, err
        assert fields(out)["status"] == "completed"
        assert elapsed >= 3.0  # 2 s + 1 s asked for, where the poll interval alone would be 1 s
        assert "rate_limited: retrying in 2 s" in err
        first, again = fake_gateway.requests_to("POST", "/v1/video/generations")
        assert first.header("idempotency-key") == again.header("idempotency-key")
        assert fake_gateway.calls("GET", "/v1/videos/task_1") == 2

    def test_a_long_retry_after_is_reported_not_waited(
        self, fake_gateway: FakeUpstream, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A budget exhausted for the month (Retry-After of days) stops at once with the gateway's message."""
        spent = {
            "error": {"message": "Monthly budget exhausted.", "type": "rate_limit_error", "code": "budget_exceeded"}
        }
        fake_gateway.always("POST", "/v1/video/generations", json_answer(429, spent, headers={"Retry-After": "864000"}))
        started = time.monotonic()
        code, _, err = generate(capsys, *FOX)
        assert code == 1 and time.monotonic() - started < 2
        assert "Monthly budget exhausted. [budget_exceeded, HTTP 429]" in err
        assert fake_gateway.calls("POST", "/v1/video/generations") == 1


class TestDownloads:
    def test_content_route_preferred_and_not_ready_waited(
        self, fake_gateway: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The gateway's /content is used when it exists; 409 video_not_ready and 429 are waited out; no video_url."""
        video = b"\x00\x00\x00\x18ftypisom" + bytes(1000)
        fake_gateway.script("POST", "/v1/video/generations", json_answer(200, SUBMITTED))
        done = status("completed", 100, video_url=f"{fake_gateway.url}/cdn/v.mp4")
        fake_gateway.always("GET", "/v1/videos/task_1", json_answer(200, done))
        not_ready = {"error": {"message": "Not yet.", "type": "invalid_request_error", "code": "video_not_ready"}}
        busy = {"error": {"message": "Slow down.", "type": "rate_limit_error", "code": "rate_limited"}}
        fake_gateway.script(
            "GET",
            "/v1/videos/task_1/content",
            json_answer(409, not_ready),
            json_answer(429, busy, headers={"Retry-After": "1"}),
            text(200, video, content_type="video/mp4"),
        )
        target = tmp_path / "v.mp4"
        code, _, err = generate(capsys, *FOX, "--out", str(target), *FAST)
        assert code == 0, err
        assert target.read_bytes() == video
        assert fake_gateway.calls("GET", "/v1/videos/task_1/content") == 3
        assert "video_not_ready: retrying the download in 0.5 s" in err
        assert "rate_limited: retrying the download in 1 s" in err
        assert fake_gateway.calls("GET", "/cdn/v.mp4") == 0

    def test_fallback_on_404_and_short_body_is_an_error(
        self, fake_gateway: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """404 on /content falls back to video_url (no Authorization sent); a truncated transfer leaves no file."""
        fake_gateway.script("POST", "/v1/video/generations", json_answer(200, SUBMITTED))
        done = status("completed", 100, video_url=f"{fake_gateway.url}/cdn/v.mp4")
        fake_gateway.always("GET", "/v1/videos/task_1", json_answer(200, done))
        fake_gateway.always("GET", "/v1/videos/task_1/content", json_answer(404, {"error": {"code": "not_found"}}))
        fake_gateway.always(
            "GET",
            "/cdn/",
            dynamic(lambda r: text(200, b"x" * 10, "video/mp4", headers={"X-Auth": r.header("authorization") or "-"})),
        )
        target = tmp_path / "v.mp4"
        code, out, err = generate(capsys, *FOX, "--out", str(target), *FAST)
        assert code == 0, err
        assert target.read_bytes() == b"x" * 10 and fields(out)["bytes"] == "10"
        (fetch,) = fake_gateway.requests_to("GET", "/cdn/v.mp4")
        assert fetch.header("authorization") is None


def interrupt_while_waiting(fake: FakeUpstream, *argv: str) -> tuple[int, str, str]:
    """Run generate as a subprocess against ``fake``, SIGINT it once it is polling: exit code, stdout, stderr."""
    fake.script("POST", "/v1/video/generations", json_answer(200, SUBMITTED))
    fake.always("GET", "/v1/videos/task_1", json_answer(200, status("in_progress", 40)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_"))}
    env.update(KLING_GATEWAY_URL=fake.url, KLING_GATEWAY_KEY="gk_fake")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "generate", *FOX, *argv, *FAST],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        fake.wait_for_calls("GET", "/v1/videos/task_1", 2, within_s=20)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


class TestInterrupt:
    def test_ctrl_c_leaves_the_task_and_says_how_to_resume(self, fake_upstream: FakeUpstream, tmp_path: Path) -> None:
        """SIGINT while waiting: exit 130, the task id and the exact resume command on stderr, no file."""
        target = tmp_path / "v.mp4"
        code, out, err = interrupt_while_waiting(fake_upstream, "--out", str(target))
        assert code == 130
        assert "task_id: task_1" in out
        resume = f"kling-gateway generate --resume task_1 --wait --out {target}"
        assert f"task task_1 keeps running. Resume with: {resume}" in err
        assert "Traceback" not in err
        assert not target.exists() and not (tmp_path / "v.mp4.part").exists()
        assert fake_upstream.calls("POST", "/v1/video/generations") == 1  # nothing was cancelled or resubmitted

    def test_ctrl_c_with_json(self, fake_upstream: FakeUpstream) -> None:
        """With --json the interruption is one JSON object naming the task and the resume command."""
        code, out, err = interrupt_while_waiting(fake_upstream, "--wait", "--json")
        report = json.loads(out)
        assert code == 130 and err == ""
        assert (report["ok"], report["task_id"], report["error"]["code"]) == (False, "task_1", "interrupted")
        assert report["resume"] == "kling-gateway generate --resume task_1 --wait"

    def test_ctrl_c_during_submission_names_the_idempotency_key(self, fake_upstream: FakeUpstream) -> None:
        """SIGINT before the gateway answered: the hint gives the Idempotency-Key that repeats it safely."""
        fake_upstream.always("POST", "/v1/video/generations", hang())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_"))}
        env.update(KLING_GATEWAY_URL=fake_upstream.url)
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "generate", *FOX, "--idempotency-key", "order-7"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            fake_upstream.wait_for_calls("POST", "/v1/video/generations", 1, within_s=20)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 130 and "task_id" not in out
        assert "Repeat the command with --idempotency-key order-7" in err
