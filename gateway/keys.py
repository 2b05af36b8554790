"""Client keys: issuing, recognising, hashing and model allowlists (the rate limits are in ``gateway.auth``).

Everything here is pure (no I/O); the durable copy of every key lives in the store (``gateway.store.base``).

A key looks like ``gk_`` + 43 URL-safe characters of ``secrets.token_urlsafe(32)`` (256 bits) + a 6-character
checksum (the first 36 bits of SHA-256 over everything before it, URL-safe base64), 52 characters in all::

    gk_<43 random URL-safe characters><6 checksum characters>

The checksum lets :func:`looks_like_key` reject typos and junk without a store lookup, and lets secret
scanners recognise a leaked key. Only ``hash_secret(secret)`` (SHA-256 hex) is ever stored; the secret is
shown once.

Rotation gives a key a new secret while the old one keeps working for a grace period,
:data:`ROTATION_GRACE_S` (24 hours) unless the caller chooses another, so clients can be redeployed.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from decimal import Decimal

from gateway.catalog import KEY_NAME_SHAPE

KEY_PREFIX = "gk_"
"""Every gateway key starts with this."""

ROTATION_GRACE_S = 24 * 3600.0
#: Upper bounds that keep limits meaningful and inside the store's integer and fixed-point columns.
MAX_RPM = 1_000_000_000
MAX_MONTHLY_BUDGET_USD = Decimal(1_000_000_000)
"""Default time a rotated-out secret keeps working: 24 hours."""

DISPLAY_PREFIX_LEN = 10
"""Characters of a secret kept for display (``gk_`` + 7): enough to tell keys apart, useless to attackers."""

_BODY_BYTES = 32
_BODY_LEN = 43  # len(secrets.token_urlsafe(32)): 32 bytes in unpadded base64
_CHECKSUM_LEN = 6
_KEY_LEN = len(KEY_PREFIX) + _BODY_LEN + _CHECKSUM_LEN
_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")
_KEY_NAME = re.compile(KEY_NAME_SHAPE)
_MODEL_GLOB = re.compile(r"[A-Za-z0-9._:/*?!\[\]-]+")
#: Bounds on a key's model allowlist: every request of the key matches against it.
MAX_MODEL_PATTERNS = 64
MAX_MODEL_PATTERN_CHARS = 128


def _checksum(head: str) -> str:
    digest = hashlib.sha256(head.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:_CHECKSUM_LEN]


def generate_secret() -> str:
    """Return a fresh key secret: ``gk_`` + 256 random bits + checksum, URL-safe characters only."""
    head = KEY_PREFIX + secrets.token_urlsafe(_BODY_BYTES)
    return head + _checksum(head)


def looks_like_key(candidate: str) -> bool:
    """Tell whether ``candidate`` has a gateway key's shape and a valid checksum (no store lookup)."""
    if len(candidate) != _KEY_LEN or not candidate.startswith(KEY_PREFIX):
        return False
    if _URLSAFE.fullmatch(candidate, len(KEY_PREFIX)) is None:
        return False
    head, check = candidate[:-_CHECKSUM_LEN], candidate[-_CHECKSUM_LEN:]
    return hmac.compare_digest(check, _checksum(head))


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of a secret: the only form in which a key is stored or looked up."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    """The first characters of a secret, stored so ``keys list`` can show which key is which."""
    return secret[:DISPLAY_PREFIX_LEN]


def validate_key_name(name: str) -> str:
    """Return ``name`` if it is a valid key name (1-64 of ``A-Z a-z 0-9 . _ -``, starting alphanumeric).

    Names appear in metric labels, logs and CLI output, so they are kept short and plain.
    """
    if _KEY_NAME.fullmatch(name) is None:
        raise ValueError(
            "key name must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_model_globs(text: str) -> tuple[str, ...]:
    """Parse ``"kling-v3-std-*,kling-v3-pro-audio"`` into a tuple of globs; empty text means all models.

    >>> parse_model_globs(" kling-v3-std-* , kling-v3-pro-audio,")
    ('kling-v3-std-*', 'kling-v3-pro-audio')
    """
    globs: list[str] = []
    for part in text.split(","):
        glob = part.strip()
        if not glob:
            continue
        if len(glob) > MAX_MODEL_PATTERN_CHARS:
            raise ValueError(f"model pattern longer than {MAX_MODEL_PATTERN_CHARS} characters: {glob[:40]!r}...")
        if _MODEL_GLOB.fullmatch(glob) is None:
            raise ValueError(f"invalid model pattern {glob!r}")
        if glob not in globs:
            globs.append(glob)
    if len(globs) > MAX_MODEL_PATTERNS:
        raise ValueError(f"at most {MAX_MODEL_PATTERNS} model patterns per key, got {len(globs)}")
    return tuple(globs)


def model_allowed(patterns: tuple[str, ...], model: str) -> bool:
    """Tell whether ``model`` matches one of the fnmatch-style ``patterns`` (case-sensitive); () allows all.

    >>> model_allowed(("kling-v3-std-*",), "kling-v3-pro-audio")
    False
    """
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A client key as stored: never the secret, only its hash and a display prefix.

    ``previous_hash`` / ``previous_valid_until`` hold the rotated-out secret during its grace period.
    ``rpm`` None means no rate limit; ``monthly_budget_usd`` None means no budget.
    """

    name: str
    key_hash: str
    prefix: str
    models: tuple[str, ...] = ()
    rpm: int | None = None
    monthly_budget_usd: Decimal | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    previous_hash: str | None = None
    previous_valid_until: float | None = None
    webhook_url: str | None = None

    @property
    def revoked(self) -> bool:
        """True once the key has been revoked (revocation is immediate and final)."""
        return self.revoked_at is not None

    def accepts(self, key_hash: str, now: float) -> bool:
        """Tell whether a secret hashing to ``key_hash`` authenticates as this key at time ``now``."""
        if self.revoked_at is not None:
            return False
        if hmac.compare_digest(key_hash, self.key_hash):
            return True
        return (
            self.previous_hash is not None
            and self.previous_valid_until is not None
            and now < self.previous_valid_until
            and hmac.compare_digest(key_hash, self.previous_hash)
        )

    def allows_model(self, model: str) -> bool:
        """Tell whether this key may use ``model`` (its allowlist of globs; empty allows every model)."""
        return model_allowed(self.models, model)


