"""The webhook outbox: at-least-once delivery from the store, leases, retries, pinning per attempt, fairness."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError
from support.records import std_task

from gateway.config import PricingSettings
from gateway.ledger.pricing import PriceTable
from gateway.ledger.service import Ledger
from gateway.logs import make_logger
from gateway.metrics import Metrics, create_metrics
from gateway.store import open_store
from gateway.store.base import OutboxRecord, Store, TaskRecord
from gateway.webhooks.outbox import OutboxOptions, WebhookOutbox, delivery_id
from gateway.webhooks.signing import key_secret, secret_key
from gateway.webhooks.targets import Target
from gateway.webhooks.transport import AiohttpWebhookTransport

SECRET = "whsec_" + base64.b64encode(b"outbox-test-secret-0123456789").decode()
BODY = orjson.dumps({"id": "task_1", "status": "completed", "video_url": "https://cdn.example.com/v.mp4"})
TENANT_SECRET = key_secret(secret_key(SECRET), "tenant")  # what the key "tenant"'s receiver verifies with
PUBLIC = "93.184.216.34"
FAST: dict[str, Any] = {"base_delay_s": 0.01, "max_delay_s": 0.05, "poll_interval_s": 0.02, "timeout_s": 2.0}


class FakeTransport:
    """Records every POST (time, target, headers, body); answers per host from a script; may be slow."""

    def __init__(self, *answers: int | Exception, delay_s: dict[str, float] | None = None) -> None:
        self.answers = list(answers) or [200]
        self.by_host: dict[str, list[int | Exception]] = {}
        self.delay_s = delay_s or {}
        self.posts: list[tuple[float, Target, dict[str, str], bytes]] = []
        self.active: dict[str, int] = {}
        self.most_active: dict[str, int] = {}
        self.gate: asyncio.Event | None = None

    async def post(self, target: Target, headers: list[tuple[str, str]], body: bytes) -> int:
        self.posts.append((time.monotonic(), target, dict(headers), body))
        self.active[target.name] = self.active.get(target.name, 0) + 1
        self.most_active[target.name] = max(self.most_active.get(target.name, 0), self.active[target.name])
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay_s.get(target.name, 0))
            script = self.by_host.get(target.name, self.answers)
            answer = script.pop(0) if len(script) > 1 else script[0]
            if isinstance(answer, Exception):
                raise answer
            return answer
        finally:
            self.active[target.name] -= 1

    async def aclose(self) -> None:
        pass

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for _, _, headers, _ in self.posts]


def resolver_of(table: dict[str, list[list[str]]]) -> Callable[[str], Awaitable[list[str]]]:
    """Names to successive answers (the last repeats); any other name resolves publicly."""

    async def resolve(host: str) -> list[str]:
        answers = table.get(host)
        if not answers:
            return [PUBLIC]
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return resolve


def make_outbox(
    store: Store,
    transport: Any,
    metrics: Metrics | None = None,
    logs: io.StringIO | None = None,
    resolver: Callable[[str], Awaitable[list[str]]] | None = None,
    **options: Any,
) -> WebhookOutbox:
    metrics = metrics or create_metrics()
    return WebhookOutbox(
        store,
        secret_key(SECRET),
        transport,
        resolver or resolver_of({}),
        log=make_logger(stream=logs if logs is not None else io.StringIO()),
        deliveries=metrics.webhook_deliveries,
        attempts=metrics.webhook_attempts,
        options=OutboxOptions(**{**FAST, **options}),
    )


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def until_async(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def events(logs: io.StringIO) -> list[str]:
    return [orjson.loads(line)["event"] for line in logs.getvalue().splitlines()]


def count(metrics: Metrics, name: str, label: str) -> float:
    value = metrics.registry.get_sample_value(f"kling_gateway_webhook_{name}_total", {"outcome": label})
    if value is None:
        value = metrics.registry.get_sample_value(f"kling_gateway_webhook_{name}_total", {"result": label})
    return value or 0.0


async def pending(store: Store) -> list[OutboxRecord]:
    return await store.outbox_list("pending")


class TestStoreOutbox:
    """The outbox rows in both backends."""

    def record(self, n: int, *, key: str = "k", host: str = "h.example.com") -> OutboxRecord:
        return OutboxRecord(f"msg_{n}", key, host, f"https://{host}/{n}", b"{}", created_at=float(n))

    async def test_claim_is_a_lease(self, store: Store) -> None:
        """A leased row is claimed by nobody else until the lease ends; a lost lease records nothing."""
        assert await store.outbox_add(self.record(1), 10, 10)
        assert [r.delivery_id for r in await store.outbox_claim(100.0, "a", 110.0, 10, 5, 5)] == ["msg_1"]
        assert await store.outbox_claim(105.0, "b", 115.0, 10, 5, 5) == []
        assert [r.delivery_id for r in await store.outbox_claim(111.0, "b", 121.0, 10, 5, 5)] == ["msg_1"]
        assert not await store.outbox_delivered("msg_1", "a")  # a's lease has gone to b
        assert await store.outbox_retry("msg_1", "b", 200.0, "status 503")
        [row] = await pending(store)
        assert (row.attempts, row.next_attempt_at, row.last_error) == (1, 200.0, "status 503")
        assert await store.outbox_claim(150.0, "c", 160.0, 10, 5, 5) == []  # not due yet
        assert await store.outbox_claim(200.0, "c", 210.0, 10, 5, 5) != []
        assert await store.outbox_failed("msg_1", "c", "status 500")
        assert await pending(store) == []
        [failed] = await store.outbox_list("failed")
        assert (failed.state, failed.attempts, failed.last_error) == ("failed", 2, "status 500")
        assert await store.outbox_claim(999.0, "d", 1009.0, 10, 5, 5) == []

    async def test_add_is_idempotent_and_capped_per_key_and_host(self, store: Store) -> None:
        """The same delivery id twice is one row; a key or host at its pending cap takes no more."""
        assert await store.outbox_add(self.record(1), 2, 10)
        assert not await store.outbox_add(self.record(1), 2, 10)
        assert await store.outbox_add(self.record(2), 2, 10)
        assert not await store.outbox_add(self.record(3), 2, 10)  # key k at 2
        assert await store.outbox_add(self.record(4, key="other"), 2, 10)
        assert not await store.outbox_add(self.record(5, key="third"), 10, 3)  # host at 3
        assert await store.outbox_add(self.record(6, key="third", host="x.example.com"), 10, 3)

    async def test_claim_is_fair(self, store: Store) -> None:
        """At most per_host/per_key rows of one host/key per claim; busy hosts and keys are skipped."""
        for n in range(6):
            await store.outbox_add(self.record(n, key="slow", host="slow.example.com"), 100, 100)
        await store.outbox_add(self.record(10, key="calm", host="calm.example.com"), 100, 100)
        claimed = await store.outbox_claim(100.0, "a", 110.0, 10, 2, 2)
        assert sorted(r.delivery_id for r in claimed) == ["msg_0", "msg_1", "msg_10"]
        assert await store.outbox_claim(100.0, "a", 110.0, 10, 2, 2, busy_hosts=["slow.example.com"]) == []
        more = await store.outbox_claim(100.0, "a", 110.0, 10, 2, 2, busy_keys=["calm"])
        assert [r.delivery_id for r in more] == ["msg_2", "msg_3"]
        assert await store.outbox_release("msg_2", "a")
        assert [r.delivery_id for r in await store.outbox_claim(100.0, "b", 110.0, 1, 2, 2)] == ["msg_2"]


class TestDelivery:
    """Signed, retried with backoff, kept as failed after the last attempt."""

    async def test_delivered_signed_and_removed(self, store: Store) -> None:
        """One POST with the Standard Webhooks headers; the row is gone and the metric counts it."""
        transport, metrics, logs = FakeTransport(204), create_metrics(), io.StringIO()
        outbox = make_outbox(store, transport, metrics, logs)
        outbox.start()
        assert await outbox.enqueue("task_1", "tenant", "https://hooks.example.com/k?token=s3cret", BODY)
        await until(lambda: len(transport.posts) == 1)
        await until_async(lambda: _empty(store))
        _, target, headers, body = transport.posts[0]
        assert body == BODY and headers["Content-Type"] == "application/json"
        assert headers["webhook-id"] == delivery_id("task_1")
        assert Webhook(TENANT_SECRET).verify(body, headers)["status"] == "completed"
        with pytest.raises(WebhookVerificationError):  # another key's receiver cannot verify (nor forge) it
            Webhook(key_secret(secret_key(SECRET), "other-tenant")).verify(body, headers)
        assert (target.address, target.name) == (PUBLIC, "hooks.example.com")
        await outbox.aclose()
        assert count(metrics, "deliveries", "delivered") == 1
        assert "webhook_delivered" in events(logs) and "s3cret" not in logs.getvalue()

    async def test_retried_with_backoff_under_one_id(self, store: Store) -> None:
        """503, a connection error, then 200: three signed POSTs with one webhook-id, further apart each time."""
        transport = FakeTransport(503, OSError("refused"), 200)
        outbox = make_outbox(store, transport, base_delay_s=0.1, max_delay_s=1.0)
        outbox.start()
        await outbox.enqueue("task_1", "tenant", "https://hooks.example.com/", BODY)
        await until(lambda: len(transport.posts) == 3)
        await outbox.aclose()
        assert set(transport.ids()) == {delivery_id("task_1")}
        times = [at for at, *_ in transport.posts]
        assert times[1] - times[0] >= 0.05 and times[2] - times[1] >= 0.1  # jittered 50-100 % of 0.1, then 0.2
        for _, _, headers, body in transport.posts:
            Webhook(TENANT_SECRET).verify(body, headers)
        assert await pending(store) == []

    async def test_final_failure_is_kept_and_counted(self, store: Store) -> None:
        """After max_attempts the row stays as failed (with the last error) and the metric counts it."""
        transport, metrics, logs = FakeTransport(500), create_metrics(), io.StringIO()
        outbox = make_outbox(store, transport, metrics, logs, max_attempts=3)
        outbox.start()
        await outbox.enqueue("task_1", "tenant", "https://hooks.example.com/", BODY)
        await until_async(lambda: _has_failed(store))
        await outbox.aclose()
        [row] = await store.outbox_list("failed")
        assert (row.attempts, row.last_error, row.delivery_id) == (3, "status 500", delivery_id("task_1"))
        assert len(transport.posts) == 3
        assert count(metrics, "deliveries", "failed") == 1 and count(metrics, "attempts", "failed") == 3
        assert "webhook_failed" in events(logs)

    async def test_same_task_enqueued_twice_is_one_delivery(self, store: Store) -> None:
        """The delivery id comes from the task id: a second enqueue is dropped, not sent twice."""
        outbox = make_outbox(store, FakeTransport())
        assert await outbox.enqueue("task_1", "tenant", "https://hooks.example.com/", BODY)
        assert not await outbox.enqueue("task_1", "tenant", "https://hooks.example.com/", BODY)
        await outbox.aclose()


class TestPinningPerAttempt:
    """Every attempt resolves, checks every address and connects to the checked one."""

    @pytest.mark.parametrize("answer", [[PUBLIC, "127.0.0.1"], ["127.0.0.1", PUBLIC], ["::1"]])
    async def test_name_with_a_private_address_is_never_contacted(self, store: Store, answer: list[str]) -> None:
        """Mixed answers: no POST at all; every attempt is refused and the row ends failed."""
        transport, logs = FakeTransport(), io.StringIO()
        outbox = make_outbox(
            store, transport, logs=logs, resolver=resolver_of({"hooks.example.com": [answer]}), max_attempts=2
        )
        outbox.start()
        await outbox.enqueue("task_1", "tenant", "https://hooks.example.com/", BODY)
        await until_async(lambda: _has_failed(store))
        await outbox.aclose()
        assert transport.posts == [] and events(logs).count("webhook_refused") == 2
        [row] = await store.outbox_list("failed")
        assert row.last_error is not None and "private" in row.last_error

    async def test_rebinding_between_attempts_is_caught(self, store: Store) -> None:
        """Public on the first attempt (503), loopback on the second: the second attempt sends nothing."""
        transport = FakeTransport(503)
        resolver = resolver_of({"hooks.example.com": [[PUBLIC], ["127.0.0.1"]]})
        outbox = make_outbox(store, transport, resolver=resolver, max_attempts=2)
        outbox.start()
        await outbox.enqueue("task_1", "tenant", "https://hooks.example.com/", BODY)
        await until_async(lambda: _has_failed(store))
        await outbox.aclose()
        assert [target.address for _, target, _, _ in transport.posts] == [PUBLIC]


async def _empty(store: Store) -> bool:
    return not await store.outbox_list("pending")


async def _has_failed(store: Store) -> bool:
    return bool(await store.outbox_list("failed"))


class TestRestart:
    """Deliveries live in the store: a new process delivers what an old one left."""

    async def test_enqueued_then_crashed_is_delivered_by_the_next_process(self, backend_url: str) -> None:
        """Enqueued, the process stops before any attempt; a new store and outbox deliver it."""
        first = await open_store(backend_url)
        await make_outbox(first, FakeTransport()).enqueue("task_1", "tenant", "https://hooks.example.com/", BODY)
        await first.close()
        second, transport = await open_store(backend_url), FakeTransport()
        outbox = make_outbox(second, transport)
        outbox.start()
        await until(lambda: len(transport.posts) == 1)
        await outbox.aclose()
        assert transport.ids() == [delivery_id("task_1")]
        await second.close()

    async def test_attempt_cut_by_shutdown_is_made_again_after_the_lease(self, backend_url: str) -> None:
        """An attempt hanging at shutdown is abandoned to its lease; another process retries it, same id."""
        first, hanging = await open_store(backend_url), FakeTransport()
        hanging.gate = asyncio.Event()
        old = make_outbox(first, hanging, lease_margin_s=0.3, timeout_s=0.2, resolve_timeout_s=0.1)
        old.start()
        await old.enqueue("task_1", "tenant", "https://hooks.example.com/", BODY)
        await until(lambda: len(hanging.posts) == 1)
        await old.aclose(timeout_s=0.01)
        await first.close()
        second, transport = await open_store(backend_url), FakeTransport()
        new = make_outbox(second, transport)
        new.start()
        await until(lambda: len(transport.posts) == 1)
        await new.aclose()
        assert transport.ids() == hanging.ids() == [delivery_id("task_1")]
        await second.close()


def task_of(task_id: str, key: str = "tenant") -> TaskRecord:
    return std_task(task_id, key, time.time())


async def recorded(store: Store, task_id: str, key: str = "tenant") -> TaskRecord:
    task = task_of(task_id, key)
    assert await store.resolve_intent(f"intent-{task_id}", task)
    return task


def ledger_with(store: Store, outbox: WebhookOutbox, urls: dict[str, str], metrics: Metrics | None = None) -> Ledger:
    """A ledger whose settlements carry the webhooks of the keys in ``urls`` (as builders.build_ledger wires it)."""
    prices = PriceTable.from_settings(PricingSettings())
    log = make_logger(stream=io.StringIO())
    return Ledger(store, prices, metrics or create_metrics(), log, webhooks=outbox.for_keys(urls.get))


def completed(task_id: str) -> tuple[dict[str, Any], bytes]:
    body = {"id": task_id, "status": "completed", "output_seconds": 5}
    return body, orjson.dumps(body)


class TestSettledWithItsWebhook:
    """The ledger's settlement writes the webhook in the same transaction, then wakes the worker."""

    HOOK: dict[str, str] = {"tenant": "https://hooks.example.com/k"}  # noqa: RUF012 - read only

    async def test_settled_then_crashed_is_delivered_by_the_next_process(self, backend_url: str) -> None:
        """Once ``observe`` returns, the delivery is in the store: a process that dies right after (no worker ever
        ran, nothing closed) loses nothing, and a fresh process's outbox delivers it."""
        first = await open_store(backend_url)
        task = await recorded(first, "task_1")
        status, raw = completed("task_1")
        await ledger_with(first, make_outbox(first, FakeTransport()), self.HOOK).observe(task, status, raw, polled=True)
        second, transport = await open_store(backend_url), FakeTransport()
        fresh = make_outbox(second, transport)
        try:
            assert await fresh.fill() == 1
            await until(lambda: len(transport.posts) == 1)
            await until_async(lambda: _empty(second))
        finally:
            await fresh.aclose()
            await second.close()
            await first.close()
        assert transport.ids() == [delivery_id("task_1")] and transport.posts[0][3] == raw

    async def test_worker_is_woken_by_the_settlement(self, store: Store) -> None:
        """Delivery does not wait for the worker's next poll (30 s here): the settlement wakes it."""
        transport = FakeTransport()
        outbox = make_outbox(store, transport, poll_interval_s=30.0)
        ledger = ledger_with(store, outbox, self.HOOK)
        task = await recorded(store, "task_1")
        outbox.start()
        await asyncio.sleep(0.1)  # the worker's first look found nothing: it now sleeps until woken
        started = time.monotonic()
        await ledger.observe(task, *completed("task_1"), polled=True)
        await until(lambda: len(transport.posts) == 1, timeout_s=5)
        await outbox.aclose()
        assert transport.posts[0][0] - started < 2.0

    async def test_one_delivery_per_task_and_none_without_a_url_or_for_giving_up(self, store: Store) -> None:
        """A terminal status seen twice (two pollers) writes one row; a key without a webhook URL and a task given
        up as unknown write none."""
        outbox = make_outbox(store, FakeTransport())
        ledger = ledger_with(store, outbox, self.HOOK)
        task = await recorded(store, "task_1")
        await ledger.observe(task, *completed("task_1"), polled=True)
        await ledger.observe(task, *completed("task_1"), polled=False)  # a stale copy of the row: not first
        quiet = await recorded(store, "task_2", key="no-hook")
        await ledger.observe(quiet, *completed("task_2"), polled=True)
        lost = await recorded(store, "task_3")
        assert await ledger.give_up(lost)
        assert [r.delivery_id for r in await pending(store)] == [delivery_id("task_1")]
        settled = await store.get_task("task_2")
        assert settled is not None and settled.outcome == "completed"

    async def test_dropped_at_the_pending_cap_is_logged_and_counted(self, store: Store) -> None:
        """The key already has its pending cap: the task settles, the webhook is dropped with a log and metric."""
        metrics, logs = create_metrics(), io.StringIO()
        outbox = make_outbox(store, FakeTransport(), metrics, logs, max_pending_per_target=1)
        assert await outbox.enqueue("task_0", "tenant", "https://hooks.example.com/k", BODY)
        task = await recorded(store, "task_1")
        await ledger_with(store, outbox, self.HOOK).observe(task, *completed("task_1"), polled=True)
        assert [r.delivery_id for r in await pending(store)] == [delivery_id("task_0")]
        assert count(metrics, "deliveries", "dropped") == 1 and "webhook_dropped" in events(logs)
        settled = await store.get_task("task_1")
        assert settled is not None and settled.outcome == "completed"


