"""Settings: frozen dataclasses loaded from TOML, overridden by ``KLING_GATEWAY_<SECTION>_<KEY>``.

Precedence, lowest first: built-in defaults, the TOML file, environment variables. Secrets come only from
the environment (``UNIALL_API_KEY``, ``KLING_GATEWAY_ADMIN_TOKEN``); a secret written in the TOML file is an
error, so it never lands in a repository. Every failure is a ``ConfigError`` whose message is one line naming
the setting, e.g. ``server.port: expected an integer, got 'abc' (from KLING_GATEWAY_SERVER_PORT)``.
Ranges and vocabularies are declared beside their fields (``metadata=bounds(...)`` / ``one_of(...)``) and
checked by one generic checker; only checks across fields or of a shape stay in ``_check``.

>>> settings = load_settings(env={"UNIALL_API_KEY": "sk-x", "KLING_GATEWAY_SERVER_PORT": "9000"})
>>> settings.server.port
9000
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import orjson

from gateway.accounts.parse import SETTINGS_ENV as ACCOUNTS_ENV
from gateway.accounts.parse import (
    AccountsError,
    AccountSettings,
    account_settings,
    check_settings_have_keys,
    keys_from_env,
)
from gateway.catalog import DEFAULT_ACCOUNT, DURATION_MAX, DURATION_MIN, MODELS, MODES
from gateway.suggest import did_you_mean

ENV_PREFIX = "KLING_GATEWAY_"
SECRET_ENV = (
    "UNIALL_API_KEY",
    "UNIALL_API_KEYS",
    "KLING_GATEWAY_ADMIN_TOKEN",
    "KLING_GATEWAY_WEBHOOK_SECRET",
)
DEFAULT_BASE_URL = "https://api.uniall.ai"
_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: ``KLING_GATEWAY_*`` variables that are not ``<SECTION>_<KEY>`` settings; any other unknown one is an error
#: (a typo would otherwise be ignored silently). Add a variable here when a module starts reading one.
OTHER_ENV: Final = frozenset(
    {
        "KLING_GATEWAY_ADMIN_TOKEN",
        "KLING_GATEWAY_WEBHOOK_SECRET",
        "KLING_GATEWAY_CONFIG",
        "KLING_GATEWAY_URL",  # generate: the gateway to submit through
        "KLING_GATEWAY_KEY",  # generate: the client key
        "KLING_GATEWAY_UPSTREAM_ACCOUNTS",  # the accounts' settings as one JSON object (gateway.accounts.parse)
        "KLING_GATEWAY_FUZZ_EXAMPLES",
    }
)
#: Prefixes of variables used by the test suite and the benchmarks, never settings.
OTHER_ENV_PREFIXES: Final = ("KLING_GATEWAY_TEST_", "KLING_GATEWAY_BENCH_")

#: Public list prices, USD per output second. Replace them with your contract prices in ``[pricing.prices]``.
LIST_PRICES_USD_PER_S: Mapping[str, Decimal] = types.MappingProxyType(
    {model: info.list_price_usd_per_s for model, info in MODELS.items()}
)


class ConfigError(Exception):
    """A missing or malformed setting; ``str()`` is one line naming it."""


# -- bounds declared beside their fields ---------------------------------------------------------------------

_RULE: Final = "gateway.config.rule"


@dataclass(frozen=True, slots=True)
class Bounds:
    """A numeric range: ``at_least`` / ``at_most`` inclusive, ``above`` exclusive; None means open."""

    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"must be positive"``, ...), or None when it is in range."""
        if self.above is not None and not value > self.above:
            return "must be positive" if self.above == 0 else f"must be greater than {_number(self.above)}"
        low, high = self.at_least, self.at_most
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                return f"must be between {_number(low)} and {_number(high)}"
            if low is not None:
                return "must not be negative" if low == 0 else f"must be at least {_number(low)}"
            assert high is not None  # one of the two is out of range
            return f"must be at most {_number(high)}"
        return None


