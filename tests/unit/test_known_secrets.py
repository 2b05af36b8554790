"""The secrets an app masks: fixed ones, upstream keys loaded later, rotated-out keys kept masked for a while."""

from __future__ import annotations

import io

from gateway.known_secrets import MAX_RETIRED, RETIRED_KEEP_S, KnownSecrets
from gateway.logs import REDACTED, make_logs


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_new_keys_join_and_rotated_out_ones_stay_for_a_while() -> None:
    """A rotated-in key is masked at once; the one it replaced until RETIRED_KEEP_S has passed."""
    clock = Clock()
    known = KnownSecrets(["adm-token-1234", "ab"], clock=clock)  # too short to mask: left out
    assert known.values == ("adm-token-1234",)
    known.upstream_keys(["sk-old-1"])
    version = known.version
    known.upstream_keys(["sk-new-22"])
    assert known.version > version
    assert known.values == ("adm-token-1234", "sk-new-22", "sk-old-1")  # longest first
    assert known.upstream == ("sk-new-22", "sk-old-1")  # what an upstream answer can echo
    clock.now += RETIRED_KEEP_S + 1
    known.upstream_keys(["sk-new-22", "sk-third-3"])
    assert "sk-old-1" not in known.values
    assert {"sk-new-22", "sk-third-3"} <= set(known.values)


def test_the_same_keys_again_change_nothing() -> None:
    known = KnownSecrets()
    known.upstream_keys(["sk-a-1234"])
    version = known.version
    known.upstream_keys(["sk-a-1234"])
    assert known.version == version


def test_retired_keys_are_bounded() -> None:
    """An automation rotating every second cannot make every log line scan thousands of keys."""
    known = KnownSecrets()
    for n in range(MAX_RETIRED + 10):
        known.upstream_keys([f"sk-key-{n:05d}"])
    assert len(known.values) == MAX_RETIRED + 1
    assert f"sk-key-{MAX_RETIRED + 9:05d}" in known.values  # the current one
    assert "sk-key-00000" not in known.values  # the oldest retired one went first


def test_log_lines_mask_keys_added_after_the_logger_was_built() -> None:
    """Event and access lines both see a key added later."""
    stream = io.StringIO()
    known = KnownSecrets(["sk-first-key"])
    logs = make_logs(stream=stream, secrets=known)
    known.upstream_keys(["sk-later-key"])
    logs.log.error("upstream_said", detail="echo sk-later-key and sk-first-key")
    logs.access({"request_id": "r", "note": "x sk-later-key y"})
    out = stream.getvalue()
    assert "sk-later-key" not in out and "sk-first-key" not in out
    assert out.count(REDACTED) == 3
