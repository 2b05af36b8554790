"""The account pool of one process: admission order, set-aside rules, key changes and the waiting line."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace

import pytest

from gateway.accounts.parse import AccountSettings, fingerprint
from gateway.accounts.pool import AccountPool
from gateway.catalog import RefusalReason
from gateway.logs import make_logs
from gateway.metrics import create_metrics
from gateway.store.base import AccountMark

STD = "kling-v3-std-silent"
CAPACITY = b'{"code": 1303, "message": "parallel task over resource pack limit"}'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(limits: dict[str, int], clock: Clock | None = None, wait_s: float = 0.0) -> AccountPool:
    keys = {name: f"sk-{name}" for name in limits}
    settings = {name: AccountSettings(max_in_flight=limit) for name, limit in limits.items()}
    return AccountPool(
        keys,
        settings,
        create_metrics(),
        make_logs(stream=io.StringIO()).log,
        capacity_wait_s=wait_s,
        clock=clock or Clock(),
    )


def states(p: AccountPool) -> dict[str, str]:
    return {row["name"]: row["state"] for row in p.describe()}


async def test_place_tries_the_next_account_when_the_store_says_full() -> None:
    """The store's refusal marks the account full here and the next candidate is asked."""
    p = pool({"a": 2, "b": 2})
    asked: list[str] = []

    async def admit(account: str, limit: int) -> str | None:
        asked.append(account)
        return None if account == "a" else f"intent-{account}"

    assert await p.place(STD, admit, wait=False) == ("b", "intent-b")
    assert asked == ["a", "b"]
    assert states(p) == {"a": "full", "b": "ok"}
    assert await p.place(STD, admit, exclude={"b"}, wait=False) is None


async def test_capacity_refusal_sets_aside_until_retry_after_or_a_task_ends() -> None:
    """A refused submission's own release keeps the set-aside; a task ending or the time passing ends it."""
    clock = Clock()
    p = pool({"a": 0}, clock)
    assert await p.refused("a", 429, CAPACITY, "30") is RefusalReason.CAPACITY
    p.released("a", task_ended=False)
    assert states(p) == {"a": "full"}
    p.released("a", task_ended=True)
    assert states(p) == {"a": "ok"}
    assert await p.refused("a", 429, b"{}", None) is RefusalReason.RATE_LIMITED
    clock.now += 4.9
    assert states(p) == {"a": "full"}
    clock.now += 0.2  # capacity_retry_after_s (5) without a Retry-After
    assert states(p) == {"a": "ok"}
    assert await p.refused("a", 400, b'{"error": {"code": "bad"}}', None) is None


async def test_unauthorized_until_the_key_changes() -> None:
    """401: unauthorized; the same key again keeps it so, a new key clears it."""
    p = pool({"a": 0, "b": 0})
    assert await p.refused("a", 401, b"", None) is RefusalReason.UNAUTHORIZED
    p.replace_keys({"a": "sk-a", "b": "sk-b"})
    assert states(p)["a"] == "unauthorized"
    p.replace_keys({"a": "sk-a2", "b": "sk-b"})
    assert states(p)["a"] == "ok"
    assert p.describe()[0]["key_fingerprint"] == fingerprint("sk-a2")


async def test_simple_only_for_one_unlimited_account() -> None:
    """The fast submit path is taken for one account without a limit only."""
    assert pool({"default": 0}).simple
    assert not pool({"default": 1}).simple
    assert not pool({"a": 0, "b": 0}).simple


async def test_waiters_are_served_first_come_first_served() -> None:
    """With capacity_wait_s, submissions wait in order and a release lets the first one in."""
    p = pool({"a": 1}, wait_s=5.0)
    room = {"free": 0}
    order: list[str] = []

    def admit_as(name: str) -> object:
        async def admit(account: str, limit: int) -> str | None:
            if room["free"] <= 0:
                return None
            room["free"] -= 1
            order.append(name)
            return name

        return admit

    first = asyncio.create_task(p.place(STD, admit_as("first"), wait=True))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    second = asyncio.create_task(p.place(STD, admit_as("second"), wait=True))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    room["free"] = 1
    p.released("a", task_ended=True)
    assert await asyncio.wait_for(first, 2) == ("a", "first")
    room["free"] = 1
    p.released("a", task_ended=True)
    assert await asyncio.wait_for(second, 2) == ("a", "second")
    assert order == ["first", "second"]


async def test_before_wait_runs_once_before_the_first_wait_and_may_refuse() -> None:
    """``before_wait`` is asked once, only when the submission would wait; what it raises ends the placement
    (before any wait), and what ``admit`` raises too, letting the next in line try."""
    p = pool({"a": 1}, wait_s=0.2)
    checks: list[str] = []

    async def full(account: str, limit: int) -> str | None:
        return None

    async def check() -> None:
        checks.append("checked")

    assert await p.place(STD, full, wait=True, before_wait=check) is None  # waited its 0.2 s, checked once
    assert checks == ["checked"]

    async def admitted(account: str, limit: int) -> str | None:
        return "intent"

    assert await p.place(STD, admitted, wait=True, before_wait=check) == ("a", "intent")
    assert checks == ["checked"]  # placed at once: not asked

    async def refuse() -> None:
        raise RuntimeError("over budget")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RuntimeError, match="over budget"):
        await p.place(STD, full, wait=True, before_wait=refuse)
    assert loop.time() - started < 0.15  # not after the wait

    async def over(account: str, limit: int) -> str | None:
        raise RuntimeError("over budget")

    with pytest.raises(RuntimeError, match="over budget"):
        await p.place(STD, over, wait=True, before_wait=check)
    assert checks == ["checked"]