@dataclass(frozen=True, slots=True)
class NewSecret:
    """A freshly generated secret with the two derived values the store keeps."""

    secret: str
    key_hash: str
    prefix: str


def new_secret() -> NewSecret:
    """Generate a secret and derive its hash and display prefix."""
    secret = generate_secret()
    return NewSecret(secret=secret, key_hash=hash_secret(secret), prefix=display_prefix(secret))


def check_limits(rpm: int | None, monthly_budget_usd: Decimal | None) -> None:
    """ValueError unless ``rpm`` and ``monthly_budget_usd`` are in range (None: no limit)."""
    if rpm is not None and not 1 <= rpm <= MAX_RPM:
        raise ValueError(f"rpm must be an integer from 1 to {MAX_RPM}")
    if monthly_budget_usd is not None and (
        not monthly_budget_usd.is_finite() or not 0 <= monthly_budget_usd <= MAX_MONTHLY_BUDGET_USD
    ):
        raise ValueError(f"monthly budget must be an amount from 0 to {MAX_MONTHLY_BUDGET_USD}")


def issue_key(
    name: str,
    *,
    now: float,
    models: tuple[str, ...] = (),
    rpm: int | None = None,
    monthly_budget_usd: Decimal | None = None,
    webhook_url: str | None = None,
) -> tuple[str, KeyRecord]:
    """Make a new key: returns ``(secret, record)``; show the secret once, store only the record."""
    validate_key_name(name)
    check_limits(rpm, monthly_budget_usd)
    fresh = new_secret()
    record = KeyRecord(
        name=name,
        key_hash=fresh.key_hash,
        prefix=fresh.prefix,
        models=models,
        rpm=rpm,
        monthly_budget_usd=monthly_budget_usd,
        created_at=now,
        webhook_url=webhook_url,
    )
    return fresh.secret, record
