"""The catalogue of domain words: statuses, models, modes, limits, and every code the gateway answers with."""

from __future__ import annotations

import importlib
import re
from decimal import Decimal
from typing import Any

import pytest
from support.paths import REPO_ROOT

from gateway import errors
from gateway.catalog import (
    CODES,
    DURATION_MAX,
    DURATION_MIN,
    IDEMPOTENCY_KEY_SHAPE,
    KEY_NAME_SHAPE,
    MODELS,
    MODES,
    PENDING,
    REQUEST_ID_SHAPE,
    TASK_ID_SHAPE,
    TASK_STATUSES,
    TERMINAL,
    Mode,
    TaskStatus,
    Where,
    codes_where,
)
from gateway.config import LIST_PRICES_USD_PER_S, load_settings
from gateway.validation.checks import validate
from gateway.web import openapi
from gateway.web.openapi import openapi_document

GATEWAY = REPO_ROOT / "gateway"
IMG = "https://example.com/a.png"

# Where a code is written in the source: code="x", default_code = "x", Problem(param, "x", ...) and
# self.problem(param, "x", ...), a warning string "x: ...", the HTTPException table, and openapi's _codes(...).
_ONE_CODE = (
    re.compile(r'\bcode="([a-z_]+)"'),
    re.compile(r'\bdefault_code\b[^=\n]*= "([a-z_]+)"'),
    re.compile(r'(?:self\.problem|\bProblem)\(\s*[^,()]+,\s*"([a-z_]+)"'),
    re.compile(r'warnings\.append\(\s*f?"([a-z_]+): '),
)
_MANY_CODES = (re.compile(r"^_HTTP_CODES = \{(.*)\}$", re.M), re.compile(r"\b_codes\(([^()]*)\)"))


def _quoted(text: str) -> list[str]:
    return re.findall(r'"([a-z_]+)"', text)


