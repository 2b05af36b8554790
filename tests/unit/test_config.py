"""Settings: defaults, TOML, environment overrides, secrets, and one-line errors naming the setting."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from support.paths import REPO_ROOT

from gateway.config import Bounds, ConfigError, OneOf, Settings, bounds, load_settings, one_of


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


class TestDefaults:
    def test_spec_defaults(self) -> None:
        """With nothing configured the SPEC section 2 defaults apply."""
        s = load_settings(env={})
        assert (s.server.host, s.server.port, s.server.data_dir, s.server.max_body_bytes) == (
            "127.0.0.1",
            8080,
            "./data",
            1024 * 1024,
        )
        assert (s.upstream.base_url, s.upstream.timeout_s, s.upstream.connect_timeout_s) == (
            "https://api.uniall.ai",
            30.0,
            5.0,
        )
        assert s.auth.mode == "keys"
        assert s.store_url == "sqlite:///data/gateway.db"
        assert (s.cache.url, s.cache.pending_ttl_s, s.cache.terminal_ttl_s) == ("memory://", 2.0, 3600.0)
        assert (s.settler.idle_s, s.settler.max_rps, s.settler.task_max_age_s) == (30.0, 5.0, 86400.0)
        assert s.pricing.default_duration_s == 5
        assert s.pricing.prices["kling-v3-pro-audio"] == Decimal("0.168")
        assert (s.validation.allow_unknown_fields, s.validation.block_private_media) == (False, True)
        assert s.proxy.passthrough is False

    def test_example_file_loads_and_matches_defaults(self) -> None:
        """The documented example config/gateway.toml is valid and shows the defaults."""
        example = REPO_ROOT / "config" / "gateway.toml"
        assert load_settings(example, env={}) == load_settings(env={})


class TestOverrides:
    def test_toml_then_env(self, tmp_path: Path) -> None:
        """The environment wins over the file, which wins over defaults."""
        path = write(tmp_path, "[server]\nport = 9000\nhost = '0.0.0.0'\n")
        s = load_settings(path, env={"KLING_GATEWAY_SERVER_PORT": "9100"})
        assert (s.server.host, s.server.port) == ("0.0.0.0", 9100)

    @pytest.mark.parametrize(
        ("name", "value", "attr", "expected"),
        [
            ("KLING_GATEWAY_PROXY_PASSTHROUGH", "true", ("proxy", "passthrough"), True),
            (
                "KLING_GATEWAY_VALIDATION_ALLOW_UNKNOWN_FIELDS",
                "1",
                ("validation", "allow_unknown_fields"),
                True,
            ),
            ("KLING_GATEWAY_CACHE_PENDING_TTL_S", "3.5", ("cache", "pending_ttl_s"), 3.5),
            ("KLING_GATEWAY_AUTH_MODE", "open", ("auth", "mode"), "open"),
            (
                "KLING_GATEWAY_VALIDATION_PASSTHROUGH_MODELS",
                "a, b",
                ("validation", "passthrough_models"),
                ("a", "b"),
            ),
            ("KLING_GATEWAY_PRICING_PRICES", '{"m": "0.5"}', ("pricing", "prices"), {"m": Decimal("0.5")}),
        ],
    )
    def test_env_types(self, name: str, value: str, attr: tuple[str, str], expected: object) -> None:
        """Environment strings are converted to each setting's type."""
        s = load_settings(env={name: value})
        assert getattr(getattr(s, attr[0]), attr[1]) == expected

    def test_uniall_base_url(self) -> None:
        """UNIALL_BASE_URL sets the upstream base URL."""
        assert load_settings(env={"UNIALL_BASE_URL": "http://127.0.0.1:9"}).upstream.base_url == "http://127.0.0.1:9"

    def test_secrets_from_env_and_never_in_repr(self) -> None:
        """Secrets come from the environment and never show in a repr (so never in a log line)."""
        s = load_settings(
            env={"UNIALL_API_KEY": "sk-canary-1", "KLING_GATEWAY_ADMIN_TOKEN": "adm-canary-0123456789abcdefghijklmnop"}
        )
        assert s.upstream_api_key == "sk-canary-1" and s.admin_token == "adm-canary-0123456789abcdefghijklmnop"
        assert "canary" not in repr(s)


