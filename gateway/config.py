"""Settings: frozen dataclasses loaded from TOML, overridden by ``KLING_GATEWAY_<SECTION>_<KEY>``.

Precedence, lowest first: built-in defaults, the TOML file, environment variables. Secrets come only from
the environment (``UNIALL_API_KEY``, ``KLING_GATEWAY_ADMIN_TOKEN``); a secret written in the TOML file is an
error, so it never lands in a repository. Every failure is a ``ConfigError`` whose message is one line naming
the setting, e.g. ``server.port: expected an integer, got 'abc' (from KLING_GATEWAY_SERVER_PORT)``.

>>> settings = load_settings(env={"UNIALL_API_KEY": "sk-x", "KLING_GATEWAY_SERVER_PORT": "9000"})
>>> settings.server.port
9000
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import orjson

ENV_PREFIX = "KLING_GATEWAY_"
SECRET_ENV = ("UNIALL_API_KEY", "KLING_GATEWAY_ADMIN_TOKEN", "KLING_GATEWAY_WEBHOOK_SECRET")
DEFAULT_BASE_URL = "https://api.uniall.ai"
_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")

#: Public list prices, USD per output second. Replace them with your contract prices in ``[pricing.prices]``.
LIST_PRICES_USD_PER_S: Mapping[str, Decimal] = types.MappingProxyType(
    {
        "kling-v3-std-silent": Decimal("0.084"),
        "kling-v3-std-audio": Decimal("0.126"),
        "kling-v3-pro-silent": Decimal("0.112"),
        "kling-v3-pro-audio": Decimal("0.168"),
    }
)
MODES = ("text", "image", "first_last")


class ConfigError(Exception):
    """A missing or malformed setting; ``str()`` is one line naming it."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = "./data"
    max_body_bytes: int = 1024 * 1024
    workers: int = 1
    #: Seconds in-flight requests get to finish on SIGTERM before connections are cut.
    shutdown_timeout_s: float = 15.0
    #: Largest request header block accepted, in bytes (uvicorn's httptools/h11 limit).
    max_header_bytes: int = 16 * 1024
    #: Requests handled at once; more wait in a bounded queue (health, readiness and metrics are exempt).
    max_in_flight: int = 1024
    #: Requests allowed to wait for a slot; past it: 503 overloaded at once.
    max_queued: int = 256
    #: Longest wait in that queue before 503 overloaded.
    queue_timeout_s: float = 0.1
    #: On SIGTERM, /readyz fails at once and the gateway keeps serving this long before it stops accepting.
    shutdown_grace_s: float = 0.0
    #: The gateway's own base URL as clients reach it (``[archive] rewrite_video_url`` points clients there).
    public_url: str = ""


UPSTREAM_TRANSPORTS = ("lean", "aiohttp")


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str = DEFAULT_BASE_URL
    #: Whole-call bound (connect + send + wait for and read the answer).
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    #: Longest silence while reading the answer.
    read_timeout_s: float = 30.0
    #: Longest wait for a free pooled connection.
    pool_timeout_s: float = 5.0
    max_connections: int = 256
    #: Attempts after the first for GET on connect errors (never for POST).
    get_retries: int = 2
    retry_backoff_s: float = 0.05
    retry_backoff_max_s: float = 0.5
    #: Larger upstream answers are refused (502) rather than buffered.
    max_response_bytes: int = 8 * 1024 * 1024
    #: The upstream client: "lean" (httptools, the default: a quarter of aiohttp's CPU per call, see
    #: bench/results-transport.md) or "aiohttp" (the earlier client, kept as a fallback).
    transport: str = "lean"
    #: Consecutive failed calls (transport errors, 5xx) that open the circuit breaker; 0 turns it off.
    breaker_failure_threshold: int = 5
    #: Seconds the breaker stays open (fast 503s) before one probe call is let through.
    breaker_open_s: float = 10.0


@dataclass(frozen=True)
class AuthSettings:
    mode: str = "keys"
    #: How long a rotated-out key keeps working, so clients can roll over.
    rotation_grace_s: float = 86400.0
    #: How often each process checks the store for key changes (revocation latency bound).
    refresh_interval_s: float = 0.5


@dataclass(frozen=True)
class StoreSettings:
    url: str = ""  # empty: sqlite:///<data_dir>/gateway.db