class TestSharedStore:
    """Several workers (replicas) on one store deliver each row once in the normal case."""

    async def test_two_workers_deliver_each_once(self, backend_url: str) -> None:
        """30 deliveries, two outboxes on two store connections: every id sent exactly once."""
        stores = [await open_store(backend_url), await open_store(backend_url)]
        transports = [FakeTransport(), FakeTransport()]
        outboxes = [make_outbox(s, t, per_target_concurrency=8) for s, t in zip(stores, transports, strict=True)]
        for n in range(30):
            assert await outboxes[n % 2].enqueue(f"task_{n}", f"key{n % 3}", f"https://h{n % 5}.example.com/", BODY)
        for outbox in outboxes:
            outbox.start()
        await until(lambda: sum(len(t.posts) for t in transports) >= 30)
        await until_async(lambda: _empty(stores[0]))
        await asyncio.sleep(0.1)
        for outbox in outboxes:
            await outbox.aclose()
        sent = transports[0].ids() + transports[1].ids()
        assert sorted(sent) == sorted(delivery_id(f"task_{n}") for n in range(30))
        for s in stores:
            await s.close()


class TestFairness:
    """A slow, failing receiver cannot starve another tenant's deliveries."""

    async def test_healthy_receiver_stays_fast_beside_a_slow_failing_one(self, store: Store) -> None:
        """30 deliveries to a receiver answering 503 after 0.5 s; another tenant's delivery still lands at once."""
        transport = FakeTransport(delay_s={"slow.example.com": 0.5})
        transport.by_host["slow.example.com"] = [503]
        outbox = make_outbox(store, transport, concurrency=8, per_target_concurrency=2, base_delay_s=0.05)
        outbox.start()
        for n in range(30):
            assert await outbox.enqueue(f"slow_{n}", "slowpoke", "https://slow.example.com/", BODY)
        await until(lambda: transport.active.get("slow.example.com", 0) == 2)
        started = time.monotonic()
        assert await outbox.enqueue("calm_1", "calm", "https://calm.example.com/", BODY)
        await until(lambda: any(t.name == "calm.example.com" for _, t, _, _ in transport.posts))
        latency = next(at for at, t, _, _ in transport.posts if t.name == "calm.example.com") - started
        await outbox.aclose(timeout_s=0.01)
        assert latency < 0.25, latency
        assert transport.most_active["slow.example.com"] <= 2

    async def test_pending_cap_drops_only_the_flooding_tenant(self, store: Store) -> None:
        """Beyond max_pending_per_target for a host/key, only that host's or key's deliveries are dropped."""
        transport, metrics, logs = FakeTransport(), create_metrics(), io.StringIO()
        outbox = make_outbox(store, transport, metrics, logs, max_pending_per_target=20)
        accepted = [await outbox.enqueue(f"slow_{n}", "flood", "https://slow.example.com/", BODY) for n in range(25)]
        assert accepted.count(True) == 20 and accepted[20:] == [False] * 5
        assert await outbox.enqueue("calm_1", "calm", "https://calm.example.com/", BODY)
        assert count(metrics, "deliveries", "dropped") == 5 and "webhook_dropped" in events(logs)
        outbox.start()
        await until(lambda: any(t.name == "calm.example.com" for _, t, _, _ in transport.posts))
        await outbox.aclose(timeout_s=1)