class TestErrors:
    @pytest.mark.parametrize(
        ("env", "message"),
        [
            (
                {"KLING_GATEWAY_SERVER_PORT": "abc"},
                "server.port: expected an integer, got 'abc' (from KLING_GATEWAY_SERVER_PORT)",
            ),
            ({"KLING_GATEWAY_SERVER_PORT": "70000"}, "server.port: must be between 1 and 65535"),
            ({"KLING_GATEWAY_AUTH_MODE": "none"}, "auth.mode: must be 'keys' or 'open', got 'none'"),
            (
                {"KLING_GATEWAY_PROXY_PASSTHROUGH": "maybe"},
                "proxy.passthrough: expected true or false, got 'maybe' (from KLING_GATEWAY_PROXY_PASSTHROUGH)",
            ),
            (
                {"UNIALL_BASE_URL": "ftp://x"},
                "upstream.base_url: scheme must be one of http, https, got 'ftp'",
            ),
            (
                {"KLING_GATEWAY_CACHE_URL": "memcached://x"},
                "cache.url: scheme must be one of memory, redis, rediss, got 'memcached'",
            ),
            (
                {"KLING_GATEWAY_STORE_URL": "mysql://x"},
                "store.url: scheme must be one of sqlite, postgresql, postgres, got 'mysql'",
            ),
            (
                {"KLING_GATEWAY_PRICING_PRICES": "[1]"},
                "pricing.prices: expected a table, got '[1]' (from KLING_GATEWAY_PRICING_PRICES)",
            ),
            (
                {"KLING_GATEWAY_PRICING_DEFAULT_DURATION_S": "20"},
                "pricing.default_duration_s: must be between 3 and 15",
            ),
            (
                {"KLING_GATEWAY_UPSTREAM_TRANSPORT": "httpx"},
                "upstream.transport: must be 'lean' or 'aiohttp', got 'httpx'",
            ),
            (
                {"KLING_GATEWAY_SETTLER_MAX_GIVE_UPS_PER_S": "0"},
                "settler.max_give_ups_per_s: must be positive",
            ),
            ({"KLING_GATEWAY_CACHE_STALE_KEEP_S": "-1"}, "cache.stale_keep_s: must not be negative"),
            ({"KLING_GATEWAY_SERVER_HEADER_TIMEOUT_S": "0"}, "server.header_timeout_s: must be positive"),
            (
                {"KLING_GATEWAY_SERVER_HEADER_TIMEOUT_S": "soon"},
                "server.header_timeout_s: expected a number, got 'soon' (from KLING_GATEWAY_SERVER_HEADER_TIMEOUT_S)",
            ),
            (
                {"KLING_GATEWAY_SERVER_MAX_CONNECTIONS_READING_HEADERS": "0"},
                "server.max_connections_reading_headers: must be at least 1",
            ),
            ({"KLING_GATEWAY_SERVER_KEEP_ALIVE_TIMEOUT_S": "-1"}, "server.keep_alive_timeout_s: must be positive"),
            (
                {"KLING_GATEWAY_CACHE_KEY_PREFIX": "team a:"},
                "cache.key_prefix: 1-64 characters among letters, digits and . _ : -",
            ),
            (
                {"KLING_GATEWAY_CACHE_KEY_PREFIX": ""},
                "cache.key_prefix: 1-64 characters among letters, digits and . _ : -",
            ),
        ],
    )
    def test_env_errors_name_the_setting(self, env: dict[str, str], message: str) -> None:
        """A malformed environment value fails with one line naming the setting."""
        with pytest.raises(ConfigError) as info:
            load_settings(env=env)
        assert str(info.value) == message
        assert "\n" not in str(info.value)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("[server]\nprot = 1\n", "server.prot: unknown setting; did you mean 'port'?"),
            ("[servre]\nport = 1\n", "[servre]: unknown section; did you mean 'server'?"),
            ("[server]\nport = '80'\n", "server.port: expected an integer, got '80'"),
            (
                "[upstream]\napi_key = 'sk-x'\n",
                "upstream.api_key: secrets are read only from the environment, remove it from the file",
            ),
            ("[pricing.prices]\nx = 'cheap'\n", "pricing.prices.x: expected a decimal number, got 'cheap'"),
            ("[pricing.mode_multipliers]\nvideo = 1\n", "pricing.mode_multipliers.video: unknown mode"),
            ("server = 1\n", "[server]: expected a table, got int"),
        ],
    )
    def test_file_errors_name_the_setting(self, tmp_path: Path, text: str, message: str) -> None:
        """A malformed file value fails with one line naming the setting."""
        with pytest.raises(ConfigError) as info:
            load_settings(write(tmp_path, text), env={})
        assert str(info.value) == message

    def test_invalid_toml(self, tmp_path: Path) -> None:
        """A file that is not TOML is named in the error."""
        with pytest.raises(ConfigError, match=r"gateway\.toml: invalid TOML"):
            load_settings(write(tmp_path, "[server\n"), env={})

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config path that does not exist is an error, not silently ignored."""
        with pytest.raises(ConfigError, match=r"not found$"):
            load_settings(tmp_path / "nope.toml", env={})

    def test_upstream_key_required_when_asked(self) -> None:
        """Serving against the real upstream needs UNIALL_API_KEY."""
        with pytest.raises(ConfigError, match=r"^UNIALL_API_KEY: not set"):
            load_settings(env={}, require_upstream_key=True)

    @pytest.mark.parametrize(
        ("token", "message"),
        [
            ("a", "at least 32 characters"),
            ("admin", "at least 32 characters"),
            (" " * 40, "blanks"),
            ("correct horse battery staple and more", "blanks"),
            ("x" * 31, "at least 32 characters"),
            ("ab" * 20, "repetition"),
            ("token-with-a-tab\t-0123456789abcdefghij", "control characters"),
        ],
    )
    def test_weak_admin_token_refused(self, token: str, message: str) -> None:
        """A short, blank or repetitive admin token stops start-up with a line naming the variable."""
        with pytest.raises(ConfigError, match=rf"^KLING_GATEWAY_ADMIN_TOKEN: .*{message}"):
            load_settings(env={"KLING_GATEWAY_ADMIN_TOKEN": token})

    @pytest.mark.parametrize("token", ["", "Zx8-q2Lr_0aBcDeFgHiJkLmNoPqRsTuVw", "0123456789abcdef0123456789abcdef"])
    def test_strong_or_no_admin_token_accepted(self, token: str) -> None:
        """32+ varied characters pass; no token at all turns the admin API off."""
        assert load_settings(env={"KLING_GATEWAY_ADMIN_TOKEN": token}).admin_token == token


#: One row per declared rule: a bad value and the message it gets (the setting's name is prepended).
RULE_CASES: list[tuple[str, str, str]] = [
    ("ui.session_ttl_s", "59", "must be between 60 and 86400"),
    ("server.port", "65536", "must be between 1 and 65535"),
    ("server.max_body_bytes", "1023", "must be at least 1024"),
    ("server.workers", "0", "must be at least 1"),
    ("server.shutdown_timeout_s", "-1", "must not be negative"),
    ("server.header_timeout_s", "0", "must be positive"),
    ("server.max_connections_reading_headers", "0", "must be at least 1"),
    ("server.keep_alive_timeout_s", "0", "must be positive"),
    ("upstream.timeout_s", "0", "must be positive"),
    ("upstream.connect_timeout_s", "0", "must be positive"),
    ("upstream.read_timeout_s", "0", "must be positive"),
    ("upstream.pool_timeout_s", "0", "must be positive"),
    ("upstream.max_connections", "0", "must be at least 1"),
    ("upstream.get_retries", "-1", "must not be negative"),
    ("upstream.breaker_failure_threshold", "-1", "must not be negative"),
    ("upstream.breaker_open_s", "0", "must be positive"),
    ("upstream.capacity_wait_s", "-1", "must be between 0 and 60"),
    ("upstream.capacity_wait_s", "61", "must be between 0 and 60"),
    ("upstream.capacity_retry_after_s", "0", "must be between 1 and 3600"),
    ("server.max_in_flight", "0", "must be at least 1"),
    ("server.max_queued", "-1", "must not be negative"),
    ("server.queue_timeout_s", "-1", "must not be negative"),
    ("server.shutdown_grace_s", "-1", "must not be negative"),
    ("auth.mode", "bogus", "must be 'keys' or 'open', got 'bogus'"),
    ("upstream.transport", "bogus", "must be 'lean' or 'aiohttp', got 'bogus'"),
    ("auth.rotation_grace_s", "-1", "must not be negative"),
    ("auth.refresh_interval_s", "0", "must be positive"),
    ("cache.pending_ttl_s", "-1", "must not be negative"),
    ("cache.terminal_ttl_s", "-1", "must not be negative"),
    ("cache.max_entries", "0", "must be at least 1"),
    ("cache.stale_keep_s", "-1", "must not be negative"),
    ("settler.max_rps", "0", "must be positive"),
    ("settler.max_give_ups_per_s", "0", "must be positive"),
    ("settler.concurrency", "0", "must be at least 1"),
    ("settler.idle_s", "-1", "must not be negative"),
    ("settler.task_max_age_s", "0", "must be positive"),
    ("webhooks.concurrency", "0", "must be at least 1"),
    ("webhooks.per_target_concurrency", "0", "must be at least 1"),
    ("webhooks.max_pending_per_target", "0", "must be at least 1"),
    ("webhooks.max_attempts", "0", "must be at least 1"),
    ("webhooks.timeout_s", "0", "must be positive"),
    ("webhooks.poll_interval_s", "0", "must be positive"),
    ("content.max_bytes", "0", "must be at least 1"),
    ("content.connect_timeout_s", "0", "must be positive"),
    ("content.read_timeout_s", "0", "must be positive"),
    ("archive.concurrency", "0", "must be at least 1"),
    ("archive.max_attempts", "0", "must be at least 1"),
    ("archive.retry_base_s", "-1", "must not be negative"),
    ("archive.scan_s", "0", "must be positive"),
    ("archive.lookback_s", "-1", "must not be negative"),
    ("archive.keep_days", "-1", "must not be negative"),
    ("pricing.default_duration_s", "16", "must be between 3 and 15"),
    ("validation.resolve_timeout_s", "0", "must be positive"),
    ("logging.level", "loud", "must be one of debug, info, warning, error"),
    ("server.port", "0", "must be between 1 and 65535"),
    ("pricing.default_duration_s", "2", "must be between 3 and 15"),
]


class TestDeclaredRules:
    """Every range and vocabulary is declared beside its field and checked by one checker."""

    @pytest.mark.parametrize(("setting", "bad", "message"), RULE_CASES)
    def test_each_rule_refuses_its_bad_value(self, setting: str, bad: str, message: str) -> None:
        """A value outside the declared rule is refused, naming the setting, from the environment or the file."""
        section, key = setting.split(".")
        with pytest.raises(ConfigError) as info:
            load_settings(env={f"KLING_GATEWAY_{section.upper()}_{key.upper()}": bad})
        assert str(info.value) == f"{setting}: {message}"

    def test_every_rule_is_in_the_table(self) -> None:
        """No declared rule goes untested: the table above names every field that carries one."""
        ruled = {
            f"{section}.{item.name}"
            for section, section_type in get_type_hints(Settings).items()
            if dataclasses.is_dataclass(section_type)
            for item in dataclasses.fields(section_type)
            if item.metadata
        }
        tested = {setting for setting, _, _ in RULE_CASES}
        assert ruled == tested

    @pytest.mark.parametrize(
        ("rule", "value", "problem"),
        [
            (Bounds(above=0), 0.001, None),
            (Bounds(above=0), 0, "must be positive"),
            (Bounds(above=2), 2, "must be greater than 2"),
            (Bounds(at_least=0), 0, None),
            (Bounds(at_least=0), -0.5, "must not be negative"),
            (Bounds(at_least=1024), 1023, "must be at least 1024"),
            (Bounds(at_least=0.5), 0.25, "must be at least 0.5"),
            (Bounds(at_most=10), 11, "must be at most 10"),
            (Bounds(at_least=3, at_most=15), 3, None),
            (Bounds(at_least=3, at_most=15), 15, None),
            (Bounds(at_least=3, at_most=15), 16, "must be between 3 and 15"),
            (Bounds(at_least=3, at_most=15), 2, "must be between 3 and 15"),
            (OneOf(("keys", "open")), "open", None),
            (OneOf(("keys", "open")), "Open", "must be 'keys' or 'open', got 'Open'"),
            (OneOf(("debug", "info", "error"), fold_case=True), "INFO", None),
            (OneOf(("debug", "info", "error"), fold_case=True), "loud", "must be one of debug, info, error"),
        ],
    )
    def test_checker_table(self, rule: Bounds | OneOf, value: Any, problem: str | None) -> None:
        """The generic checker's message for each kind of rule and edge."""
        assert rule.problem(value) == problem

    def test_metadata_helpers(self) -> None:
        """``bounds`` and ``one_of`` build the field metadata the checker reads."""
        assert list(bounds(at_least=1).values()) == [Bounds(at_least=1)]
        assert list(one_of("a", "b").values()) == [OneOf(("a", "b"))]


