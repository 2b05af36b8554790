"""Render README.md's generated sections: the configuration reference (from ``gateway.config``'s dataclasses and
their ``#:`` field comments, else the setting's comment in the documented ``config/gateway.toml``) and
troubleshooting by error code (from ``gateway.catalog.CODES`` and ``FIXES``).

Each section sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``; a test fails when the
README and the code disagree, and ``python -m gateway.docs`` rewrites them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

from gateway import config
from gateway.catalog import CODES, Where
from gateway.docs.fixes import FIXES

_FIELD = re.compile(r"^\s+(\w+):\s")
_TOML_SECTION = re.compile(r"^\[([\w.]+)\]")
_TOML_SETTING = re.compile(r"^#?\s*(\w+)\s*=\s*[^#]*#\s*(.+)$")
EXAMPLE_TOML = Path(__file__).resolve().parents[2] / "config" / "gateway.toml"


def toml_comments(text: str) -> dict[tuple[str, str], str]:
    """``(section, key)`` -> the comment after the setting in the documented example file."""
    comments: dict[tuple[str, str], str] = {}
    section = ""
    for line in text.splitlines():
        header = _TOML_SECTION.match(line)
        if header:
            section = header.group(1)
            continue
        setting = _TOML_SETTING.match(line)
        if setting and (section, setting.group(1)) not in comments:
            comments[(section, setting.group(1))] = setting.group(2).strip()
    return comments


def field_comments(section_type: type[Any]) -> dict[str, str]:
    """Each field's comment: the ``#:`` lines above it, else the ``# ...`` after it on its line."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(section_type).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = _FIELD.match(line)
        if match:
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            comments[match.group(1)] = " ".join(pending) or trailing
        pending = []
    return comments


def _default(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None  # pragma: no cover - every setting has a default


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    if isinstance(value, dict | type(config.LIST_PRICES_USD_PER_S)):
        return "`{}`" if not value else "(table)"
    return f"`{value}`"


def _rule(item: dataclasses.Field[Any]) -> str:
    rule = item.metadata.get("gateway.config.rule")
    if isinstance(rule, config.OneOf):
        return "one of " + ", ".join(f"`{c}`" for c in rule.choices)
    if isinstance(rule, config.Bounds):
        parts = []
        if rule.above is not None:
            parts.append(f"> {rule.above:g}")
        if rule.at_least is not None:
            parts.append(f"≥ {rule.at_least:g}")
        if rule.at_most is not None:
            parts.append(f"≤ {rule.at_most:g}")
        return ", ".join(parts)
    return ""


def config_reference() -> str:
    """One table per TOML section: setting, environment variable, default, allowed values, meaning."""
    blocks: list[str] = []
    example = toml_comments(EXAMPLE_TOML.read_text()) if EXAMPLE_TOML.is_file() else {}
    for section, section_type in get_type_hints(config.Settings).items():
        if not (isinstance(section_type, type) and dataclasses.is_dataclass(section_type)):
            continue
        comments = field_comments(section_type)
        rows = ["| setting | environment variable | default | allowed | meaning |", "|---|---|---|---|---|"]
        for item in dataclasses.fields(section_type):
            env = f"{config.ENV_PREFIX}{section.upper()}_{item.name.upper()}"
            meaning = (comments.get(item.name) or example.get((section, item.name), "")).replace("|", "\\|")
            rows.append(f"| `{item.name}` | `{env}` | {_show(_default(item))} | {_rule(item)} | {meaning} |")
        blocks.append(f"**`[{section}]`**\n\n" + "\n".join(rows))
    return "\n\n".join(blocks)


def troubleshooting() -> str:
    """Every code the gateway can answer with: status, what it means, and what to do."""
    rows = ["| code | status | where | meaning | what to do |", "|---|---|---|---|---|"]
    for code in CODES.values():
        where = ", ".join(sorted(w.value for w in code.where))
        statuses = ", ".join(str(s) for s in code.statuses)
        fix = FIXES.get(code.code, "").replace("|", "\\|")
        rows.append(f"| `{code.code}` | {statuses} | {where} | {code.meaning} | {fix} |")
    legend = (
        f"`where`: `{Where.ERROR.value}` is `error.code`, `{Where.PROBLEM.value}` an entry of `error.errors[]`, "
        f"`{Where.WARNING.value}` an `X-Gateway-Warning` on a successful answer."
    )
    return legend + "\n\n" + "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {"config-reference": config_reference, "troubleshooting": troubleshooting}


def render_readme(text: str) -> str:
    """``text`` with every generated section replaced by what the code renders now."""
    for name, render in SECTIONS.items():
        start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
        if start not in text or end not in text:
            raise ValueError(f"README.md has no {start} ... {end} block")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{render()}\n{end}{tail}"
    return text