@dataclass(frozen=True, slots=True)
class OneOf:
    """A closed vocabulary; ``fold_case`` accepts any letter case."""

    choices: tuple[str, ...]
    fold_case: bool = False

    def problem(self, value: Any) -> str | None:
        if (value.lower() if self.fold_case else value) in self.choices:
            return None
        if len(self.choices) == 2:
            return f"must be {self.choices[0]!r} or {self.choices[1]!r}, got {value!r}"
        return f"must be one of {', '.join(self.choices)}"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def bounds(
    *, at_least: float | None = None, at_most: float | None = None, above: float | None = None
) -> Mapping[str, Any]:
    """Field metadata declaring a numeric range: ``field(default=30.0, metadata=bounds(above=0))``."""
    return types.MappingProxyType({_RULE: Bounds(at_least, at_most, above)})


def one_of(*choices: str, fold_case: bool = False) -> Mapping[str, Any]:
    """Field metadata declaring the allowed values of a string setting."""
    return types.MappingProxyType({_RULE: OneOf(choices, fold_case)})


POSITIVE: Final = bounds(above=0)
NOT_NEGATIVE: Final = bounds(at_least=0)
AT_LEAST_ONE: Final = bounds(at_least=1)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    #: TCP port the gateway listens on.
    port: int = field(default=8080, metadata=bounds(at_least=1, at_most=65535))
    data_dir: str = "./data"
    max_body_bytes: int = field(default=1024 * 1024, metadata=bounds(at_least=1024))
    workers: int = field(default=1, metadata=AT_LEAST_ONE)
    #: Seconds in-flight requests get to finish on SIGTERM before connections are cut.
    shutdown_timeout_s: float = field(default=15.0, metadata=NOT_NEGATIVE)
    #: Largest request header block accepted, in bytes (uvicorn's httptools/h11 limit).
    max_header_bytes: int = 16 * 1024
    #: Longest wait for a request's head (request line and headers); past it: 408, or a plain close if nothing came.
    header_timeout_s: float = field(default=10.0, metadata=POSITIVE)
    #: Connections allowed in the middle of a request head; past it the longest-waiting one is timed out.
    max_connections_reading_headers: int = field(default=256, metadata=AT_LEAST_ONE)
    #: An idle keep-alive connection is closed after this long.
    keep_alive_timeout_s: float = field(default=5.0, metadata=POSITIVE)
    #: Requests handled at once; more wait in a bounded queue (health, readiness and metrics are exempt).
    max_in_flight: int = field(default=1024, metadata=AT_LEAST_ONE)
    #: Requests allowed to wait for a slot; past it: 503 overloaded at once.
    max_queued: int = field(default=256, metadata=NOT_NEGATIVE)
    #: Longest wait in that queue before 503 overloaded.
    queue_timeout_s: float = field(default=0.1, metadata=NOT_NEGATIVE)
    #: On SIGTERM, /readyz fails at once and the gateway keeps serving this long before it stops accepting.
    shutdown_grace_s: float = field(default=0.0, metadata=NOT_NEGATIVE)
    #: The gateway's own base URL as clients reach it (``[archive] rewrite_video_url`` points clients there).
    public_url: str = ""


