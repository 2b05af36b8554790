"""Reading the accounts from the environment and the settings: pure functions, no I/O, table-tested.

Keys come from exactly one of ``UNIALL_API_KEY`` (one account, ``default``), ``UNIALL_API_KEYS``
(``name=sk-...,name2=sk-...``) or the text of the file named by ``UNIALL_API_KEYS_FILE`` (``name=sk-...`` lines;
blank lines and ``#`` comments ignored). Per-account settings come from ``[upstream.accounts.NAME]`` and
``KLING_GATEWAY_UPSTREAM_ACCOUNTS`` (a JSON object of the same tables). Every problem is an ``AccountsError`` whose
message is one line naming the variable or setting, and never contains key material.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["DEFAULT_ACCOUNT"]

from gateway.catalog import DEFAULT_ACCOUNT
from gateway.keys import parse_model_globs
from gateway.suggest import did_you_mean

KEY_ENV: Final = "UNIALL_API_KEY"
KEYS_ENV: Final = "UNIALL_API_KEYS"
KEYS_FILE_ENV: Final = "UNIALL_API_KEYS_FILE"
SETTINGS_ENV: Final = "KLING_GATEWAY_UPSTREAM_ACCOUNTS"
ACCOUNT_NAME: Final = re.compile(r"[a-z0-9_-]{1,32}")
_SETTING_FIELDS: Final = ("max_in_flight", "weight", "models")
MAX_IN_FLIGHT_LIMIT: Final = 1_000_000


class AccountsError(ValueError):
    """A malformed account variable or setting; ``str()`` is one line naming it, without any key."""


@dataclass(frozen=True, slots=True)
class AccountSettings:
    """One account's limits: ``max_in_flight`` 0 means no limit; ``models`` () means every model."""

    max_in_flight: int = 0
    weight: float = 1.0
    models: tuple[str, ...] = ()


def fingerprint(key: str) -> str:
    """The first 8 hex digits of the key's SHA-256: enough to tell keys apart, useless to an attacker."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def keys_source(environ: Mapping[str, str]) -> str | None:
    """Which of the three key variables is set (non-empty); None if none is. More than one is an error."""
    present = [name for name in (KEY_ENV, KEYS_ENV, KEYS_FILE_ENV) if environ.get(name, "").strip()]
    if len(present) > 1:
        raise AccountsError(f"{present[1]}: set only one of {KEY_ENV}, {KEYS_ENV}, {KEYS_FILE_ENV} (also {present[0]})")
    return present[0] if present else None


def parse_keys_list(text: str, variable: str = KEYS_ENV) -> dict[str, str]:
    """``name=sk-...,name2=sk-...`` → ``{name: key}``, in order."""
    return _pairs(((f"item {n}", item) for n, item in enumerate(text.split(","), 1) if item.strip()), variable)


def parse_keys_file(text: str, variable: str = KEYS_FILE_ENV) -> dict[str, str]:
    """``name=sk-...`` lines → ``{name: key}``; blank lines and lines starting with ``#`` are skipped."""
    lines = (
        (f"line {n}", line)
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    )
    return _pairs(lines, variable)


def _pairs(items: Any, variable: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for where, item in items:
        name, sep, key = item.partition("=")
        name, key = name.strip(), key.strip()
        if not sep:
            raise AccountsError(f"{variable}: {where}: expected name=key")
        if not ACCOUNT_NAME.fullmatch(name):
            raise AccountsError(f"{variable}: {where}: account name {name[:40]!r} must be 1-32 of a-z 0-9 _ -")
        if name in keys:
            raise AccountsError(f"{variable}: {where}: account {name!r} named twice")
        if not key:
            raise AccountsError(f"{variable}: {where}: account {name!r} has an empty key")
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in key):
            raise AccountsError(f"{variable}: {where}: account {name!r} has a key with spaces or control characters")
        keys[name] = key
    if not keys:
        raise AccountsError(f"{variable}: no account (expected name=key)")
    return keys


