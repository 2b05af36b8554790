"""The background copier: every completed task's video into the archive, once across replicas, verified.

Each process scans the ledger every ``[archive] scan_s`` for tasks completed within ``lookback_s`` that nobody has
claimed, claims each in the store (``Store.archive_claim``: one winner across processes and replicas; a claim runs
out after ``LEASE_S``, so a crashed copier's task is taken again) and copies at most ``concurrency`` at once:
fetch (the same guarded fetch as ``/content``) → stream into the archive while hashing → read the copy back and
compare size and SHA-256 → record key, size, SHA-256 and time in the ledger. A failed attempt is retried after
``retry_base_s`` doubling per attempt (at most an hour), and given up (``failed``) after ``max_attempts``.
Copies older than ``keep_days`` are deleted. ``backfill`` runs the same copy for tasks completed before the
archive was on (``kling-gateway archive backfill``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from gateway.config import ArchiveSettings, ContentSettings
from gateway.content.answer import video_state
from gateway.content.archive_store import ArchiveBackend, ArchiveError, archive_key
from gateway.content.fetch import VideoFetcher
from gateway.content.metrics import ContentMetrics
from gateway.content.origin import KeyForTask
from gateway.errors import GatewayError
from gateway.store.base import Store, StoreError, TaskRecord

LEASE_S: Final = 900.0
#: How far another process's settlement time may trail this one's clock (the floor stays this far behind now).
_SETTLE_SKEW_S: Final = 300.0
_PENDING: Final = frozenset({"retry", "busy"})
MAX_RETRY_S: Final = 3600.0
_PAGE: Final = 100


class Archiver:
    def __init__(
        self,
        settings: ArchiveSettings,
        content: ContentSettings,
        store: Store,
        backend: ArchiveBackend,
        fetcher: VideoFetcher,
        key_for: KeyForTask,
        metrics: ContentMetrics,
        log: Any,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.max_bytes = content.max_bytes
        self.store = store
        self.backend = backend
        self.fetcher = fetcher
        self.key_for = key_for
        self.metrics = metrics
        self.log = log
        self.clock = clock
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._floor = 0.0
        #: Tasks still retrying here or claimed by another process: task id -> (settled at, last seen).
        self._holding: dict[str, tuple[float, float]] = {}

    async def run(self) -> None:
        """The background loop (lives as long as the app)."""
        while True:
            try:
                await self.sweep(self.clock() - self.settings.lookback_s)
                await self.expire()
            except (StoreError, ArchiveError) as exc:
                self.log.warning("archive_sweep_failed", error=str(exc))
            except Exception as exc:  # a bug must not stop archiving for the life of the process
                self.log.error("archive_sweep_crashed", error=repr(exc)[:500])
            await asyncio.sleep(self.settings.scan_s)

    async def sweep(self, completed_since: float) -> tuple[int, int]:
        """Copy one page of unclaimed completed tasks; (stored, failed).

        Each scan starts at this process's floor: the settlement time below which every candidate it saw has
        reached an end (stored or given up), so a busy day's archived tasks are not read again every scan. A task
        still retrying or claimed by another process holds the floor at its own time until it ends or has not been
        seen for longer than any claim or back-off lasts; a restart starts again at ``lookback_s``.
        """
        since = max(completed_since, self._floor)
        now = self.clock()
        rows = await self.store.archive_candidates(since, now, _PAGE)
        outcomes = await asyncio.gather(*(self.archive(task_id) for task_id, _ in rows))
        for (task_id, settled), outcome in zip(rows, outcomes, strict=True):
            if outcome in _PENDING:
                self._holding[task_id] = (settled, now)
            else:
                self._holding.pop(task_id, None)
        # A task not seen again for longer than any claim or back-off can last has ended elsewhere.
        horizon = now - (MAX_RETRY_S + LEASE_S + 2 * self.settings.scan_s)
        self._holding = {task_id: held for task_id, held in self._holding.items() if held[1] >= horizon}
        edge = rows[-1][1] if len(rows) == _PAGE else now  # a full page: ties at its edge are read again
        floor = min([edge, *(settled for settled, _ in self._holding.values())])
        self._floor = max(self._floor, min(floor, now - _SETTLE_SKEW_S))
        stored = outcomes.count("stored")
        return stored, sum(1 for outcome in outcomes if outcome in ("retry", "failed"))

    async def backfill(self, completed_since: float) -> tuple[int, int]:
        """Copy every unclaimed completed task settled since ``completed_since``, given-up ones included (one more
        round of attempts each); (stored, failed)."""
        await self.store.archive_retry_failed()
        stored = failed = 0
        while True:
            page_stored, page_failed = await self.sweep(completed_since)
            if page_stored + page_failed == 0:
                return stored, failed
            stored += page_stored
            failed += page_failed

    async def archive(self, task_id: str) -> str:
        """Claim and copy one task: ``stored``, ``retry`` (failed, tried again later), ``failed`` (given up) or
        ``busy`` (claimed by another process)."""
        async with self._slots:
            now = self.clock()
            if not await self.store.archive_claim(task_id, now, now + LEASE_S):
                return "busy"
            try:
                task = await self.store.get_task(task_id)
                if task is None:
                    raise ArchiveError("the task is not in the ledger")
                key, size, digest = await self.copy(task)
            except (GatewayError, ArchiveError, StoreError, OSError) as exc:
                return await self._failed(task_id, exc)
            await self.store.archive_stored(task_id, key, size, digest, self.clock())
            self.metrics.archive.labels("stored").inc()
            self.log.info("archive_stored", task_id=task_id, bytes=size, archive=self.backend.description)
            return "stored"

    async def copy(self, task: TaskRecord) -> tuple[str, int, str]:
        """Fetch the task's video into the archive; (key, size, SHA-256) once the copy reads back the same."""
        status, url = video_state(task.terminal_body)
        if status != "completed" or url is None:
            raise ArchiveError("the task's final answer has no video_url")
        key = archive_key(task.task_id)
        fetched = await self.fetcher.open(url, self.key_for(task))
        if fetched.status != 200:
            fetched.close()
            raise ArchiveError(f"the video's origin answered {fetched.status} to a full GET")
        expected = fetched.content_length
        hasher = hashlib.sha256()
        size = 0
        source_error: list[BaseException] = []

        async def source() -> AsyncIterator[bytes]:
            nonlocal size
            try:
                async for chunk in fetched.chunks(self.max_bytes):
                    hasher.update(chunk)
                    size += len(chunk)
                    yield chunk
            except BaseException as exc:  # kept so the source's own error is reported, not the store's wrapping
                source_error.append(exc)
                raise

        try:
            await self.backend.put(key, source())
        except Exception:
            if source_error:
                raise source_error[0] from None
            raise
        digest = hasher.hexdigest()
        try:
            if expected is not None and size != expected:
                raise ArchiveError(f"the video arrived truncated ({size} of {expected} bytes)")
            await self.verify(key, size, digest)
        except ArchiveError:
            with contextlib.suppress(ArchiveError):
                await self.backend.delete(key)  # never leave a copy that does not match what was fetched
            raise
        return key, size, digest

    async def verify(self, key: str, size: int, digest: str) -> None:
        """Read the copy back: same size and SHA-256, or :class:`ArchiveError`."""
        stored = await self.backend.size(key)
        if stored != size:
            raise ArchiveError(f"the archived copy has {stored} bytes, expected {size}")
        hasher = hashlib.sha256()
        async for chunk in self.backend.read(key):
            hasher.update(chunk)
        if hasher.hexdigest() != digest:
            raise ArchiveError("the archived copy's SHA-256 differs from the bytes fetched")

    async def expire(self) -> int:
        """Delete copies older than ``keep_days``; how many."""
        if self.settings.keep_days <= 0:
            return 0
        before = self.clock() - self.settings.keep_days * 86400
        removed = 0
        for record in await self.store.archives_stored_before(before, _PAGE):
            if record.key:
                await self.backend.delete(record.key)
            await self.store.archive_removed(record.task_id)
            removed += 1
        return removed

    async def _failed(self, task_id: str, exc: BaseException) -> str:
        message = exc.message if isinstance(exc, GatewayError) else str(exc)
        self.metrics.archive.labels("failed").inc()
        try:
            record = await self.store.get_archive(task_id)
            attempts = (record.attempts if record is not None else 0) + 1
            retry_at = None
            if attempts < self.settings.max_attempts:
                retry_at = self.clock() + min(self.settings.retry_base_s * 2 ** (attempts - 1), MAX_RETRY_S)
            await self.store.archive_retry(task_id, retry_at, message)
        except StoreError as store_exc:  # the claim runs out and the task is taken again
            self.log.warning("archive_retry_not_recorded", task_id=task_id, error=str(store_exc))
            return "retry"
        self.log.warning("archive_failed", task_id=task_id, error=message, attempt=attempts, gave_up=retry_at is None)
        return "retry" if retry_at is not None else "failed"
