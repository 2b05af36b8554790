"""The shipped Grafana dashboard, alert rules and scrape config query only what the gateway exports.

Exported names come from the real exposition: every metric of :func:`gateway.metrics.create_metrics`, touched once
with one label set, rendered by ``prometheus_client.generate_latest`` (so ``_total``, ``_bucket``, ``_count`` ... are
the suffixes Prometheus really sees). PyYAML is not a dependency, so the YAML files are read with small regexes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.paths import REPO_ROOT

from gateway.content.metrics import ContentMetrics, create_content_metrics
from gateway.metrics import Metrics, create_metrics

CONFIG = REPO_ROOT / "config"
METRIC = re.compile(r"\bkling_gateway_[A-Za-z0-9_]+")
SELECTOR = re.compile(r"\b(kling_gateway_[A-Za-z0-9_]+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
# `sum by (a, b) (rate(metric[...]))`, `sum by (a) (metric)`, `histogram_quantile(q, sum by (le) (rate(metric...`
BY_CLAUSE = re.compile(r"\bby\s*\(([\w\s,]*)\)\s*\((?:\s*\w+\()?\s*(kling_gateway_[A-Za-z0-9_]+)")
RANGE_FUNCTION = re.compile(r"\b(rate|increase|irate)\(\s*(kling_gateway_[A-Za-z0-9_]+)")
COUNTER_LIKE = ("_total", "_bucket", "_count", "_sum")


@cache
def exported() -> dict[str, frozenset[str]]:
    """Sample name -> label names, for every sample a fresh gateway registry exposes."""
    metrics = create_metrics(CollectorRegistry())
    content = create_content_metrics(metrics.registry)
    every = [(metrics, field) for field in dataclasses.fields(Metrics)]
    every += [(content, field) for field in dataclasses.fields(ContentMetrics)]
    for owner, field in every:
        metric = getattr(owner, field.name)
        if not isinstance(metric, Counter | Gauge | Histogram):
            continue
        # prometheus_client has no public accessor for a metric's label names; _labelnames is stable since 0.1.
        child = metric.labels(*["x"] * len(metric._labelnames))
        if isinstance(child, Histogram):
            child.observe(0.1)
        elif isinstance(child, Gauge):
            child.set(1)  # some gauges are set-only (multiprocess "mostrecent")
        elif isinstance(child, Counter):
            child.inc()
    text = generate_latest(metrics.registry).decode()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in names.items()}


@cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CONFIG / "grafana-dashboard.json").read_text(encoding="utf-8"))
    return loaded


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query."""
    queries = [
        (f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            queries.append((f"variable {variable['name']!r}", text))
    return queries


def alert_rules() -> list[dict[str, str]]:
    """Each ``- alert:`` block of alerts.yml as {alert, expr, severity, summary}, block scalars unfolded."""
    rules: list[dict[str, str]] = []
    lines = (CONFIG / "alerts.yml").read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.lstrip().startswith("#") or ":" not in line:
            continue
        indent = len(line) - len(line.lstrip(" -"))
        name, _, value = line.strip(" -").partition(":")
        value = value.strip()
        if name == "alert":
            rules.append({"alert": value})
        elif rules and name in ("expr", "severity", "summary"):
            if value in ("|", ">", "|-", ">-"):
                block = []
                while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > indent):
                    block.append(lines[index].strip())
                    index += 1
                value = " ".join(part for part in block if part)
            rules[-1][name] = value.strip("\"'")
    return rules


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def problems_in(where: str, expr: str) -> list[str]:
    """Metric names the gateway does not export, label names a metric does not have, rate() over a gauge."""
    names = exported()
    problems = []
    for name in METRIC.findall(expr):
        if name not in names:
            problems.append(f"{where}: {name} is not exported")
    for name, matchers in SELECTOR.findall(expr):
        for label in MATCHER_LABEL.findall(matchers):
            if name in names and label not in names[name]:
                problems.append(f"{where}: {name} has no label {label!r}")
    for labels, name in BY_CLAUSE.findall(expr):
        for label in filter(None, (part.strip() for part in labels.split(","))):
            if name in names and label not in names[name]:
                problems.append(f"{where}: {name} has no label {label!r} to group by")
    for function, name in RANGE_FUNCTION.findall(expr):
        if not name.endswith(COUNTER_LIKE):
            problems.append(f"{where}: {function}() over {name}, which is not a counter")
    return problems


class TestExportedNames:
    def test_exposition_has_every_suffix(self) -> None:
        """The reference set holds counters with _total, histograms with _bucket/_count/_sum, and the gauge."""
        names = exported()
        assert "kling_gateway_requests_total" in names
        assert "kling_gateway_upstream_request_duration_seconds_bucket" in names
        assert "le" in names["kling_gateway_upstream_request_duration_seconds_bucket"]
        assert "kling_gateway_tasks_in_flight" in names
        assert "kling_gateway_requests" not in names

    @pytest.mark.parametrize(
        ("expr", "problem"),
        [
            ("rate(kling_gateway_requests[5m])", "kling_gateway_requests is not exported"),
            ('kling_gateway_rejections_total{key="a"}', "kling_gateway_rejections_total has no label 'key'"),
            ("sum by (route) (rate(kling_gateway_upstream_errors_total[5m]))", "no label 'route' to group by"),
            ("rate(kling_gateway_tasks_in_flight[5m])", "rate() over kling_gateway_tasks_in_flight"),
        ],
    )
    def test_checker_catches_mistakes(self, expr: str, problem: str) -> None:
        """The checker itself flags a wrong name, a wrong label and a rate over a gauge."""
        assert any(problem in found for found in problems_in("x", expr))


class TestGrafanaDashboard:
    def test_every_query_uses_exported_metrics(self) -> None:
        """Every metric and label a panel or variable queries is one the gateway exports."""
        queries = dashboard_queries()
        assert len(queries) >= 15
        problems = [problem for where, expr in queries for problem in problems_in(where, expr)]
        assert problems == []

    def test_model_is_importable(self) -> None:
        """A dashboard model Grafana 10/11 imports: schema version, unique ids and a layout for every panel."""
        model = dashboard()
        assert 36 <= model["schemaVersion"] <= 41
        assert model["uid"] and model["title"]
        all_panels = list(panels(model))
        ids = [panel["id"] for panel in all_panels]
        assert len(ids) == len(set(ids))
        for panel in all_panels:
            assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            refs = [target["refId"] for target in panel.get("targets", [])]
            assert len(refs) == len(set(refs))

    def test_datasource_is_a_variable(self) -> None:
        """A Prometheus datasource variable, used by every panel and target, so import needs no editing."""
        variables = {variable["name"]: variable for variable in dashboard()["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        expected = {"type": "prometheus", "uid": "${datasource}"}
        for panel in panels(dashboard()):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == expected, panel["title"]
            assert all(target["datasource"] == expected for target in panel["targets"]), panel["title"]

    @pytest.mark.parametrize(
        ("topic", "pattern"),
        [
            ("cost per model, estimated", r"by \(model\) \(rate\(kling_gateway_estimated_cost_usd_total"),
            ("cost per model, settled", r"by \(model\) \(rate\(kling_gateway_settled_cost_usd_total"),
            ("cost per key", r"by \(key\) \(rate\(kling_gateway_(estimated|settled)_cost_usd_total"),
            ("generations by mode", r"by \(mode\) \(rate\(kling_gateway_generations_total"),
            ("rejections by code", r"by \(code\) \(rate\(kling_gateway_rejections_total"),
            ("cache hit ratio", r"kling_gateway_status_cache_total\{result=~\"hit[^}]*\}.*\) / sum\(rate\("),
            (
                "upstream latency p50",
                r"histogram_quantile\(0\.50?, .*kling_gateway_upstream_request_duration_seconds_bucket",
            ),
            (
                "upstream latency p95",
                r"histogram_quantile\(0\.95, .*kling_gateway_upstream_request_duration_seconds_bucket",
            ),
            (
                "upstream latency p99",
                r"histogram_quantile\(0\.99, .*kling_gateway_upstream_request_duration_seconds_bucket",
            ),
            ("request rate by route and status", r"by \(route, status\) \(rate\(kling_gateway_requests_total"),
            ("tasks in flight", r"kling_gateway_tasks_in_flight"),
        ],
    )
    def test_required_panels(self, topic: str, pattern: str) -> None:
        """Each panel topic the platform team asked for has a query that answers it."""
        assert any(re.search(pattern, expr) for _, expr in dashboard_queries()), topic

    def test_quantiles_keep_le(self) -> None:
        """Every histogram_quantile aggregates buckets keeping ``le``, or the quantile is meaningless."""
        for where, expr in dashboard_queries():
            if "histogram_quantile" in expr:
                assert re.search(r"by \(le\b|by \([\w, ]*\ble\b", expr), where
                assert "_bucket" in expr, where


class TestAlertRules:
    def test_every_expr_uses_exported_metrics(self) -> None:
        """Every metric and label an alert queries is one the gateway exports."""
        rules = alert_rules()
        assert len(rules) >= 5
        problems = [problem for rule in rules for problem in problems_in(rule["alert"], rule["expr"])]
        assert problems == []

    def test_rules_are_complete(self) -> None:
        """Each rule has a unique CamelCase name, an expression, a severity and a summary."""
        rules = alert_rules()
        names = [rule["alert"] for rule in rules]
        assert len(names) == len(set(names))
        for rule in rules:
            assert re.fullmatch(r"KlingGateway[A-Z][A-Za-z0-9]+", rule["alert"]), rule
            assert rule.get("expr"), rule["alert"]
            assert rule.get("severity") in ("critical", "warning", "info"), rule["alert"]
            assert rule.get("summary"), rule["alert"]

    @pytest.mark.parametrize(
        ("topic", "metric"),
        [
            ("upstream errors", "kling_gateway_upstream_errors_total"),
            ("spend projected per key", "kling_gateway_estimated_cost_usd_total"),
            ("tasks stuck in flight", "kling_gateway_tasks_in_flight"),
            ("settler gave up", "kling_gateway_settler_gave_up_total"),
            ("rejection spikes", "kling_gateway_rejections_total"),
        ],
    )
    def test_required_alerts(self, topic: str, metric: str) -> None:
        """Alerts cover upstream errors, budget burn, stuck tasks and rejection spikes."""
        assert any(metric in rule["expr"] for rule in alert_rules()), topic

    def test_spend_projection_is_per_key(self) -> None:
        """The budget alert projects spend per key, so its annotation can name the key."""
        (rule,) = [rule for rule in alert_rules() if "estimated_cost_usd_total" in rule["expr"]]
        assert "by (key)" in rule["expr"] and "$labels.key" in rule["summary"]


class TestPrometheusConfig:
    def test_scrapes_the_gateway(self) -> None:
        """The scrape config targets the default listen address at /metrics and loads alerts.yml."""
        text = (CONFIG / "prometheus.yml").read_text(encoding="utf-8")
        active = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert re.search(r"^\s*metrics_path:\s*/metrics\s*$", active, re.MULTILINE)
        assert re.search(r"targets:\s*\[\s*\"127\.0\.0\.1:8080\"\s*\]", active)
        assert re.search(r"^rule_files:\s*\n\s*-\s*alerts\.yml\s*$", active, re.MULTILINE)
        assert re.search(r"^\s*-\s*job_name:\s*kling-gateway\s*$", active, re.MULTILINE)

    def test_token_is_documented_not_embedded(self) -> None:
        """Bearer auth for a protected /metrics is shown commented out, reading the token from a file."""
        text = (CONFIG / "prometheus.yml").read_text(encoding="utf-8")
        assert re.search(r"#\s*credentials_file:", text)
        assert not re.search(r"^\s*credentials:", text, re.MULTILINE)

    def test_alert_job_matches_scrape_job(self) -> None:
        """The up{} alert names the job the scrape config defines."""
        assert any('up{job="kling-gateway"}' in rule["expr"] for rule in alert_rules())
