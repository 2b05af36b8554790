"""Tables for gateway.keys: key format and checksum, hashing, model globs, records and the rate limiter."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from decimal import Decimal

import pytest

from gateway.auth.rate_limits import RateLimiter
from gateway.keys import (
    KEY_PREFIX,
    ROTATION_GRACE_S,
    KeyRecord,
    display_prefix,
    generate_secret,
    hash_secret,
    issue_key,
    looks_like_key,
    model_allowed,
    new_secret,
    parse_model_globs,
    validate_key_name,
)


class FakeClock:
    """A settable clock for the rate limiter."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TestSecrets:
    def test_shape(self) -> None:
        """A secret is gk_ + 49 URL-safe characters and passes its own checksum."""
        for _ in range(200):
            secret = generate_secret()
            assert secret.startswith(KEY_PREFIX)
            assert len(secret) == 52
            assert re.fullmatch(r"gk_[A-Za-z0-9_-]{49}", secret)
            assert looks_like_key(secret)

    def test_unique(self) -> None:
        """Secrets never repeat."""
        assert len({generate_secret() for _ in range(1000)}) == 1000

    @pytest.mark.parametrize(
        "mutate",
        [
            pytest.param(lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"), id="checksum-char-changed"),
            pytest.param(lambda s: s[:10] + ("x" if s[10] != "x" else "y") + s[11:], id="body-char-changed"),
            pytest.param(lambda s: s[:-1], id="truncated"),
            pytest.param(lambda s: s + "A", id="extended"),
            pytest.param(lambda s: "gx_" + s[3:], id="wrong-prefix"),
            pytest.param(lambda s: s.upper(), id="upper-cased"),
            pytest.param(lambda s: s[:20] + "+" + s[21:], id="non-urlsafe-char"),
            pytest.param(lambda s: s[:20] + "é" + s[21:], id="non-ascii"),
            pytest.param(lambda s: "", id="empty"),
            pytest.param(lambda s: "sk-" + s[3:], id="upstream-style"),
        ],
    )
    def test_malformed_rejected(self, mutate: Callable[[str], str]) -> None:
        """Anything but an intact generated key fails looks_like_key."""
        for _ in range(20):
            secret = generate_secret()
            assert looks_like_key(secret)
            assert not looks_like_key(mutate(secret))

    def test_hash_is_sha256_hex(self) -> None:
        """Only the SHA-256 hex of a secret is stored."""
        secret = generate_secret()
        assert hash_secret(secret) == hashlib.sha256(secret.encode()).hexdigest()
        assert len(hash_secret(secret)) == 64

    def test_display_prefix(self) -> None:
        """The display prefix is the first 10 characters."""
        secret = generate_secret()
        assert display_prefix(secret) == secret[:10]
        assert display_prefix(secret).startswith("gk_")

    def test_new_secret_consistent(self) -> None:
        """new_secret derives hash and prefix from the same secret."""
        fresh = new_secret()
        assert fresh.key_hash == hash_secret(fresh.secret)
        assert fresh.prefix == display_prefix(fresh.secret)


class TestNames:
    @pytest.mark.parametrize("name", ["team-a", "a", "Team_B.prod", "x" * 64, "0team"])
    def test_valid(self, name: str) -> None:
        """Plain names of 1-64 characters are accepted."""
        assert validate_key_name(name) == name

    @pytest.mark.parametrize("name", ["", "-team", ".x", "x" * 65, "team a", "team/a", 'a"b', "tëam", "a\nb"])
    def test_invalid(self, name: str) -> None:
        """Names that would be awkward in labels, logs or URLs are refused."""
        with pytest.raises(ValueError, match="key name"):
            validate_key_name(name)


class TestModelGlobs:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("", ()),
            ("  ", ()),
            ("kling-v3-std-*", ("kling-v3-std-*",)),
            ("a,b", ("a", "b")),
            (" kling-v3-std-* , kling-v3-pro-audio,", ("kling-v3-std-*", "kling-v3-pro-audio")),
            ("a,a,b", ("a", "b")),
            ("kling-v3-[sp]*-silent", ("kling-v3-[sp]*-silent",)),
        ],
    )
    def test_parse(self, text: str, expected: tuple[str, ...]) -> None:
        """Comma-separated globs, trimmed, deduplicated, in order."""
        assert parse_model_globs(text) == expected

    @pytest.mark.parametrize("text", ["kling v3", "a;b", "model'", "x\ty"])
    def test_parse_rejects(self, text: str) -> None:
        """Patterns with spaces or punctuation outside model IDs and glob syntax are refused."""
        with pytest.raises(ValueError, match="invalid model pattern"):
            parse_model_globs(text)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("k" * 129, "model pattern longer than 128 characters"),
            (",".join(f"m{n}" for n in range(65)), "at most 64 model patterns per key, got 65"),
        ],
    )
    def test_parse_bounds(self, text: str, message: str) -> None:
        """A key's allowlist is matched on every request: its size is bounded."""
        assert len(parse_model_globs("k" * 128)) == 1
        assert len(parse_model_globs(",".join(f"m{n}" for n in range(64)))) == 64
        with pytest.raises(ValueError, match=message):
            parse_model_globs(text)

    @pytest.mark.parametrize(
        ("patterns", "model", "allowed"),
        [
            ((), "kling-v3-pro-audio", True),
            (("kling-v3-std-*",), "kling-v3-std-silent", True),
            (("kling-v3-std-*",), "kling-v3-std-audio", True),
            (("kling-v3-std-*",), "kling-v3-pro-audio", False),
            (("kling-v3-std-silent",), "kling-v3-std-silent", True),
            (("kling-v3-std-silent",), "kling-v3-std-silent-x", False),
            (("kling-v3-std-*", "kling-v3-pro-audio"), "kling-v3-pro-audio", True),
            (("kling-v3-std-*", "kling-v3-pro-audio"), "kling-v3-pro-silent", False),
            (("*-audio",), "kling-v3-pro-audio", True),
            (("KLING-v3-*",), "kling-v3-pro-audio", False),
            (("kling-v3-?td-silent",), "kling-v3-std-silent", True),
            (("*",), "anything", True),
        ],
    )
    def test_allowed(self, patterns: tuple[str, ...], model: str, allowed: bool) -> None:
        """fnmatch-style, case-sensitive matching; an empty allowlist allows everything."""
        assert model_allowed(patterns, model) is allowed


