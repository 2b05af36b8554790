"""The shipped alert rules and scrape configs, checked by Prometheus's own promtool.

``promtool check rules`` / ``check config`` parse them as Prometheus will; ``promtool test rules`` runs the unit
tests of config/alerts.test.yml, and every alert of config/alerts.yml must fire in at least one of them. promtool
comes with Debian's ``prometheus`` package, which .ci/run installs; without it these tests are skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.paths import CONFIG_DIR, REPO_ROOT

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)"
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_names() -> list[str]:
    return [rule["alert"] for group in load(CONFIG_DIR / "alerts.yml")["groups"] for rule in group["rules"]]


class TestAlertRules:
    def test_rules_parse(self) -> None:
        """promtool accepts alerts.yml and finds every rule in it."""
        result = promtool("check", "rules", CONFIG_DIR / "alerts.yml")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout

    def test_unit_tests_pass(self) -> None:
        """promtool runs config/alerts.test.yml against alerts.yml: every expected alert, label and annotation."""
        result = promtool("test", "rules", CONFIG_DIR / "alerts.test.yml")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout

    def test_every_alert_fires_in_a_test(self) -> None:
        """Each alert rule has a test case where it fires, with its full labels and annotations spelled out."""
        tests = load(CONFIG_DIR / "alerts.test.yml")
        assert tests["rule_files"] == ["alerts.yml"]
        firing: set[str] = set()
        for case in tests["tests"]:
            for check in case["alert_rule_test"]:
                for alert in check["exp_alerts"]:
                    assert alert["exp_labels"]["severity"], check["alertname"]
                    assert alert["exp_annotations"]["summary"], check["alertname"]
                    firing.add(check["alertname"])
        assert firing == set(alert_names())


class TestScrapeConfigs:
    def test_shipped_config(self) -> None:
        """config/prometheus.yml (with the alerts.yml beside it) is a valid Prometheus configuration."""
        result = promtool("check", "config", CONFIG_DIR / "prometheus.yml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_compose_config(self, tmp_path: Path) -> None:
        """deploy/prometheus.yml is valid as the compose file mounts it: in one directory with alerts.yml."""
        shutil.copy(REPO_ROOT / "deploy" / "prometheus.yml", tmp_path / "prometheus.yml")
        shutil.copy(CONFIG_DIR / "alerts.yml", tmp_path / "alerts.yml")
        result = promtool("check", "config", tmp_path / "prometheus.yml")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS: 1 rule files found" in result.stdout