UPSTREAM_TRANSPORTS = ("lean", "aiohttp")


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str = DEFAULT_BASE_URL
    #: Whole-call bound (connect + send + wait for and read the answer).
    timeout_s: float = field(default=30.0, metadata=POSITIVE)
    connect_timeout_s: float = field(default=5.0, metadata=POSITIVE)
    #: Longest silence while reading the answer.
    read_timeout_s: float = field(default=30.0, metadata=POSITIVE)
    #: Longest wait for a free pooled connection.
    pool_timeout_s: float = field(default=5.0, metadata=POSITIVE)
    max_connections: int = field(default=256, metadata=AT_LEAST_ONE)
    #: Attempts after the first for GET on connect errors (never for POST).
    get_retries: int = field(default=2, metadata=NOT_NEGATIVE)
    #: First wait before a GET retry; doubled per attempt, with full jitter (a random wait up to it).
    retry_backoff_s: float = 0.05
    #: Cap on that doubling wait between GET retries.
    retry_backoff_max_s: float = 0.5
    #: Larger upstream answers are refused (502) rather than buffered.
    max_response_bytes: int = 8 * 1024 * 1024
    #: The upstream client: "lean" (httptools, the default: a quarter of aiohttp's CPU per call, see
    #: bench/results-transport.md) or "aiohttp" (the earlier client, kept as a fallback).
    transport: str = field(default="lean", metadata=one_of(*UPSTREAM_TRANSPORTS))
    #: Consecutive failed calls (transport errors, 5xx) that open the circuit breaker; 0 turns it off.
    breaker_failure_threshold: int = field(default=5, metadata=NOT_NEGATIVE)
    #: Seconds the breaker stays open (fast 503s) before one probe call is let through.
    breaker_open_s: float = field(default=10.0, metadata=POSITIVE)
    #: How long a submission waits, first come first served, for an upstream account with room before
    #: 429 upstream_capacity (0: answer at once).
    capacity_wait_s: float = field(default=0.0, metadata=bounds(at_least=0, at_most=60))
    #: Retry-After of a 429 upstream_capacity while an account may free a slot at any moment (a task ending).
    capacity_retry_after_s: int = field(default=5, metadata=bounds(at_least=1, at_most=3600))


@dataclass(frozen=True)
class AuthSettings:
    mode: str = field(default="keys", metadata=one_of("keys", "open"))
    #: How long a rotated-out key keeps working, so clients can roll over.
    rotation_grace_s: float = field(default=86400.0, metadata=NOT_NEGATIVE)
    #: How often each process checks the store for key changes (revocation latency bound).
    refresh_interval_s: float = field(default=0.5, metadata=POSITIVE)


@dataclass(frozen=True)
class StoreSettings:
    url: str = ""  # empty: sqlite:///<data_dir>/gateway.db


@dataclass(frozen=True)
class CacheSettings:
    url: str = "memory://"
    pending_ttl_s: float = field(default=2.0, metadata=NOT_NEGATIVE)
    terminal_ttl_s: float = field(default=3600.0, metadata=NOT_NEGATIVE)
    #: Status answers each process keeps in memory at most; the least recently used go first.
    max_entries: int = field(default=100_000, metadata=AT_LEAST_ONE)
    #: Bytes of status answers each process keeps in memory at most (an answer larger on its own is not kept).
    max_bytes: int = 64 * 1024 * 1024
    #: With Redis: how long an expired status stays there to be served STALE while the upstream fails.
    stale_keep_s: float = field(default=3600.0, metadata=NOT_NEGATIVE)
    #: With Redis: the prefix of every key this gateway writes, so several deployments can share one server.
    key_prefix: str = "kling-gateway:"


@dataclass(frozen=True)
class SettlerSettings:
    #: Run the background settler, which polls tasks nobody polls any more so every task settles in the ledger.
    enabled: bool = True
    idle_s: float = field(default=30.0, metadata=NOT_NEGATIVE)
    max_rps: float = field(default=5.0, metadata=POSITIVE)
    #: At most this many overdue tasks marked ``unknown`` a second (store writes only, no upstream call).
    max_give_ups_per_s: float = field(default=50.0, metadata=POSITIVE)
    #: Settler polls in flight at once per process (all within ``max_rps``).
    concurrency: int = field(default=4, metadata=AT_LEAST_ONE)
    task_max_age_s: float = field(default=86400.0, metadata=POSITIVE)


@dataclass(frozen=True)
class PricingSettings:
    default_duration_s: int = field(default=5, metadata=bounds(at_least=DURATION_MIN, at_most=DURATION_MAX))
    #: USD per output second by model id (a table; public list prices by default): replace with contract prices.
    prices: Mapping[str, Decimal] = field(default_factory=lambda: dict(LIST_PRICES_USD_PER_S))
    #: Price factor by mode (``text``, ``image``, ``first_last``; a table), 1 for each by default.
    mode_multipliers: Mapping[str, Decimal] = field(default_factory=lambda: dict.fromkeys(MODES, Decimal(1)))