class MemoryBoard:
    """The shared marks in memory, as one store or Redis would hold them for every process; ``down`` fails it."""

    def __init__(self) -> None:
        self.marks: dict[str, AccountMark] = {}
        self.down = False

    async def read(self) -> dict[str, AccountMark] | None:
        return None if self.down else dict(self.marks)

    async def set_aside(self, account: str, until: float) -> bool:
        if self.down:
            return False
        self.marks[account] = replace(self.marks.get(account, AccountMark(account)), set_aside_until=until)
        return True

    async def unauthorized(self, account: str, key_fingerprint: str) -> bool:
        if self.down:
            return False
        self.marks[account] = replace(self.marks.get(account, AccountMark(account)), unauthorized_key=key_fingerprint)
        return True

    async def end_aside(self, account: str, until: float) -> bool:
        if self.down:
            return False
        mark = self.marks.get(account)
        if mark is not None and mark.set_aside_until <= until:
            self.marks[account] = replace(mark, set_aside_until=0.0)
        return True


def shared_pools(board: MemoryBoard, clock: Clock, keys: dict[str, str] | None = None) -> tuple[AccountPool, ...]:
    keys = keys or {"a": "sk-a", "b": "sk-b"}
    return tuple(
        AccountPool(keys, {}, create_metrics(), make_logs(stream=io.StringIO()).log, clock=clock, board=board)
        for _ in range(2)
    )


async def test_a_refusal_in_one_process_sets_the_account_aside_in_another() -> None:
    """Process one is refused; process two, after its next read of the board, skips the account too; a task
    ending in process two ends the set-aside for both; the time passing ends it as well."""
    clock, board = Clock(), MemoryBoard()
    one, two = shared_pools(board, clock)
    assert await one.refused("a", 429, CAPACITY, "30") is RefusalReason.CAPACITY
    assert states(two) == {"a": "ok", "b": "ok"}  # not read yet: nothing on the submit path asks the board
    await two.sync()
    assert states(two) == {"a": "full", "b": "ok"}
    two.released("a", task_ended=True)
    assert states(two)["a"] == "ok"
    await two.sync()  # ends it on the board first
    assert states(two)["a"] == "ok"
    await one.sync()
    assert states(one)["a"] == "ok"
    await one.refused("b", 429, b"{}", "10")
    await two.sync()
    assert states(two)["b"] == "full"
    clock.now += 10.1
    await two.sync()
    assert states(two)["b"] == "ok"


async def test_unauthorized_is_shared_while_it_names_the_current_key() -> None:
    """A rejected key marks the account unauthorized in every process using that key, not in one that has a
    new key already; and a process keeps what it saw itself even if the board forgets it."""
    clock, board = Clock(), MemoryBoard()
    one, two = shared_pools(board, clock)
    three = shared_pools(board, clock, {"a": "sk-a-rotated", "b": "sk-b"})[0]
    await one.refused("a", 401, b"", None)
    await two.sync()
    await three.sync()
    assert states(two)["a"] == "unauthorized" and two.unauthorized("a")
    assert states(three)["a"] == "ok"
    board.marks.clear()  # a Redis flushed, say
    await one.sync()
    assert states(one)["a"] == "unauthorized"
    two.replace_keys({"a": "sk-a-new", "b": "sk-b"})
    assert states(two)["a"] == "ok"


async def test_a_board_that_fails_leaves_each_process_with_its_own() -> None:
    """Fail open: a set-aside the board could not take is kept here until it passes; a failed read changes
    nothing."""
    clock, board = Clock(), MemoryBoard()
    one, two = shared_pools(board, clock)
    board.down = True
    await one.refused("a", 429, CAPACITY, "30")
    await one.sync()
    assert states(one)["a"] == "full"
    board.down = False
    await one.sync()  # the board has nothing for a, but it never got this process's set-aside
    assert states(one)["a"] == "full"
    await two.sync()
    assert states(two)["a"] == "ok"
    clock.now += 31
    await one.sync()
    assert states(one)["a"] == "ok"


async def test_a_refusal_during_a_read_is_not_undone_by_it() -> None:
    """Marks read before this process's own set-aside do not clear it."""
    clock, board = Clock(), MemoryBoard()
    one, _ = shared_pools(board, clock)
    stale = await board.read()
    assert stale is not None
    await one.refused("a", 429, CAPACITY, "30")
    one.apply_marks(stale, read_since=0.0)
    assert states(one)["a"] == "full"