class TestEnvironmentNames:
    @pytest.mark.parametrize(
        ("name", "suggestion"),
        [
            ("KLING_GATEWAY_SERVER_PROT", "KLING_GATEWAY_SERVER_PORT"),
            ("KLING_GATEWAY_AUTH_MODES", "KLING_GATEWAY_AUTH_MODE"),
            ("KLING_GATEWAY_ADMIN_TOKNE", "KLING_GATEWAY_ADMIN_TOKEN"),
        ],
    )
    def test_a_misspelt_variable_is_an_error_with_a_suggestion(self, name: str, suggestion: str) -> None:
        with pytest.raises(ConfigError) as caught:
            load_settings(env={name: "1"})
        assert str(caught.value).startswith(f"{name}: unknown environment variable")
        assert f"did you mean '{suggestion}'" in str(caught.value)

    @pytest.mark.parametrize(
        "name",
        [
            "KLING_GATEWAY_ADMIN_TOKEN",
            "KLING_GATEWAY_URL",
            "KLING_GATEWAY_KEY",
            "KLING_GATEWAY_TEST_REDIS_URL",
            "KLING_GATEWAY_BENCH_ANYTHING",
            "OTHER_PREFIX_SERVER_PROT",
        ],
    )
    def test_variables_that_are_not_settings_are_allowed(self, name: str) -> None:
        load_settings(env={name: "x" if name != "KLING_GATEWAY_ADMIN_TOKEN" else "x-0123456789abcdefghijklmnopqrstuv"})