@dataclass(frozen=True)
class CacheSettings:
    url: str = "memory://"
    pending_ttl_s: float = 2.0
    terminal_ttl_s: float = 3600.0
    max_entries: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    #: With Redis: how long an expired status stays there to be served STALE while the upstream fails.
    stale_keep_s: float = 3600.0
    #: With Redis: the prefix of every key this gateway writes, so several deployments can share one server.
    key_prefix: str = "kling-gateway:"


@dataclass(frozen=True)
class SettlerSettings:
    enabled: bool = True
    idle_s: float = 30.0
    max_rps: float = 5.0
    #: At most this many overdue tasks marked ``unknown`` a second (store writes only, no upstream call).
    max_give_ups_per_s: float = 50.0
    concurrency: int = 4
    task_max_age_s: float = 86400.0


@dataclass(frozen=True)
class PricingSettings:
    default_duration_s: int = 5
    prices: Mapping[str, Decimal] = field(default_factory=lambda: dict(LIST_PRICES_USD_PER_S))
    mode_multipliers: Mapping[str, Decimal] = field(default_factory=lambda: dict.fromkeys(MODES, Decimal(1)))


@dataclass(frozen=True)
class ValidationSettings:
    allow_unknown_fields: bool = False
    block_private_media: bool = True
    #: Resolve media host names and reject names that resolve only to private addresses.
    resolve_media_hosts: bool = True
    resolve_timeout_s: float = 0.5
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
    max_bytes: int = 2 * 1024**3
    connect_timeout_s: float = 5.0
    #: Longest wait for the next bytes from the video's origin.
    read_timeout_s: float = 30.0


