"""Keeping the passwords in backend URLs (PostgreSQL, Redis) out of error messages and log lines."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl, unquote, urlsplit


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, fit for messages and logs.

    >>> redact_url("redis://:s3cret@cache:6379/0")
    'redis://:***@cache:6379/0'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def url_secrets(url: str) -> tuple[str, ...]:
    """The URL's passwords (in the authority or a ``password`` parameter), as written and percent-decoded."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return ()
    found += [value for name, value in parse_qsl(parts.query, keep_blank_values=True) if name == "password"]
    return tuple({form for secret in found if secret for form in (secret, unquote(secret))})


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
