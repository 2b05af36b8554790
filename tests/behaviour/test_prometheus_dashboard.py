"""A real Prometheus scrapes a real gateway that served traffic; every Grafana dashboard query then runs on it.

Prometheus (Debian's ``prometheus`` package; .ci/run installs it) runs with its own configuration, derived from
config/prometheus.yml (1 s scrapes of this gateway, config/alerts.yml loaded), its own data directory and an
ephemeral loopback port. The gateway is ``kling-gateway serve`` on a loopback port, in front of the sandbox upstream.
The traffic covers every panel: two waves of submissions (a key with a monthly budget, two models), their status
polls to completion (cache misses, hits, settlements) and video downloads (copied to a ``file://`` archive meanwhile),
a rejected body, then the upstream stops while a task is
still running, so its next poll fails (upstream errors) and is answered from the cache (STALE).

Each panel query, template variables substituted as Grafana would ($key and $model -> ``.*`` (All),
$__rate_interval -> 1m, $__range -> 5m), must be accepted by Prometheus and return at least one series with a
number other than 0 (a NaN or a flat 0 would be an empty-looking panel). No panel legitimately stays empty after
this traffic (``MAY_BE_EMPTY`` lists those that may); the "Tasks in flight" panels are non-zero because the
task caught by the outage is still running.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.harness import SANDBOX_API_KEY
from support.paths import CONFIG_DIR
from support.processes import CLI, free_port, gateway_env, start_gateway, stop, wait_for
from support.upstream_fake import ServerThread

from gateway.sandbox import SandboxOptions, create_sandbox_app

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package `prometheus`; .ci/run installs it)"
)

SUBSTITUTIONS = {"$__rate_interval": "1m", "$__range": "5m", "$key": ".*", "$model": ".*"}
# (panel title, refId) of queries allowed to return nothing after the traffic below. None: every panel has data.
#: Panels this traffic leaves empty: it never has an upstream account refuse a submission or fill up (those are
#: covered by tests/behaviour/test_accounts.py and the alert unit tests).
MAY_BE_EMPTY: frozenset[tuple[str, str]] = frozenset(
    {
        ("Upstream account refusals by reason", "A"),
        ("Submissions refused for capacity (429 upstream_capacity)", "A"),
    }
)
VALID = {"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}


# -- the dashboard ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    title: str
    ref: str
    expr: str


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CONFIG_DIR / "grafana-dashboard.json").read_text(encoding="utf-8"))
    return loaded


def panel_queries() -> list[Query]:
    def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for panel in container.get("panels", []):
            yield panel
            yield from panels(panel)

    queries = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable in sorted(SUBSTITUTIONS, key=len, reverse=True):
                expr = expr.replace(variable, SUBSTITUTIONS[variable])
            assert "$" not in expr, f"{panel['title']}: a template variable left in {expr}"
            queries.append(Query(panel["title"], target["refId"], expr))
    return queries


# -- the processes ------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    gateway: str
    prometheus: str
    key: str
    upstream: ServerThread


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Sandbox upstream (thread), gateway (process, with a budgeted key), Prometheus (process) scraping it."""
    options = SandboxOptions(api_key=SANDBOX_API_KEY, queued_s=0.2, run_s=0.5)
    upstream = ServerThread(create_sandbox_app(options), lifespan="off")
    upstream.start()
    gateway_port, prometheus_port = free_port(), free_port()
    env = gateway_env(
        KLING_GATEWAY_SERVER_DATA_DIR=str(tmp_path / "data"),  # for keys create below
        KLING_GATEWAY_CACHE_PENDING_TTL_S="0.2",
        KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS="false",
        KLING_GATEWAY_ARCHIVE_URL=(tmp_path / "archive").as_uri(),
        KLING_GATEWAY_ARCHIVE_SCAN_S="0.2",
        UNIALL_API_KEY=SANDBOX_API_KEY,
        UNIALL_BASE_URL=upstream.url,
    )
    created = subprocess.run(
        [*CLI, "keys", "create", "team-a", "--monthly-budget", "50"], env=env, capture_output=True, text=True
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]

    config = yaml.safe_load((CONFIG_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(CONFIG_DIR / "alerts.yml")]
    (job,) = config["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{gateway_port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")

    logs = tmp_path / "logs"
    logs.mkdir()
    with (logs / "gateway.log").open("w") as gateway_log, (logs / "prometheus.log").open("w") as prometheus_log:
        gateway = start_gateway(env, port=gateway_port, data_dir=tmp_path / "data", log=gateway_log)
        assert PROMETHEUS is not None
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            stdout=prometheus_log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(f"http://127.0.0.1:{gateway_port}/healthz")
            wait_for(f"http://127.0.0.1:{prometheus_port}/-/ready")
            yield Stack(f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{prometheus_port}", key, upstream)
        finally:
            stop(prometheus)
            stop(gateway)
            upstream.close()


# -- the traffic --------------------------------------------------------------------------------------------------


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/video/generations", json=body)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


def poll_until_done(client: httpx.Client, task_id: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        response = client.get(f"/v1/videos/{task_id}")
        assert response.status_code == 200, response.text
        if response.json()["status"] in ("completed", "failed"):
            client.get(f"/v1/videos/{task_id}")  # a cache hit on the final status
            if response.json()["status"] == "completed":  # its video, from the upstream or the archive
                assert client.get(f"/v1/videos/{task_id}/content").status_code == 200
            return
        time.sleep(0.1)
    raise AssertionError(f"{task_id} did not finish")


def wave(client: httpx.Client) -> None:
    """Submissions of two models, a rejected body, polls to completion (misses, hits, settlements)."""
    tasks = [submit(client, VALID), submit(client, {**VALID, "model": "kling-v3-pro-audio", "duration": 10})]
    rejected = client.post("/v1/video/generations", json={**VALID, "duration": 99})
    assert rejected.status_code == 400
    for task_id in tasks:
        poll_until_done(client, task_id)


def upstream_outage(client: httpx.Client, stack: Stack) -> None:
    """A running task's cached status expires while the upstream is down: its polls fail upstream and are answered
    STALE, twice, with a scrape in between (so the error and stale counters are seen to move, not only to appear)."""
    task_id = submit(client, VALID)
    assert client.get(f"/v1/videos/{task_id}").status_code == 200
    stack.upstream.close()
    time.sleep(0.3)  # past [cache] pending_ttl_s
    for _ in range(2):
        response = client.get(f"/v1/videos/{task_id}")
        assert response.status_code == 200, response.text
        assert response.headers["x-cache"] == "STALE"
        scraped(stack.prometheus, 'sum(kling_gateway_status_cache_total{result="stale"})', at_least=1)


def scraped(prometheus: str, expr: str, at_least: float, within_s: float = 15.0) -> None:
    """Wait until Prometheus has scraped a value of ``expr`` of at least ``at_least``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if query(prometheus, f"{expr} >= {at_least}"):
            return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus never scraped {expr} >= {at_least}")


# -- the checks ---------------------------------------------------------------------------------------------------


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """Instant query at now; a query Prometheus refuses fails the test with its error."""
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_numbers(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number other than 0: a rate of a counter that moved, a gauge that was set."""
    return any(math.isfinite(value) and value != 0 for value in (float(series["value"][1]) for series in result))


def empty_queries(prometheus: str) -> list[Query]:
    return [q for q in panel_queries() if not has_numbers(query(prometheus, q.expr))]


class TestDashboardOnRealPrometheus:
    def test_every_panel_query_has_data(self, stack: Stack) -> None:
        """After real traffic, every panel's query is accepted by Prometheus and returns non-zero numbers; the
        template variables list the key and models; the shipped alert rules all evaluate without error."""
        with httpx.Client(base_url=stack.gateway, headers={"Authorization": f"Bearer {stack.key}"}) as client:
            wave(client)
            # Prometheus scrapes the first wave before the second, so rates see the counters move.
            scraped(stack.prometheus, "sum(kling_gateway_tasks_settled_total)", at_least=2)
            wave(client)
            upstream_outage(client, stack)
        deadline = time.monotonic() + 15
        missing = empty_queries(stack.prometheus)
        while missing and time.monotonic() < deadline:
            time.sleep(0.5)
            missing = empty_queries(stack.prometheus)
        unexpected = [q for q in missing if (q.title, q.ref) not in MAY_BE_EMPTY]
        assert unexpected == [], "\n".join(f"{q.title} {q.ref}: {q.expr}" for q in unexpected)

        # The template variables' label_values() queries, as Grafana runs them (the series API per label).
        for variable in dashboard()["templating"]["list"]:
            if variable["type"] != "query":
                continue
            metric, label = variable["query"]["query"].removeprefix("label_values(").rstrip(")").split(", ")
            response = httpx.get(f"{stack.prometheus}/api/v1/label/{label}/values", params={"match[]": metric})
            values = response.json()["data"]
            expected = {"key": {"team-a"}, "model": {"kling-v3-std-silent", "kling-v3-pro-audio"}}[label]
            assert expected <= set(values), (variable["name"], values)

        # The shipped alert rules are loaded and evaluate without error against the real series.
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules").json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        shipped = yaml.safe_load((CONFIG_DIR / "alerts.yml").read_text(encoding="utf-8"))["groups"]
        assert len(rules) == sum(len(group["rules"]) for group in shipped)
        assert [rule["name"] for rule in rules if rule["health"] != "ok"] == []