class TestLoopbackReceiver:
    """A real delivery over HTTP to a receiver on loopback, verified with the standardwebhooks library."""

    async def test_real_delivery_verifies_and_reaches_the_pinned_address(self, tmp_path: Path) -> None:
        """The name resolves (injected) to 127.0.0.1 only under the development setting; Host keeps the name."""
        received: list[tuple[dict[str, str], bytes, dict[str, Any]]] = []

        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            headers = dict(request.headers)
            received.append((headers, body, Webhook(TENANT_SECRET).verify(body, headers)))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        store = await open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
        # hooks.example.com is never resolved by the HTTP client: only the injected resolver's answer is used.
        resolver = resolver_of({"hooks.example.com": [["127.0.0.1"]]})
        url = f"http://hooks.example.com:{port}/hook?token=t"
        try:
            refused_logs = io.StringIO()
            strict = make_outbox(store, AiohttpWebhookTransport(timeout_s=2), logs=refused_logs, resolver=resolver)
            strict.start()
            await strict.enqueue("task_strict", "tenant", url, BODY)
            await until(lambda: "webhook_refused" in events(refused_logs))
            await strict.aclose()
            assert received == []
            dev = make_outbox(
                store, AiohttpWebhookTransport(timeout_s=2), resolver=resolver, allow_private_targets=True
            )
            dev.start()
            await dev.enqueue("task_1", "tenant", url, BODY)
            await until(lambda: any(h.get("webhook-id") == delivery_id("task_1") for h, _, _ in received))
            await dev.aclose()
        finally:
            await store.close()
            await runner.cleanup()
        headers, body, payload = next(r for r in received if r[0]["webhook-id"] == delivery_id("task_1"))
        assert body == BODY and payload["id"] == "task_1"
        assert headers["Host"] == f"hooks.example.com:{port}"
        assert headers["Content-Type"] == "application/json"
