"""Prometheus metric objects, created on a registry passed in (a fresh one per app, so tests never share state).

Names and labels are the contract of SPEC section 7; dashboards and alert rules in ``config/`` use exactly these.
Label values are bounded: routes are templates, keys are key names (never secrets), models are known ids or
``other``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    upstream_duration: Histogram
    upstream_errors: Counter
    upstream_auth_failures: Counter
    settlement_anomalies: Counter
    admin_auth_lockouts: Counter
    rejections: Counter
    validation_problems: Counter
    generations: Counter
    generation_seconds: Counter
    estimated_cost: Counter
    tasks_settled: Counter
    settled_cost: Counter
    tasks_in_flight: Gauge
    status_cache: Counter
    settler_gave_up: Counter
    key_budget: Gauge
    key_spend: Gauge
    upstream_breaker: Gauge
    shared_state_failures: Counter
    account_in_flight: Gauge
    account_refusals: Counter
    account_unauthorized: Gauge
    account_max_in_flight: Gauge
    webhook_deliveries: Counter
    webhook_attempts: Counter


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every gateway metric on ``registry`` (a new one when None)."""
    registry = registry if registry is not None else CollectorRegistry()
    prefix = "kling_gateway_"
    return Metrics(
        registry=registry,
        requests=Counter(
            prefix + "requests_total",
            "Requests answered, by route template, method and status.",
            ("route", "method", "status"),
            registry=registry,
        ),
        request_duration=Histogram(
            prefix + "request_duration_seconds",
            "Time from request start to response end, by route template.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        upstream_duration=Histogram(
            prefix + "upstream_request_duration_seconds",
            "Upstream call latency, by route and upstream status.",
            ("route", "status"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        upstream_errors=Counter(
            prefix + "upstream_errors_total",
            "Upstream calls that failed: timeout, connect, invalid_response, status_5xx.",
            ("kind",),
            registry=registry,
        ),
        upstream_auth_failures=Counter(
            prefix + "upstream_auth_failures_total",
            "Upstream answers of 401 or 403: the upstream rejected the team's key.",
            ("route",),
            registry=registry,
        ),
        settlement_anomalies=Counter(
            prefix + "settlement_anomalies_total",
            "Completed tasks whose reported seconds were unusable, settled at the requested seconds, by reason.",
            ("reason",),
            registry=registry,
        ),
        admin_auth_lockouts=Counter(
            prefix + "admin_auth_lockouts_total",
            "Addresses locked out after repeated wrong secrets, by where they were tried (admin_api).",
            ("surface",),
            registry=registry,
        ),
        rejections=Counter(
            prefix + "rejections_total",
            "Requests the gateway refused, by the error's top-level code (one per request).",
            ("code",),
            registry=registry,
        ),
        validation_problems=Counter(
            prefix + "validation_problems_total",
            "Problems found in refused request bodies (each 400 invalid_request can have several), by problem code.",
            ("code",),
            registry=registry,
        ),
        generations=Counter(
            prefix + "generations_total",
            "Generation tasks accepted by the upstream.",
            ("model", "tier", "audio", "mode", "key"),
            registry=registry,
        ),
        generation_seconds=Counter(
            prefix + "generation_seconds_total",
            "Requested output seconds of accepted generation tasks.",
            ("model", "mode", "key"),
            registry=registry,
        ),
        estimated_cost=Counter(
            prefix + "estimated_cost_usd_total",
            "Estimated cost in USD of accepted generation tasks.",
            ("model", "mode", "key"),
            registry=registry,
        ),
        tasks_settled=Counter(
            prefix + "tasks_settled_total",
            "Tasks settled, by outcome (completed, failed, unknown).",
            ("model", "outcome", "key"),
            registry=registry,
        ),
        settled_cost=Counter(
            prefix + "settled_cost_usd_total",
            "Settled cost in USD of tasks.",
            ("model", "mode", "key"),
            registry=registry,
        ),
        tasks_in_flight=Gauge(
            prefix + "tasks_in_flight",
            "Tasks submitted and not yet settled, from the ledger (every process's).",
            ("model",),
            registry=registry,
            # Set from the shared ledger, so with several workers the latest value is the right one.
            multiprocess_mode="mostrecent",
        ),
        status_cache=Counter(
            prefix + "status_cache_total",
            "Status polls by cache result: hit, miss, coalesced, stale.",
            ("result",),
            registry=registry,
        ),
        settler_gave_up=Counter(
            prefix + "settler_gave_up_total",
            "Tasks the background settler stopped polling at task_max_age_s (left unknown at their estimate).",
            ("model",),
            registry=registry,
        ),
        key_budget=Gauge(
            prefix + "key_budget_usd",
            "Monthly budget of each key that has one (USD).",
            ("key",),
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        key_spend=Gauge(
            prefix + "key_spend_usd",
            "Month-to-date settled cost plus outstanding estimates of each key with a budget (USD, UTC month).",
            ("key",),
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        upstream_breaker=Gauge(
            prefix + "upstream_breaker_state",
            "1 for the upstream circuit breaker's current state (closed, open, half_open), 0 for the others.",
            ("state",),
            registry=registry,
            multiprocess_mode="livemax",
        ),
        shared_state_failures=Counter(
            prefix + "shared_state_failures_total",
            "Redis operations that failed (the request went on without Redis), by operation.",
            ("operation",),
            registry=registry,
        ),
        account_in_flight=Gauge(
            prefix + "upstream_account_in_flight",
            "Tasks submitted on each upstream account and not yet terminal, from the ledger (every process's).",
            ("account",),
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        account_refusals=Counter(
            prefix + "upstream_account_refusals_total",
            "Submissions an upstream account refused, by reason: capacity, rate_limited, unauthorized.",
            ("account", "reason"),
            registry=registry,
        ),
        account_unauthorized=Gauge(
            prefix + "upstream_account_unauthorized",
            "1 while the upstream rejects an account's key (set aside until the key changes), else 0.",
            ("account",),
            registry=registry,
            multiprocess_mode="livemax",
        ),
        account_max_in_flight=Gauge(
            prefix + "upstream_account_max_in_flight",
            "Each upstream account's max_in_flight (0: no limit), for alerting on every account being full.",
            ("account",),
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        webhook_deliveries=Counter(
            prefix + "webhook_deliveries_total",
            "Completion webhooks by final outcome: delivered, failed (every attempt failed; the outbox row is kept) "
            "or dropped (not enqueued: its host or key at the pending cap).",
            ("outcome",),
            registry=registry,
        ),
        webhook_attempts=Counter(
            prefix + "webhook_attempts_total",
            "Completion webhook delivery attempts, by result (delivered or failed).",
            ("result",),
            registry=registry,
        ),
    )
