"""Upstream accounts from the environment and settings: every shape and every error, as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.accounts.parse import (
    AccountsError,
    AccountSettings,
    account_settings,
    fingerprint,
    keys_from_env,
    parse_keys_file,
    parse_keys_list,
)
from gateway.config import ConfigError, load_settings


class TestKeyVariables:
    @pytest.mark.parametrize(
        ("env", "source", "keys"),
        [
            ({}, None, {}),
            ({"UNIALL_API_KEY": "sk-one"}, "UNIALL_API_KEY", {"default": "sk-one"}),
            ({"UNIALL_API_KEY": "  "}, None, {}),
            ({"UNIALL_API_KEYS": "a=sk-1, b-2=sk-2 ,"}, "UNIALL_API_KEYS", {"a": "sk-1", "b-2": "sk-2"}),
            ({"UNIALL_API_KEYS": "x_" + "y" * 30 + "=k"}, "UNIALL_API_KEYS", {"x_" + "y" * 30: "k"}),
        ],
    )
    def test_accepted(self, env: dict[str, str], source: str | None, keys: dict[str, str]) -> None:
        """Each variable yields its accounts; an empty UNIALL_API_KEY counts as unset."""
        assert keys_from_env(env) == (source, keys)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"UNIALL_API_KEY": "a", "UNIALL_API_KEYS": "b=c"}, "UNIALL_API_KEYS: set only one of"),
            ({"UNIALL_API_KEYS": "b=c", "UNIALL_API_KEYS_FILE": "/x"}, "UNIALL_API_KEYS_FILE: set only one of"),
            ({"UNIALL_API_KEYS": "Bad=c"}, "UNIALL_API_KEYS: item 1: account name 'Bad'"),
            ({"UNIALL_API_KEYS": "a=c,a=d"}, "UNIALL_API_KEYS: item 2: account 'a' named twice"),
            ({"UNIALL_API_KEYS": "a="}, "UNIALL_API_KEYS: item 1: account 'a' has an empty key"),
            ({"UNIALL_API_KEYS": "a"}, "UNIALL_API_KEYS: item 1: expected name=key"),
            ({"UNIALL_API_KEYS": "x" * 33 + "=k"}, "must be 1-32 of"),
            ({"UNIALL_API_KEYS": ","}, "UNIALL_API_KEYS: no account"),
            ({"UNIALL_API_KEY": "sk one"}, "UNIALL_API_KEY: the key has spaces"),
        ],
    )
    def test_refused(self, env: dict[str, str], message: str) -> None:
        """Every malformed variable is one line naming it."""
        with pytest.raises(AccountsError, match=message.replace("(", r"\(")):
            keys_from_env(env)

    def test_errors_never_show_keys(self) -> None:
        """A key that is wrong in some way is never repeated in the message."""
        with pytest.raises(AccountsError) as info:
            parse_keys_list("a=sk-secret-1,a=sk-secret-2")
        assert "sk-secret" not in str(info.value)

    def test_file(self, tmp_path: Path) -> None:
        """The key file: name=key lines, comments and blank lines skipped; an unreadable file names the variable."""
        path = tmp_path / "keys"
        path.write_text("# team keys\n\nmain=sk-a\n backup = sk-b \n")
        env = {"UNIALL_API_KEYS_FILE": str(path)}
        assert keys_from_env(env, lambda p: Path(p).read_text()) == (
            "UNIALL_API_KEYS_FILE",
            {"main": "sk-a", "backup": "sk-b"},
        )
        with pytest.raises(AccountsError, match="UNIALL_API_KEYS_FILE: cannot read"):
            keys_from_env({"UNIALL_API_KEYS_FILE": str(tmp_path / "none")}, lambda p: Path(p).read_text())
        with pytest.raises(AccountsError, match="UNIALL_API_KEYS_FILE: line 2: account 'a' named twice"):
            parse_keys_file("a=1\na=2\n")

    def test_fingerprint(self) -> None:
        """First 8 hex digits of SHA-256."""
        assert len(fingerprint("sk-test")) == 8
        assert fingerprint("a") == "ca978112"


class TestAccountSettings:
    @pytest.mark.parametrize(
        ("file_raw", "env_raw", "expected"),
        [
            (None, None, {}),
            ({"a": {"max_in_flight": 3}}, None, {"a": AccountSettings(3, 1.0, ())}),
            (
                {"a": {"max_in_flight": 3, "models": ["kling-v3-std-*"]}},
                {"a": {"weight": 2}},
                {"a": AccountSettings(3, 2.0, ("kling-v3-std-*",))},
            ),
            ({"a": {"max_in_flight": 3}}, {"a": {"max_in_flight": 0}}, {"a": AccountSettings(0, 1.0, ())}),
            (None, {"b": {"models": "kling-v3-pro-audio"}}, {"b": AccountSettings(0, 1.0, ("kling-v3-pro-audio",))}),
        ],
    )
    def test_merged(self, file_raw: Any, env_raw: Any, expected: dict[str, AccountSettings]) -> None:
        """The environment's fields are laid over the file's, account by account."""
        assert account_settings(file_raw, env_raw) == expected

    @pytest.mark.parametrize(
        ("file_raw", "env_raw", "message"),
        [
            ({"a": {"max_in_flight": -1}}, None, "upstream.accounts.a.max_in_flight: must be between 0"),
            ({"a": {"max_in_flight": "3"}}, None, "upstream.accounts.a.max_in_flight: expected an integer"),
            ({"a": {"max_in_flight": True}}, None, "expected an integer"),
            ({"a": {"weight": 0}}, None, "upstream.accounts.a.weight: must be greater than 0"),
            ({"a": {"weight": "x"}}, None, "upstream.accounts.a.weight: expected a number"),
            ({"a": {"models": 3}}, None, "upstream.accounts.a.models: expected a list"),
            ({"a": {"models": ["bad glob!"]}}, None, "upstream.accounts.a.models: invalid model pattern"),
            ({"a": {"max_inflight": 1}}, None, "did you mean 'max_in_flight'"),
            ({"A": {}}, None, "upstream.accounts.A: account name"),
            ({"a": 3}, None, "upstream.accounts.a: expected a table"),
            (None, {"a": {"weight": -2}}, "KLING_GATEWAY_UPSTREAM_ACCOUNTS.a.weight"),
            (None, [1], "KLING_GATEWAY_UPSTREAM_ACCOUNTS: expected a table"),
        ],
    )
    def test_refused(self, file_raw: Any, env_raw: Any, message: str) -> None:
        """Each bad setting names itself (and where it came from)."""
        with pytest.raises(AccountsError, match=message):
            account_settings(file_raw, env_raw)


class TestLoadSettings:
    def test_accounts_from_toml_and_env(self, tmp_path: Path) -> None:
        """[upstream.accounts.NAME] tables and the JSON variable reach the settings; keys stay out of repr."""
        config = tmp_path / "gateway.toml"
        config.write_text("[upstream]\ncapacity_wait_s = 2\n[upstream.accounts.main]\nmax_in_flight = 4\n")
        env = {
            "UNIALL_API_KEYS": "main=sk-main-secret,spare=sk-spare-secret",
            "KLING_GATEWAY_UPSTREAM_ACCOUNTS": '{"spare": {"weight": 3}}',
        }
        settings = load_settings(config, env=env)
        assert settings.accounts == {"main": AccountSettings(4, 1.0, ()), "spare": AccountSettings(0, 3.0, ())}
        assert settings.upstream.capacity_wait_s == 2
        assert settings.upstream_keys_source == "UNIALL_API_KEYS"
        assert "sk-main-secret" not in repr(settings)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            (
                {"UNIALL_API_KEYS": "main=k", "KLING_GATEWAY_UPSTREAM_ACCOUNTS": '{"mian": {}}'},
                "upstream.accounts.mian: no such account in UNIALL_API_KEYS; did you mean 'main'?",
            ),
            ({"UNIALL_API_KEYS": "main=k", "KLING_GATEWAY_UPSTREAM_ACCOUNTS": "{"}, "KLING_GATEWAY_UPSTREAM_ACCOUNTS"),
            ({"UNIALL_API_KEY": "k", "KLING_GATEWAY_UPSTREAM_CAPACITY_WAIT_S": "-1"}, "upstream.capacity_wait_s"),
            ({"UNIALL_API_KEY": "k", "UNIALL_API_KEYS_FILE": "/nowhere"}, "UNIALL_API_KEYS_FILE: set only one"),
        ],
    )
    def test_startup_errors(self, env: dict[str, str], message: str) -> None:
        """A setting for an account without a key, bad JSON, a bad wait, two key variables: one line each."""
        with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
            load_settings(env=env)

    def test_require_key_names_all_variables(self) -> None:
        """No key at all, where one is required: the message names the three variables."""
        with pytest.raises(ConfigError, match="UNIALL_API_KEYS_FILE"):
            load_settings(env={}, require_upstream_key=True)
