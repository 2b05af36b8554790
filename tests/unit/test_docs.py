"""README.md's generated sections match the code: the configuration reference and troubleshooting by code."""

from __future__ import annotations

import dataclasses
from typing import get_type_hints

import pytest
from support.paths import REPO_ROOT

from gateway.catalog import CODES
from gateway.config import ENV_PREFIX, Settings
from gateway.docs.fixes import FIXES
from gateway.docs.readme import config_reference, field_comments, render_readme, troubleshooting

README = (REPO_ROOT / "README.md").read_text()


def test_readme_generated_sections_are_current() -> None:
    """Fails when a setting, a field comment or a code changed without ``python -m gateway.docs``."""
    assert render_readme(README) == README


def test_every_setting_is_in_the_reference() -> None:
    reference = config_reference()
    for section, section_type in get_type_hints(Settings).items():
        if dataclasses.is_dataclass(section_type):
            for item in dataclasses.fields(section_type):
                assert f"`{ENV_PREFIX}{section.upper()}_{item.name.upper()}`" in reference


def test_every_setting_has_a_meaning() -> None:
    """A ``#:`` comment on the field (or the example file's comment); the reference's last column is never empty."""
    undescribed = [
        line.split("|")[1].strip()
        for line in config_reference().splitlines()
        if line.startswith("| `") and not line.rstrip().removesuffix("|").split("|")[-1].strip()
    ]
    assert undescribed == []


def test_every_code_has_a_fix_and_is_in_the_troubleshooting_table() -> None:
    assert set(FIXES) == set(CODES)
    table = troubleshooting()
    for code in CODES:
        assert f"| `{code}` |" in table and FIXES[code]


def test_field_comments_come_from_the_source() -> None:
    from gateway.config import AuthSettings, StoreSettings

    assert "revocation latency" in field_comments(AuthSettings)["refresh_interval_s"]
    assert field_comments(StoreSettings)["url"].startswith("empty: sqlite")


def test_a_readme_without_the_markers_is_an_error() -> None:
    with pytest.raises(ValueError, match="config-reference"):
        render_readme("# nothing here\n")