@dataclass(frozen=True)
class ValidationSettings:
    allow_unknown_fields: bool = False
    block_private_media: bool = True
    #: Resolve media host names and reject names that resolve only to private addresses.
    resolve_media_hosts: bool = True
    #: Longest wait for resolving one media host name; a lookup that fails or times out does not reject.
    resolve_timeout_s: float = field(default=0.5, metadata=POSITIVE)
    #: Model ids forwarded without Kling rules (besides the four Kling v3 ids).
    passthrough_models: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProxySettings:
    passthrough: bool = False


@dataclass(frozen=True)
class MetricsSettings:
    #: When set, ``GET /metrics`` requires ``Authorization: Bearer <token>``.
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class ContentSettings:
    """``GET /v1/videos/{id}/content`` (SPEC section 10)."""

    #: Largest video served or archived; a bigger one is 502 video_unavailable.
    max_bytes: int = field(default=2 * 1024**3, metadata=AT_LEAST_ONE)
    connect_timeout_s: float = field(default=5.0, metadata=POSITIVE)
    #: Longest wait for the next bytes from the video's origin.
    read_timeout_s: float = field(default=30.0, metadata=POSITIVE)


@dataclass(frozen=True)
class ArchiveSettings:
    """Copies of completed tasks' videos (SPEC section 10); off while ``url`` is empty."""

    url: str = ""
    #: S3-compatible endpoint (``s3://`` only); empty: AWS itself.
    endpoint_url: str = ""
    region: str = ""
    #: Copies made at once by one process.
    concurrency: int = field(default=2, metadata=AT_LEAST_ONE)
    max_attempts: int = field(default=5, metadata=AT_LEAST_ONE)
    #: First retry delay; doubled per attempt up to an hour.
    retry_base_s: float = field(default=30.0, metadata=NOT_NEGATIVE)
    #: How often each process looks for completed tasks to copy.
    scan_s: float = field(default=5.0, metadata=POSITIVE)
    #: Completed tasks this recent are copied by the running gateway; older ones by ``archive backfill``.
    lookback_s: float = field(default=86400.0, metadata=NOT_NEGATIVE)
    #: Copies older than this are deleted; 0 keeps them forever.
    keep_days: float = field(default=0.0, metadata=NOT_NEGATIVE)
    #: Status answers carry the gateway's content URL (``[server] public_url``) instead of the upstream's.
    rewrite_video_url: bool = False


@dataclass(frozen=True)
class LoggingSettings:
    #: Lowest level of the JSON log lines written to standard output.
    level: str = field(default="info", metadata=one_of("debug", "info", "warning", "error", fold_case=True))
    #: One JSON access line per request (request id, route, status, duration, key, error code).
    access_log: bool = True


@dataclass(frozen=True)
class WebhooksSettings:
    #: Development only: let deliveries reach loopback and private addresses (a local test receiver).
    allow_private_targets: bool = False
    #: Delivery attempts at once per process, and at most per receiver host and per key.
    concurrency: int = field(default=8, metadata=bounds(at_least=1))
    per_target_concurrency: int = field(default=2, metadata=bounds(at_least=1))
    #: Pending deliveries kept per receiver host and per key; beyond, that host's or key's new ones are dropped.
    max_pending_per_target: int = field(default=1000, metadata=bounds(at_least=1))
    max_attempts: int = field(default=6, metadata=bounds(at_least=1))
    #: Bound on one attempt's HTTP exchange; and how often the worker looks for due deliveries.
    timeout_s: float = field(default=10.0, metadata=POSITIVE)
    poll_interval_s: float = field(default=1.0, metadata=POSITIVE)


