"""The SQLite store's single writer: one thread, one connection, and group commit of the queued writes.

:class:`GroupCommitWriter` runs every write of a :class:`gateway.store.sqlite.SQLiteStore` on its own thread and
commits whatever queued up meanwhile in one transaction, each operation still succeeding or failing alone
(see :meth:`GroupCommitWriter._commit_batch`). A caller's ``await`` returns once its write has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from gateway.store.base import StoreError

T = TypeVar("T")

MAX_BATCH: Final = 64
"""Default bound on the write operations one group commit takes (``SQLiteStore(max_batch=...)``)."""
_BATCH_BUDGET_S: Final = 0.004
"""A batch takes no further operation once it has run this long, so a write's wait for its COMMIT stays short."""


def connect(path: str, *, readonly: bool) -> sqlite3.Connection:
    """Open a connection in autocommit mode (transactions are explicit) with the gateway's pragmas."""
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``, rolling back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


def guarded(conn_of: Callable[[], sqlite3.Connection], fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn(conn_of())`` with driver errors raised as :class:`StoreError`."""
    try:
        return fn(conn_of())
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite: {exc}") from exc


async def run_on(pool: ThreadPoolExecutor, call: Callable[[], T]) -> T:
    """Run ``call`` on ``pool`` and await it; :class:`StoreError` if the pool is already shut down."""
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(pool, call)
    except RuntimeError as exc:  # executor shut down between the caller's closed check and the submit
        raise StoreError("store is closed") from exc
    return await future


def _in_transaction(conn: sqlite3.Connection) -> bool:
    """``conn.in_transaction``, False for a connection that can no longer say (closed)."""
    try:
        return conn.in_transaction
    except sqlite3.Error:
        return False


def _rollback(conn: sqlite3.Connection) -> None:
    if _in_transaction(conn):
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _rollback_to_savepoint(conn: sqlite3.Connection) -> bool:
    """Undo the current operation's savepoint; False if that failed (the transaction is then in doubt)."""
    try:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
    except sqlite3.Error:
        return False
    return True


def _store_error(exc: BaseException) -> BaseException:
    """What a caller sees for ``exc``: driver errors become :class:`StoreError`, anything else is passed on."""
    if isinstance(exc, sqlite3.Error):
        error = StoreError(f"sqlite: {exc}")
        error.__cause__ = exc
        return error
    return exc


class _Op:
    """One queued write: ``fn(conn)`` to run in a transaction, and the future (on ``loop``) awaiting its result."""

    __slots__ = ("fn", "future", "loop")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future


_Outcome = tuple[_Op, Any, BaseException | None]
"""An operation's result or error, resolved on its loop once the batch is over."""


def _resolve(outcomes: list[_Outcome]) -> None:
    """On the event loop: hand each operation its result or error (unless its caller gave up waiting)."""
    for op, result, error in outcomes:
        future = op.future
        if future.done():  # cancelled
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


class GroupCommitWriter:
    """The writer thread and connection of one SQLite file, with its queue of writes to group-commit.

    Group commit: write operations are queued, and the writer thread runs whatever is queued (at most
    ``max_batch`` operations, and no new one once a batch has run ``_BATCH_BUDGET_S``) in one transaction with one
    COMMIT, which is most of a write's cost. Each operation still succeeds or fails alone: a failed operation is
    undone (with its whole transaction, the others being run again, or with a ``SAVEPOINT`` once the batch has seen a
    failure; see :meth:`_commit_batch`) and leaves the others in the batch to commit; an error in COMMIT
    fails every operation of the batch. A caller's ``await`` returns only after the COMMIT that made its write durable
    ("awaited = committed"), and the futures of a batch are resolved with one wake-up of the event loop. A lone write
    is not delayed: a batch never waits for company, it only takes what queued up while the writer was busy, so one
    write is exactly ``BEGIN IMMEDIATE`` / the write / ``COMMIT`` as before. Writes that are not plain transactional
    operations keep a transaction (or no transaction) of their own: the migrations at open, ``PRAGMA optimize`` at
    close, ``ping`` and :meth:`SQLiteStore.rebuild_usage_rollup` (:meth:`transaction_alone`). ``:memory:``
    databases group-commit too: their reads run on the writer thread as well, but always between batches, never
    inside one.
    """

    def __init__(self, path: str, *, max_batch: int = MAX_BATCH) -> None:
        """Prepare the writer for ``path`` (the connection opens on first use, on the writer thread).

        ``max_batch`` bounds the write operations committed together (1: one transaction per operation).
        """
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._path = path
        self._max_batch = max_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        """The writer thread (``:memory:`` stores run their reads on it too, between batches)."""
        self._conn: sqlite3.Connection | None = None
        # Operations waiting for the writer, and whether a drain job is queued on it (or running and bound to look
        # at the queue again). Both, and the move to closed, only change under _queue_lock.
        self._pending: deque[_Op] = deque()
        self._drain_scheduled = False
        self._queue_lock = threading.Lock()
        self._closed = False
        self.commits = 0
        """Write transactions committed by the writer thread since open (migrations not counted): a plain int,
        only ever increased on the writer thread, for tests and benchmarks (operations / commits = batch size)."""

    @property
    def closed(self) -> bool:
        """True once :meth:`begin_close` ran: no new work is taken."""
        return self._closed

    @property
    def queued(self) -> int:
        """Write operations waiting for the writer thread."""
        return len(self._pending)

    # -- writer thread only -----------------------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        """The writer connection, opened on first use. Writer thread only."""
        if self._conn is None:
            self._conn = connect(self._path, readonly=False)
        return self._conn

    def drop_conn(self) -> None:
        """Close the writer connection (a fresh one opens on next use). Writer thread only."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    # -- any thread / event loop ------------------------------------------------------------------------------

    async def call(self, call: Callable[[], T]) -> T:
        """Run ``call()`` on the writer thread, outside any batch."""
        if self._closed:
            raise StoreError("store is closed")
        return await run_on(self.executor, call)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the writer thread (``fn`` opens its own transaction if it writes)."""
        return await self.call(lambda: guarded(self.conn, fn))

    async def transaction_alone(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` as a write transaction of its own on the writer thread (no group commit)."""

        def run(conn: sqlite3.Connection) -> T:
            result = transaction(conn, fn)
            self.commits += 1
            return result

        return await self.run(run)

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` as one atomic write, group-committed with whatever else is queued.

        Returns (or raises) only once the transaction holding the write has committed (or failed). ``fn`` must
        only touch the database through ``conn`` (plus writer-thread-only state, and nothing a rollback could not
        undo), as it may be rolled back to a savepoint, or rolled back with its batch and run again (see
        :meth:`_commit_batch`). Anything else goes through :meth:`transaction_alone`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        op = _Op(fn, loop, future)
        with self._queue_lock:
            if self._closed:
                raise StoreError("store is closed")
            self._pending.append(op)
            if not self._drain_scheduled:
                try:
                    self.executor.submit(self._drain)
                except RuntimeError as exc:  # the executor is gone (interpreter shutting down)
                    self._pending.pop()
                    raise StoreError("store is closed") from exc
                self._drain_scheduled = True
        return await future

    def begin_close(self) -> bool:
        """Take no new work from now on; False if that was already so (close is idempotent)."""
        with self._queue_lock:
            if self._closed:
                return False
            self._closed = True
        return True

    def stop(self) -> None:
        """Blocking, after :meth:`begin_close`: let queued work finish (queued writes are committed), end the thread."""
        self.executor.shutdown(wait=True)  # runs the drain jobs already queued, which empty the write queue
        with self._queue_lock:
            stranded, self._pending = list(self._pending), deque()
        self._hand_back([(op, None, StoreError("store is closed")) for op in stranded])  # never happens; no hang

    def close_conn(self) -> None:
        """Blocking, after :meth:`stop`: ``PRAGMA optimize`` and close the writer connection."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()
            self._conn = None

    # -- group commit (writer thread) -------------------------------------------------------------------------

    def _drain(self) -> None:
        """Writer thread: commit one batch of queued operations, then requeue itself if more are waiting.

        Requeueing rather than looping lets other writer jobs (ping, migrations, ``:memory:`` reads) take turns.
        Once the store is closing the executor takes no new jobs, so the rest of the queue is drained here.
        """
        while True:
            self._commit_batch()
            with self._queue_lock:
                if not self._pending:
                    self._drain_scheduled = False
                    return
                if not self._closed:
                    with contextlib.suppress(RuntimeError):
                        self.executor.submit(self._drain)
                        return

    def _take(self) -> _Op | None:
        with self._queue_lock:
            while self._pending:
                op = self._pending.popleft()
                if not op.future.cancelled():  # nobody waits for it: skipped, as a queued executor job would be
                    return op
        return None

    def _commit_batch(self) -> None:
        """Run queued operations in one transaction and commit once; then resolve them all with one wake-up.

        Operations run back to back without savepoints while none fails (a ``SAVEPOINT``/``RELEASE`` pair per
        operation costs about a fifth of the CPU of a batched submission: see ``bench/ledger_write_bench.py``).
        When one fails, the whole transaction is rolled back: the failed operation gets its error, and the ones
        applied before it in that transaction are run again in a fresh one (their work was undone, not refused),
        so no operation's failure fails another. From then on the batch runs every operation after the first of
        its transaction inside ``SAVEPOINT op`` and undoes only that one on failure (``ROLLBACK TO op``), so
        failures cost a batch at most one re-run per operation. A transaction that SQLite abandoned on its own
        (some I/O, full-disk or out-of-memory errors) is handled as a failure without savepoint (each such failure
        re-runs the operations of the transaction it took down; each takes one failed operation out, so a batch
        always ends). A lone write is exactly ``BEGIN IMMEDIATE`` / the write / ``COMMIT`` (or ``ROLLBACK``), as
        before group commit.
        """
        outcomes: list[_Outcome] = []
        applied: list[tuple[_Op, Any]] = []  # run in the open transaction, waiting for its COMMIT
        again: deque[_Op] = deque()  # applied, then undone by a rollback of the whole transaction: run again
        savepoints = False
        in_tx = False
        conn: sqlite3.Connection | None = None
        taken = 0
        budget_s = _BATCH_BUDGET_S
        started = time.perf_counter()
        while True:
            if again:
                op = again.popleft()
            elif taken < self._max_batch and (taken == 0 or time.perf_counter() - started < budget_s):
                next_op = self._take()
                if next_op is None:
                    break
                op = next_op
                taken += 1
            else:
                break
            try:
                if conn is None:
                    conn = self.conn()
                if not in_tx:
                    conn.execute("BEGIN IMMEDIATE")
                    in_tx = True
            except sqlite3.Error as exc:
                outcomes.append((op, None, _store_error(exc)))
                continue
            savepoint = savepoints and bool(applied)
            try:
                if savepoint:
                    conn.execute("SAVEPOINT op")
                result = op.fn(conn)
                if savepoint:
                    conn.execute("RELEASE op")
            except BaseException as exc:  # the operation's own error, handed to its caller as before
                outcomes.append((op, None, _store_error(exc)))
                savepoints = True
                if savepoint and _in_transaction(conn) and _rollback_to_savepoint(conn):
                    continue  # the operations applied before it stand
                _rollback(conn)  # alone in the transaction, no savepoint, or the transaction is lost
                in_tx = False
                again.extendleft(prev for prev, _ in reversed(applied))
                applied = []
                continue
            applied.append((op, result))
        if in_tx:
            assert conn is not None
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                error = _store_error(exc)
                outcomes.extend((op, None, error) for op, _ in applied)
            else:
                self.commits += 1
                outcomes.extend((op, result, None) for op, result in applied)
        self._hand_back(outcomes)

    @staticmethod
    def _hand_back(outcomes: list[_Outcome]) -> None:
        """Resolve every outcome on its own event loop: one ``call_soon_threadsafe`` per loop per batch."""
        if not outcomes:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, mine in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, mine)