class TestKeyRecord:
    NOW = 1_700_000_000.0

    def record(self, **changes: object) -> KeyRecord:
        base: dict[str, object] = {
            "name": "team-a",
            "key_hash": "c" * 64,
            "prefix": "gk_abcdefg",
            "created_at": self.NOW - 100,
        }
        base.update(changes)
        return KeyRecord(**base)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("changes", "presented", "at", "accepted"),
        [
            pytest.param({}, "c" * 64, NOW, True, id="current"),
            pytest.param({}, "d" * 64, NOW, False, id="unknown-hash"),
            pytest.param({"revoked_at": NOW - 1}, "c" * 64, NOW, False, id="revoked"),
            pytest.param(
                {"previous_hash": "p" * 64, "previous_valid_until": NOW + 10},
                "p" * 64,
                NOW,
                True,
                id="in-grace",
            ),
            pytest.param(
                {"previous_hash": "p" * 64, "previous_valid_until": NOW + 10},
                "p" * 64,
                NOW + 10,
                False,
                id="grace-ended",
            ),
            pytest.param(
                {"previous_hash": "p" * 64, "previous_valid_until": NOW + 10},
                "c" * 64,
                NOW + 99999,
                True,
                id="current-after-grace",
            ),
            pytest.param(
                {"previous_hash": "p" * 64, "previous_valid_until": NOW + 10, "revoked_at": NOW - 1},
                "p" * 64,
                NOW,
                False,
                id="revoked-in-grace",
            ),
            pytest.param({"previous_hash": "p" * 64}, "p" * 64, NOW, False, id="previous-without-deadline"),
        ],
    )
    def test_accepts(self, changes: dict[str, object], presented: str, at: float, accepted: bool) -> None:
        """Current hash while not revoked; previous hash only within its grace period."""
        assert self.record(**changes).accepts(presented, at) is accepted

    def test_allows_model(self) -> None:
        """The record applies its own allowlist."""
        record = self.record(models=("kling-v3-std-*",))
        assert record.allows_model("kling-v3-std-audio")
        assert not record.allows_model("kling-v3-pro-audio")

    def test_frozen(self) -> None:
        """Records are immutable."""
        record = self.record()
        with pytest.raises(AttributeError):
            record.name = "other"  # type: ignore[misc]

    def test_rotation_grace_default(self) -> None:
        """The documented default grace is 24 hours."""
        assert ROTATION_GRACE_S == 86400.0