@dataclass(frozen=True)
class UiSettings:
    """The admin web UI under ``/gateway/ui`` (on while the admin token is set)."""

    #: How long a sign-in lasts; signing out ends it at once, in every process.
    session_ttl_s: int = field(default=30 * 60, metadata=bounds(at_least=60, at_most=86400))


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    settler: SettlerSettings = field(default_factory=SettlerSettings)
    pricing: PricingSettings = field(default_factory=PricingSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    webhooks: WebhooksSettings = field(default_factory=WebhooksSettings)
    content: ContentSettings = field(default_factory=ContentSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    ui: UiSettings = field(default_factory=UiSettings)
    #: Secrets, from the environment only; excluded from repr so they never reach a log line.
    upstream_api_key: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    #: Signs completion webhooks (Standard Webhooks, ``whsec_`` + base64); webhooks are off while it is unset.
    webhook_secret: str = field(default="", repr=False)
    #: Upstream accounts' keys by name (section 9), from the one key variable that is set; never logged.
    upstream_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Which variable the keys came from (``UNIALL_API_KEY``, ``UNIALL_API_KEYS``, ``UNIALL_API_KEYS_FILE``), or "".
    upstream_keys_source: str = ""
    #: The key file to re-read when it changes (``UNIALL_API_KEYS_FILE``), or "".
    upstream_keys_file: str = ""
    #: Per-account settings (``[upstream.accounts.NAME]`` and ``KLING_GATEWAY_UPSTREAM_ACCOUNTS``).
    accounts: Mapping[str, AccountSettings] = field(default_factory=dict)

    @property
    def account_keys(self) -> Mapping[str, str]:
        """Upstream keys by account: the named ones, else ``UNIALL_API_KEY`` as the account ``default``."""
        return self.upstream_keys or {DEFAULT_ACCOUNT: self.upstream_api_key}

    @property
    def known_models(self) -> frozenset[str]:
        """The priced models and the configured passthrough models: what a key's model globs may match."""
        return frozenset(MODELS) | frozenset(self.validation.passthrough_models)

    @property
    def store_url(self) -> str:
        if self.store.url:
            return self.store.url
        return f"sqlite:///{Path(self.server.data_dir) / 'gateway.db'}"

    def replace(self, **sections: Any) -> Settings:
        """A copy with whole sections or fields replaced (``settings.replace(auth=AuthSettings(mode="open"))``)."""
        return dataclasses.replace(self, **sections)


_SECTIONS: dict[str, type[Any]] = {
    name: hint
    for name, hint in get_type_hints(Settings).items()
    if name
    not in (
        "upstream_api_key",
        "admin_token",
        "webhook_secret",
        "upstream_keys",
        "upstream_keys_source",
        "upstream_keys_file",
        "accounts",
    )
}
_SECRET_KEYS = {
    ("upstream", "api_key"),
    ("upstream", "key"),
    ("auth", "admin_token"),
    ("admin", "token"),
    ("webhook", "secret"),
    ("webhooks", "secret"),
}


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    require_upstream_key: bool = False,
) -> Settings:
    """Load defaults ← TOML file ← environment, and check every value.

    ``path`` None means: ``$KLING_GATEWAY_CONFIG`` if set, else defaults only.
    """
    environ = os.environ if env is None else env
    if path is None and environ.get("KLING_GATEWAY_CONFIG"):
        path = environ["KLING_GATEWAY_CONFIG"]
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    sections: dict[str, Any] = {}
    accounts_raw: Any = None
    for section_name, section_type in _SECTIONS.items():
        values = raw.pop(section_name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{section_name}]: expected a table, got {type(values).__name__}")
        if section_name == "upstream":
            values = dict(values)
            accounts_raw = values.pop("accounts", None)
        sections[section_name] = _build_section(section_name, section_type, values, environ)
    if raw:
        name = sorted(raw)[0]
        raise ConfigError(f"[{name}]: unknown section{did_you_mean(name, _SECTIONS)}")
    _check_env_names(environ)
    upstream = sections["upstream"]
    if environ.get("UNIALL_BASE_URL"):
        upstream = dataclasses.replace(upstream, base_url=environ["UNIALL_BASE_URL"])
        sections["upstream"] = upstream
    source, keys, accounts = _accounts(accounts_raw, environ)
    settings = Settings(
        **sections,
        upstream_api_key=next(iter(keys.values()), ""),
        admin_token=environ.get("KLING_GATEWAY_ADMIN_TOKEN", ""),
        webhook_secret=environ.get("KLING_GATEWAY_WEBHOOK_SECRET", ""),
        upstream_keys=keys,
        upstream_keys_source=source or "",
        upstream_keys_file=environ.get("UNIALL_API_KEYS_FILE", "").strip() if source == "UNIALL_API_KEYS_FILE" else "",
        accounts=accounts,
    )
    _check(settings)
    if require_upstream_key and not settings.upstream_keys:
        raise ConfigError(
            "UNIALL_API_KEY: not set (the upstream key comes only from the environment: "
            "UNIALL_API_KEY, UNIALL_API_KEYS or UNIALL_API_KEYS_FILE)"
        )
    return settings


def setting_env_names() -> frozenset[str]:
    """Every ``KLING_GATEWAY_<SECTION>_<KEY>`` variable a setting reads."""
    return frozenset(
        f"{ENV_PREFIX}{name.upper()}_{item.name.upper()}"
        for name, section_type in _SECTIONS.items()
        for item in dataclasses.fields(section_type)
    )


def _check_env_names(environ: Mapping[str, str]) -> None:
    """An unknown ``KLING_GATEWAY_*`` variable is an error with a "did you mean", like an unknown TOML key."""
    settings_env = setting_env_names()
    for env_name in sorted(environ):
        if (
            not env_name.startswith(ENV_PREFIX)
            or env_name in settings_env
            or env_name in OTHER_ENV
            or env_name.startswith(OTHER_ENV_PREFIXES)
        ):
            continue
        hint = did_you_mean(env_name, settings_env | OTHER_ENV)
        raise ConfigError(f"{env_name}: unknown environment variable (no such setting){hint}")


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def _accounts(
    file_raw: Any, environ: Mapping[str, str]
) -> tuple[str | None, dict[str, str], dict[str, AccountSettings]]:
    """The upstream accounts' keys (from the one key variable set) and their settings, checked against each other."""
    try:
        source, keys = keys_from_env(environ, _read_text)
        env_raw: Any = None
        if environ.get(ACCOUNTS_ENV, "").strip():
            try:
                env_raw = orjson.loads(environ[ACCOUNTS_ENV])
            except orjson.JSONDecodeError:
                raise AccountsError(f"{ACCOUNTS_ENV}: expected a JSON object of accounts") from None
        accounts = account_settings(file_raw, env_raw)
        if keys:
            check_settings_have_keys(accounts, keys, source or "")
    except AccountsError as exc:
        raise ConfigError(str(exc)) from None
    return source, keys, accounts


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None


def _build_section(name: str, section_type: type[Any], values: dict[str, Any], environ: Mapping[str, str]) -> Any:
    hints = get_type_hints(section_type)
    known = {f.name for f in dataclasses.fields(section_type)}
    for key in values:
        if (name, key) in _SECRET_KEYS:
            raise ConfigError(f"{name}.{key}: secrets are read only from the environment, remove it from the file")
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown setting{did_you_mean(key, known)}")
    kwargs: dict[str, Any] = {}
    for key in known:
        env_name = f"{ENV_PREFIX}{name.upper()}_{key.upper()}"
        if env_name in environ:
            kwargs[key] = _coerce(f"{name}.{key}", hints[key], environ[env_name], f" (from {env_name})", True)
        elif key in values:
            kwargs[key] = _coerce(f"{name}.{key}", hints[key], values[key], "", False)
    return section_type(**kwargs)


def _coerce(setting: str, hint: Any, value: Any, source: str, from_env: bool) -> Any:
    """Turn a TOML value or an environment string into the field's type, or fail naming the setting."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{setting}: expected {expected}, got {value!r}{source}")

    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
        origin = get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_env and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env:
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise fail("an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_env:
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise fail("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if origin is tuple:
        items = [item.strip() for item in value.split(",") if item.strip()] if from_env else value
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return tuple(items)
        raise fail("a list of strings")
    if origin in (Mapping, dict):
        table = value
        if from_env:
            try:
                table = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise fail("a JSON object") from None
        if not isinstance(table, dict):
            raise fail("a table")
        result: dict[str, Decimal] = {}
        for key, amount in table.items():
            try:
                if isinstance(amount, bool) or not isinstance(amount, int | float | str):
                    raise InvalidOperation
                result[str(key)] = Decimal(str(amount))
            except InvalidOperation:
                raise ConfigError(f"{setting}.{key}: expected a decimal number, got {amount!r}{source}") from None
        return result
    raise fail(str(hint))  # pragma: no cover - every field type is handled above


def _check(settings: Settings) -> None:
    """Every field's declared rule (``bounds``, ``one_of``), then the checks a rule beside one field cannot state."""
    for section_name in _SECTIONS:
        section = getattr(settings, section_name)
        for item in dataclasses.fields(section):
            rule: Bounds | OneOf | None = item.metadata.get(_RULE)
            problem = None if rule is None else rule.problem(getattr(section, item.name))
            if problem is not None:
                raise ConfigError(f"{section_name}.{item.name}: {problem}")
    _check_url("upstream.base_url", settings.upstream.base_url, ("http", "https"))
    _check_url("cache.url", settings.cache.url, ("memory", "redis", "rediss"))
    _check_url("store.url", settings.store_url, ("sqlite", "postgresql", "postgres"))
    _check_content(settings)
    if not _PREFIX.fullmatch(settings.cache.key_prefix):
        raise ConfigError("cache.key_prefix: 1-64 characters among letters, digits and . _ : -")
    for model, price in settings.pricing.prices.items():
        if price < 0:
            raise ConfigError(f"pricing.prices.{model}: must not be negative")
    for mode, multiplier in settings.pricing.mode_multipliers.items():
        if mode not in MODES:
            raise ConfigError(f"pricing.mode_multipliers.{mode}: unknown mode{did_you_mean(mode, MODES)}")
        if multiplier < 0:
            raise ConfigError(f"pricing.mode_multipliers.{mode}: must not be negative")
    problem = admin_token_problem(settings.admin_token)
    if problem is not None:
        raise ConfigError(f"KLING_GATEWAY_ADMIN_TOKEN: {problem}")


ADMIN_TOKEN_MIN = 32


def admin_token_problem(token: str) -> str | None:
    """Why an admin token is too weak to guard the admin API, or None (an empty token turns the API off)."""
    if not token:
        return None
    if len(token) < ADMIN_TOKEN_MIN:
        return f"must be at least {ADMIN_TOKEN_MIN} characters (e.g. from secrets.token_urlsafe(32))"
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        return "must not contain blanks or control characters"
    if len(set(token)) < 8:
        return "must not be a repetition of a few characters"
    return None


def _check_content(settings: Settings) -> None:
    """The archive URL's shape and the settings that depend on each other (ranges are declared on the fields)."""
    archive = settings.archive
    if archive.url:
        parts = urlsplit(archive.url)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise ConfigError(f"archive.url: a file URL needs an absolute local path, got {archive.url!r}")
        elif parts.scheme == "s3":
            if not parts.netloc:
                raise ConfigError(f"archive.url: no bucket in {archive.url!r}")
        else:
            raise ConfigError(f"archive.url: scheme must be file or s3, got {parts.scheme or 'none'!r}")
    if archive.endpoint_url:
        _check_url("archive.endpoint_url", archive.endpoint_url, ("http", "https"))
    if settings.server.public_url:
        _check_url("server.public_url", settings.server.public_url, ("http", "https"))
    if archive.rewrite_video_url and not settings.server.public_url:
        raise ConfigError("archive.rewrite_video_url: needs server.public_url (the gateway's URL as clients reach it)")


def missing_scale_extra(setting: str, exc: ImportError) -> ConfigError:
    """The error for a scale-out URL whose client library is not installed."""
    return ConfigError(f"{setting}: Redis needs the redis package: pip install 'kling-gateway[scale]' ({exc})")


def _check_url(setting: str, url: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ConfigError(f"{setting}: scheme must be one of {', '.join(schemes)}, got {parts.scheme or 'none'!r}")
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise ConfigError(f"{setting}: no host in {url!r}")