def keys_from_env(environ: Mapping[str, str], read_file: Any = None) -> tuple[str | None, dict[str, str]]:
    """The key variable used and its accounts (``{}`` when no key is set). ``read_file(path) -> str``."""
    source = keys_source(environ)
    if source is None:
        return None, {}
    value = environ[source].strip()
    if source == KEY_ENV:
        if any(ch.isspace() or ord(ch) < 32 for ch in value):
            raise AccountsError(f"{KEY_ENV}: the key has spaces or control characters")
        return source, {DEFAULT_ACCOUNT: value}
    if source == KEYS_ENV:
        return source, parse_keys_list(value)
    if read_file is None:
        raise AccountsError(f"{KEYS_FILE_ENV}: cannot be read here")
    try:
        text = read_file(value)
    except OSError as exc:
        raise AccountsError(f"{KEYS_FILE_ENV}: cannot read {value!r}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise AccountsError(f"{KEYS_FILE_ENV}: {value!r} is not UTF-8 text") from None
    return source, parse_keys_file(text)


def parse_account_settings(raw: Any, source: str) -> dict[str, AccountSettings]:
    """``{name: {max_in_flight, weight, models}}`` → ``{name: AccountSettings}``; ``source`` names the origin."""
    if not isinstance(raw, dict):
        raise AccountsError(f"{source}: expected a table of accounts")
    result: dict[str, AccountSettings] = {}
    for name, table in raw.items():
        where = f"{source}.{name}"
        if not isinstance(name, str) or not ACCOUNT_NAME.fullmatch(name):
            raise AccountsError(f"{where}: account name must be 1-32 of a-z 0-9 _ -")
        if not isinstance(table, dict):
            raise AccountsError(f"{where}: expected a table")
        for field in table:
            if field not in _SETTING_FIELDS:
                raise AccountsError(f"{where}.{field}: unknown setting{did_you_mean(str(field), _SETTING_FIELDS)}")
        result[name] = AccountSettings(
            max_in_flight=_max_in_flight(table.get("max_in_flight", 0), f"{where}.max_in_flight"),
            weight=_weight(table.get("weight", 1), f"{where}.weight"),
            models=_models(table.get("models", ()), f"{where}.models"),
        )
    return result


def _max_in_flight(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AccountsError(f"{where}: expected an integer, got {value!r}")
    if not 0 <= value <= MAX_IN_FLIGHT_LIMIT:
        raise AccountsError(f"{where}: must be between 0 and {MAX_IN_FLIGHT_LIMIT}")
    return value


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AccountsError(f"{where}: expected a number, got {value!r}")
    if not 0 < value <= 1000:
        raise AccountsError(f"{where}: must be greater than 0 and at most 1000")
    return float(value)


def _models(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise AccountsError(f"{where}: expected a list of model globs")
    try:
        return parse_model_globs(",".join(value))
    except ValueError as exc:
        raise AccountsError(f"{where}: {exc}") from None


def account_settings(file_raw: Any, env_raw: Any) -> dict[str, AccountSettings]:
    """The file's ``[upstream.accounts.NAME]`` tables with the environment's fields laid over them, per account.

    Each source is checked on its own first, so a problem names the source it is in.
    """
    file_raw = {} if file_raw is None else file_raw
    parse_account_settings(file_raw, "upstream.accounts")
    if env_raw is None:
        env_raw = {}
    parse_account_settings(env_raw, SETTINGS_ENV)
    merged: dict[str, dict[str, Any]] = {name: dict(table) for name, table in file_raw.items()}
    for name, table in env_raw.items():
        merged.setdefault(name, {}).update(table)
    return parse_account_settings(merged, "upstream.accounts")


def check_settings_have_keys(settings: Mapping[str, AccountSettings], keys: Mapping[str, str], source: str) -> None:
    """A setting for an account without a key is a typo or a forgotten key: fail with a did-you-mean."""
    for name in settings:
        if name not in keys:
            raise AccountsError(
                f"upstream.accounts.{name}: no such account in {source}{did_you_mean(name, tuple(keys))}"
            )