@dataclass(frozen=True)
class ArchiveSettings:
    """Copies of completed tasks' videos (SPEC section 10); off while ``url`` is empty."""

    url: str = ""
    #: S3-compatible endpoint (``s3://`` only); empty: AWS itself.
    endpoint_url: str = ""
    region: str = ""
    #: Copies made at once by one process.
    concurrency: int = 2
    max_attempts: int = 5
    #: First retry delay; doubled per attempt up to an hour.
    retry_base_s: float = 30.0
    #: How often each process looks for completed tasks to copy.
    scan_s: float = 5.0
    #: Completed tasks this recent are copied by the running gateway; older ones by ``archive backfill``.
    lookback_s: float = 86400.0
    #: Copies older than this are deleted; 0 keeps them forever.
    keep_days: float = 0.0
    #: Status answers carry the gateway's content URL (``[server] public_url``) instead of the upstream's.
    rewrite_video_url: bool = False


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    access_log: bool = True


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
    content: ContentSettings = field(default_factory=ContentSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    #: Secrets, from the environment only; excluded from repr so they never reach a log line.
    upstream_api_key: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    #: Signs completion webhooks (HMAC-SHA256); webhooks are off while it is unset.
    webhook_secret: str = field(default="", repr=False)

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
    if name not in ("upstream_api_key", "admin_token", "webhook_secret")
}
_SECRET_KEYS = {
    ("upstream", "api_key"),
    ("upstream", "key"),
    ("auth", "admin_token"),
    ("admin", "token"),
    ("webhook", "secret"),
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
    for section_name, section_type in _SECTIONS.items():
        values = raw.pop(section_name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{section_name}]: expected a table, got {type(values).__name__}")
        sections[section_name] = _build_section(section_name, section_type, values, environ)
    if raw:
        name = sorted(raw)[0]
        raise ConfigError(f"[{name}]: unknown section{_hint(name, _SECTIONS)}")
    upstream = sections["upstream"]
    if environ.get("UNIALL_BASE_URL"):
        upstream = dataclasses.replace(upstream, base_url=environ["UNIALL_BASE_URL"])
        sections["upstream"] = upstream
    settings = Settings(
        **sections,
        upstream_api_key=environ.get("UNIALL_API_KEY", ""),
        admin_token=environ.get("KLING_GATEWAY_ADMIN_TOKEN", ""),
        webhook_secret=environ.get("KLING_GATEWAY_WEBHOOK_SECRET", ""),
    )
    _check(settings)
    if require_upstream_key and not settings.upstream_api_key:
        raise ConfigError("UNIALL_API_KEY: not set (the upstream key comes only from the environment)")
    return settings


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
            raise ConfigError(f"{name}.{key}: unknown setting{_hint(key, known)}")
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
    """Range and consistency checks that a type alone cannot express."""
    checks: list[tuple[bool, str]] = [
        (1 <= settings.server.port <= 65535, "server.port: must be between 1 and 65535"),
        (settings.server.max_body_bytes >= 1024, "server.max_body_bytes: must be at least 1024"),
        (settings.server.workers >= 1, "server.workers: must be at least 1"),
        (settings.server.shutdown_timeout_s >= 0, "server.shutdown_timeout_s: must not be negative"),
        (settings.upstream.timeout_s > 0, "upstream.timeout_s: must be positive"),
        (settings.upstream.connect_timeout_s > 0, "upstream.connect_timeout_s: must be positive"),
        (settings.upstream.read_timeout_s > 0, "upstream.read_timeout_s: must be positive"),
        (settings.upstream.pool_timeout_s > 0, "upstream.pool_timeout_s: must be positive"),
        (settings.upstream.max_connections >= 1, "upstream.max_connections: must be at least 1"),
        (settings.upstream.get_retries >= 0, "upstream.get_retries: must not be negative"),
        (
            settings.upstream.breaker_failure_threshold >= 0,
            "upstream.breaker_failure_threshold: must not be negative",
        ),
        (settings.upstream.breaker_open_s > 0, "upstream.breaker_open_s: must be positive"),
        (settings.server.max_in_flight >= 1, "server.max_in_flight: must be at least 1"),
        (settings.server.max_queued >= 0, "server.max_queued: must not be negative"),
        (settings.server.queue_timeout_s >= 0, "server.queue_timeout_s: must not be negative"),
        (settings.server.shutdown_grace_s >= 0, "server.shutdown_grace_s: must not be negative"),
        (
            settings.auth.mode in ("keys", "open"),
            f"auth.mode: must be 'keys' or 'open', got {settings.auth.mode!r}",
        ),
        (
            settings.upstream.transport in UPSTREAM_TRANSPORTS,
            f"upstream.transport: must be 'lean' or 'aiohttp', got {settings.upstream.transport!r}",
        ),
        (settings.auth.rotation_grace_s >= 0, "auth.rotation_grace_s: must not be negative"),
        (settings.auth.refresh_interval_s > 0, "auth.refresh_interval_s: must be positive"),
        (settings.cache.pending_ttl_s >= 0, "cache.pending_ttl_s: must not be negative"),
        (settings.cache.terminal_ttl_s >= 0, "cache.terminal_ttl_s: must not be negative"),
        (settings.cache.max_entries >= 1, "cache.max_entries: must be at least 1"),
        (settings.cache.stale_keep_s >= 0, "cache.stale_keep_s: must not be negative"),
        (settings.settler.max_rps > 0, "settler.max_rps: must be positive"),
        (settings.settler.max_give_ups_per_s > 0, "settler.max_give_ups_per_s: must be positive"),
        (settings.settler.concurrency >= 1, "settler.concurrency: must be at least 1"),
        (settings.settler.idle_s >= 0, "settler.idle_s: must not be negative"),
        (settings.settler.task_max_age_s > 0, "settler.task_max_age_s: must be positive"),
        (
            3 <= settings.pricing.default_duration_s <= 15,
            "pricing.default_duration_s: must be between 3 and 15",
        ),
        (settings.validation.resolve_timeout_s > 0, "validation.resolve_timeout_s: must be positive"),
        (
            settings.logging.level.lower() in ("debug", "info", "warning", "error"),
            "logging.level: must be one of debug, info, warning, error",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
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
            raise ConfigError(f"pricing.mode_multipliers.{mode}: unknown mode{_hint(mode, MODES)}")
        if multiplier < 0:
            raise ConfigError(f"pricing.mode_multipliers.{mode}: must not be negative")


def _check_content(settings: Settings) -> None:
    content, archive = settings.content, settings.archive
    checks = [
        (content.max_bytes >= 1, "content.max_bytes: must be at least 1"),
        (content.connect_timeout_s > 0, "content.connect_timeout_s: must be positive"),
        (content.read_timeout_s > 0, "content.read_timeout_s: must be positive"),
        (archive.concurrency >= 1, "archive.concurrency: must be at least 1"),
        (archive.max_attempts >= 1, "archive.max_attempts: must be at least 1"),
        (archive.retry_base_s >= 0, "archive.retry_base_s: must not be negative"),
        (archive.scan_s > 0, "archive.scan_s: must be positive"),
        (archive.lookback_s >= 0, "archive.lookback_s: must not be negative"),
        (archive.keep_days >= 0, "archive.keep_days: must not be negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
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


def _hint(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