def source_codes() -> dict[str, set[str]]:
    """Every code literal in gateway/ (but the catalogue itself), with the files that write it."""
    found: dict[str, set[str]] = {}
    for path in GATEWAY.rglob("*.py"):
        if path.name == "catalog.py":
            continue
        text = path.read_text()
        codes = [code for pattern in _ONE_CODE for code in pattern.findall(text)]
        codes += [code for pattern in _MANY_CODES for group in pattern.findall(text) for code in _quoted(group)]
        for code in codes:
            found.setdefault(code, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


class TestStatuses:
    @pytest.mark.parametrize(
        ("status", "terminal", "pending"),
        [
            ("queued", False, True),
            ("in_progress", False, True),
            ("completed", True, False),
            ("failed", True, False),
            ("unknown", False, False),
        ],
    )
    def test_each_status(self, status: str, terminal: bool, pending: bool) -> None:
        """Every status is a task status; terminal and pending ones are the upstream's, apart."""
        assert status in TASK_STATUSES and TaskStatus(status) == status
        assert (status in TERMINAL, status in PENDING) == (terminal, pending)

    def test_the_sets_hold_plain_strings(self) -> None:
        """The sets hold the values, not enum members, so they store and serialize as the strings they are."""
        for value in (*TASK_STATUSES, *TERMINAL, *PENDING, *MODES):
            assert type(value) is str


class TestModels:
    @pytest.mark.parametrize(
        ("model", "tier", "audio", "price"),
        [
            ("kling-v3-std-silent", "std", False, "0.084"),
            ("kling-v3-std-audio", "std", True, "0.126"),
            ("kling-v3-pro-silent", "pro", False, "0.112"),
            ("kling-v3-pro-audio", "pro", True, "0.168"),
        ],
    )
    def test_model_table(self, model: str, tier: str, audio: bool, price: str) -> None:
        """Each Kling v3 id says its tier and audio; validation and the default prices read the same table."""
        info = MODELS[model]
        assert (info.tier, info.audio, info.list_price_usd_per_s) == (tier, audio, Decimal(price))
        assert LIST_PRICES_USD_PER_S[model] == Decimal(price)
        request = validate({"model": model, "prompt": "a fox"}).request
        assert request is not None and (request.tier, request.audio) == (tier, audio)

    def test_only_four_models(self) -> None:
        """The table is exactly the four Kling v3 ids."""
        assert len(MODELS) == 4


class TestModes:
    @pytest.mark.parametrize(
        ("fields", "mode"),
        [
            ({}, Mode.TEXT),
            ({"image": IMG}, Mode.IMAGE),
            ({"image": IMG, "last_image": IMG}, Mode.FIRST_LAST),
        ],
    )
    def test_mode_of_a_request(self, fields: dict[str, Any], mode: Mode) -> None:
        """The mode validation derives is one of the catalogue's, as a plain string."""
        request = validate({"model": "kling-v3-std-silent", "prompt": "a fox", **fields}).request
        assert request is not None and request.mode == mode and type(request.mode) is str

    def test_config_multipliers_cover_the_modes(self) -> None:
        """Every mode gets a default multiplier; an unknown one is refused with a hint."""
        assert tuple(load_settings(env={}).pricing.mode_multipliers) == MODES == ("text", "image", "first_last")


class TestLimits:
    @pytest.mark.parametrize(
        ("duration", "code"),
        [
            (DURATION_MIN - 1, "duration_out_of_range"),
            (DURATION_MIN, None),
            (DURATION_MAX, None),
            (DURATION_MAX + 1, "duration_out_of_range"),
        ],
    )
    def test_duration_edges(self, duration: int, code: str | None) -> None:
        """The duration range validation enforces is the catalogue's."""
        result = validate({"model": "kling-v3-std-silent", "prompt": "a fox", "duration": duration})
        assert [p.code for p in result.problems] == ([code] if code else [])


class TestShapes:
    @pytest.mark.parametrize(
        ("compiled", "shape"),
        [
            ("gateway.web.middleware:_SANE_REQUEST_ID", REQUEST_ID_SHAPE),
            ("gateway.web.routes:_TASK_ID", TASK_ID_SHAPE),
            ("gateway.web.idempotency:_IDEMPOTENCY_KEY", IDEMPOTENCY_KEY_SHAPE),
            ("gateway.keys:_KEY_NAME", KEY_NAME_SHAPE),
        ],
    )
    def test_checks_use_the_catalogue_shape(self, compiled: str, shape: str) -> None:
        """The regular expression each module checks an identifier with is the one the OpenAPI document states."""
        module, name = compiled.split(":")
        assert getattr(importlib.import_module(module), name).pattern == shape

    def test_duration_string_pattern_is_the_duration_range(self) -> None:
        """The OpenAPI pattern for a duration string accepts exactly the integer strings in range."""
        pattern = re.compile(openapi._DURATION_STRING)
        for seconds in range(-2, 40):
            for text in (str(seconds), f"+{seconds}", f"0{seconds}"):
                accepted = validate({"model": "kling-v3-std-silent", "prompt": "a", "duration": text}).valid
                assert bool(pattern.fullmatch(text)) == accepted == (DURATION_MIN <= seconds <= DURATION_MAX), text


class TestCodeCatalogue:
    def test_every_code_in_the_source_is_catalogued(self) -> None:
        """Every code literal the gateway writes is in the catalogue."""
        missing = {code: files for code, files in source_codes().items() if code not in CODES}
        assert missing == {}

    def test_every_catalogued_code_is_in_the_source(self) -> None:
        """No catalogue entry the gateway never answers with."""
        assert set(CODES) - set(source_codes()) == set()

    @pytest.mark.parametrize(
        "cls", [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.GatewayError)]
    )
    def test_error_classes_agree(self, cls: type[errors.GatewayError]) -> None:
        """Each error class's default code comes with that class's status."""
        entry = CODES[cls.default_code]
        assert cls.status in entry.statuses and Where.ERROR in entry.where

    def test_entries_are_well_formed(self) -> None:
        """Each entry has a status, a place and a one-line meaning; problems come with 400, warnings with 200."""
        for code, entry in CODES.items():
            assert entry.code == code and entry.statuses and entry.where
            assert entry.meaning and "\n" not in entry.meaning
            if Where.PROBLEM in entry.where:
                assert 400 in entry.statuses, code
            if Where.WARNING in entry.where:
                assert entry.statuses == (200,) and entry.where == {Where.WARNING}, code

    @pytest.mark.parametrize(
        "env",
        [
            {},
            {"KLING_GATEWAY_AUTH_MODE": "open"},
            {"KLING_GATEWAY_ADMIN_TOKEN": "t" * 16 + "0123456789abcdef", "KLING_GATEWAY_PROXY_PASSTHROUGH": "true"},
            {"KLING_GATEWAY_METRICS_TOKEN": "m"},
        ],
    )
    def test_openapi_codes_come_from_the_catalogue(self, env: dict[str, str]) -> None:
        """Every error code the OpenAPI document lists is catalogued with the status it is listed under."""
        seen = 0
        for operations in openapi_document(load_settings(env=env))["paths"].values():
            for operation in operations.values():
                for status, response in operation["responses"].items():
                    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                    if "allOf" not in schema:
                        continue
                    for code in schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"]:
                        assert int(status) in CODES[code].statuses, (code, status)
                        seen += 1
        assert seen


def readme_errors() -> tuple[set[tuple[int, str]], list[str], list[str]]:
    """The README's error table as (status, code) pairs, and its lists of problem and warning codes."""
    text = (REPO_ROOT / "README.md").read_text()
    pairs: set[tuple[int, str]] = set()
    for statuses, cells in re.findall(r"^\| (\d{3}(?: / \d{3})*) \| (.+) \|$", text, re.M):
        for status, cell in zip(statuses.split(" / "), cells.split(" / "), strict=True):
            pairs.update((int(status), code) for code in re.findall(r"`([a-z_]+)`", cell))
    listed = re.search(r"Validation problem codes: (.*?)\. Warnings:\s*(.*?)\.\n", text, re.S)
    assert listed is not None
    problems, warnings = (re.findall(r"`([a-z_]+)`", part) for part in listed.groups())
    return pairs, problems, warnings


class TestReadme:
    def test_error_table_is_the_catalogue(self) -> None:
        """The README's status/code table lists exactly the catalogue's error codes, under their statuses."""
        pairs, _, _ = readme_errors()
        expected = {(status, e.code) for e in CODES.values() if Where.ERROR in e.where for status in e.statuses}
        assert pairs == expected

    def test_problem_and_warning_lists_are_the_catalogue(self) -> None:
        """The README lists every validation problem and warning code, each once."""
        _, problems, warnings = readme_errors()
        assert sorted(problems) == sorted(codes_where(Where.PROBLEM))
        assert sorted(warnings) == sorted(codes_where(Where.WARNING))