class TestIssueKey:
    def test_issue(self) -> None:
        """issue_key returns the secret once and a record holding only its hash."""
        secret, record = issue_key(
            "team-a", now=5.0, models=("kling-v3-std-*",), rpm=60, monthly_budget_usd=Decimal("100.00")
        )
        assert looks_like_key(secret)
        assert record.key_hash == hash_secret(secret)
        assert record.prefix == secret[:10]
        assert secret not in repr(record)
        assert record.accepts(hash_secret(secret), 6.0)
        assert (record.name, record.rpm, record.monthly_budget_usd, record.created_at) == (
            "team-a",
            60,
            Decimal("100.00"),
            5.0,
        )

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"rpm": 0}, "rpm"),
            ({"rpm": -5}, "rpm"),
            ({"monthly_budget_usd": Decimal("-1")}, "budget"),
            ({"monthly_budget_usd": Decimal("NaN")}, "budget"),
        ],
    )
    def test_issue_rejects(self, kwargs: dict[str, object], message: str) -> None:
        """Nonsensical limits are refused."""
        with pytest.raises(ValueError, match=message):
            issue_key("team-a", now=0.0, **kwargs)  # type: ignore[arg-type]


class TestRateLimiter:
    @pytest.mark.parametrize(
        ("rpm", "steps", "expected"),
        [
            # steps: (seconds to advance before the check); expected: None = allowed, float = retry-after
            pytest.param(3, [0, 0, 0, 0], [None, None, None, 20.0], id="burst-of-capacity-then-limited"),
            pytest.param(60, [0] * 60 + [0], [None] * 60 + [1.0], id="rpm60-retry-after-1s"),
            pytest.param(3, [0, 0, 0, 0, 20], [None, None, None, 20.0, None], id="recovers-after-retry-after"),
            pytest.param(3, [0, 0, 0, 0, 10], [None, None, None, 20.0, 10.0], id="partial-refill"),
            pytest.param(1, [0, 0, 59, 1], [None, 60.0, 1.0, None], id="rpm1"),
            pytest.param(2, [0, 0, 1000, 0, 0], [None, None, None, None, 30.0], id="refill-capped-at-capacity"),
            pytest.param(6, [0, 10, 10, 10], [None, None, None, None], id="steady-at-rate"),
            pytest.param(None, [0] * 100, [None] * 100, id="unlimited"),
        ],
    )
    def test_table(self, rpm: int | None, steps: list[float], expected: list[float | None]) -> None:
        """Capacity rpm, refill rpm/60 per second, retry-after until one token is back."""
        clock = FakeClock()
        limiter = RateLimiter(clock)
        got: list[float | None] = []
        for advance in steps:
            clock.now += advance
            got.append(limiter.check("team-a", rpm))
        assert [None if g is None else pytest.approx(g) for g in got] == expected

    def test_keys_are_independent(self) -> None:
        """One key exhausting its bucket does not limit another."""
        limiter = RateLimiter(FakeClock())
        assert limiter.check("a", 1) is None
        assert limiter.check("a", 1) is not None
        assert limiter.check("b", 1) is None

    def test_retry_after_is_honest(self) -> None:
        """Waiting exactly the returned retry-after is enough."""
        clock = FakeClock()
        limiter = RateLimiter(clock)
        for _ in range(7):
            limiter.check("k", 7)
        wait = limiter.check("k", 7)
        assert wait is not None
        clock.now += wait
        assert limiter.check("k", 7) is None

    def test_bounded_memory(self) -> None:
        """No more than max_keys buckets are kept; the least recently used goes first."""
        clock = FakeClock()
        limiter = RateLimiter(clock, max_keys=3)
        for name in ("a", "b", "c"):
            limiter.check(name, 1)
        limiter.check("a", 1)  # a is now most recent (and limited)
        limiter.check("d", 1)  # evicts b
        assert len(limiter) == 3
        assert limiter.check("a", 1) is not None  # a kept its empty bucket
        assert limiter.check("b", 1) is None  # b starts fresh

    def test_clock_going_backwards(self) -> None:
        """A clock stepping back never adds tokens."""
        clock = FakeClock()
        limiter = RateLimiter(clock)
        assert limiter.check("k", 1) is None
        clock.now -= 1000
        assert limiter.check("k", 1) is not None

    def test_rpm_lowered(self) -> None:
        """A lowered limit caps the bucket at the new capacity at once."""
        clock = FakeClock()
        limiter = RateLimiter(clock)
        assert limiter.check("k", 100) is None
        results = [limiter.check("k", 2) for _ in range(3)]
        assert results[:2] == [None, None]
        assert results[2] is not None

    def test_forget(self) -> None:
        """forget drops a key's bucket."""
        limiter = RateLimiter(FakeClock())
        limiter.check("k", 1)
        limiter.forget("k")
        assert len(limiter) == 0
        assert limiter.check("k", 1) is None

    @pytest.mark.parametrize("rpm", [0, -1])
    def test_bad_rpm(self, rpm: int) -> None:
        """A non-positive rpm is a programming error."""
        with pytest.raises(ValueError, match="rpm"):
            RateLimiter(FakeClock()).check("k", rpm)
