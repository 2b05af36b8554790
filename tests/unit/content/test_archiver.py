"""The background copier against a real store, a real loopback origin and a real folder, on an injected clock."""

from __future__ import annotations

import io
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry
from support.records import std_task
from support.upstream_fake import FakeUpstream, Video, truncate, video, video_bytes

from gateway.config import ArchiveSettings, ContentSettings
from gateway.content.archive_file import FileArchive
from gateway.content.archiver import Archiver
from gateway.content.fetch import VideoFetcher
from gateway.content.metrics import ContentMetrics, create_content_metrics
from gateway.content.origin import origin_of, team_key
from gateway.logs import make_logs
from gateway.store import open_store
from gateway.store.base import Store

T0 = 1_767_225_600.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class CorruptingArchive(FileArchive):
    """Stores one byte flipped: the read-back must catch it."""

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        async def flipped() -> AsyncIterator[bytes]:
            first = True
            async for chunk in chunks:
                if first and chunk:
                    chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
                    first = False
                yield chunk

        await super().put(key, flipped())


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
async def store(tmp_path: Path) -> AsyncGenerator[Store, None]:
    s = await open_store(f"sqlite:///{tmp_path / 'g.db'}")
    yield s
    await s.close()


async def completed(store: Store, task_id: str, video_url: str, at: float = T0) -> None:
    task = std_task(task_id, "k", at, request_id="r")
    await store.resolve_intent(f"i-{task_id}", task)
    body = orjson.dumps({"status": "completed", "video_url": video_url})
    assert (await store.settle(task_id, "completed", Decimal(5), Decimal("0.42"), body, at)).first


def make_archiver(
    store: Store, fake: FakeUpstream, archive: FileArchive, clock: Clock, **settings: object
) -> tuple[Archiver, ContentMetrics, VideoFetcher]:
    metrics = create_content_metrics(CollectorRegistry())
    fetcher = VideoFetcher(ContentSettings(), origin_of(fake.url))
    options: dict[str, object] = {"url": "file:///unused", "retry_base_s": 10, "max_attempts": 3, **settings}
    archive_settings = ArchiveSettings(**options)  # type: ignore[arg-type]
    log = make_logs(stream=io.StringIO()).log
    archiver = Archiver(
        archive_settings, ContentSettings(), store, archive, fetcher, team_key("sk-a"), metrics, log, clock
    )
    return archiver, metrics, fetcher


def count(metrics: ContentMetrics, result: str) -> float:
    return metrics.archive.labels(result)._value.get()


async def test_copies_once_and_records_size_and_sha256(store: Store, fake: FakeUpstream, tmp_path: Path) -> None:
    fake.always("*", "/files/", video(70_000))
    await completed(store, "t1", f"{fake.url}/files/t1.mp4")
    clock = Clock()
    archiver, metrics, fetcher = make_archiver(store, fake, FileArchive(str(tmp_path / "a")), clock)
    try:
        assert await archiver.sweep(0) == (1, 0)
        assert await archiver.sweep(0) == (0, 0)
    finally:
        await fetcher.aclose()
    import hashlib

    record = await store.get_archive("t1")
    assert record is not None
    assert (record.state, record.size, record.key) == ("stored", 70_000, "t1.mp4")
    assert record.sha256 == hashlib.sha256(video_bytes(0, 70_000)).hexdigest()
    assert count(metrics, "stored") == 1
    assert fake.calls("GET", "/files/t1.mp4") == 1


@pytest.mark.parametrize("broken", ["corrupt", "truncated", "expired"])
async def test_failures_back_off_then_give_up(store: Store, fake: FakeUpstream, tmp_path: Path, broken: str) -> None:
    """A copy that does not verify (or cannot be fetched) is retried after 10 s, 20 s, then given up."""
    if broken == "truncated":
        fake.always("GET", "/files/", truncate(200, b"v" * 5000, 100))
    else:
        fake.always("*", "/files/", video(5000, expired=broken == "expired"))
    await completed(store, "t1", f"{fake.url}/files/t1.mp4")
    clock = Clock()
    archive = CorruptingArchive(str(tmp_path / "a")) if broken == "corrupt" else FileArchive(str(tmp_path / "a"))
    archiver, metrics, fetcher = make_archiver(store, fake, archive, clock)
    try:
        assert await archiver.sweep(0) == (0, 1)
        clock.now += 5
        assert await archiver.sweep(0) == (0, 0)  # backing off
        clock.now += 6
        assert await archiver.sweep(0) == (0, 1)
        clock.now += 21
        assert await archiver.sweep(0) == (0, 1)
        clock.now += 10_000
        assert await archiver.sweep(0) == (0, 0)  # given up
    finally:
        await fetcher.aclose()
    record = await store.get_archive("t1")
    assert record is not None
    assert (record.state, record.attempts) == ("failed", 3)
    assert count(metrics, "failed") == 3
    assert not (tmp_path / "a" / "t1.mp4").exists()  # a copy that did not verify is deleted


async def test_backfill_retries_given_up_copies(store: Store, fake: FakeUpstream, tmp_path: Path) -> None:
    served: Video = video(1000, expired=True)
    fake.always("*", "/files/", served)
    await completed(store, "t1", f"{fake.url}/files/t1.mp4")
    clock = Clock()
    archiver, _metrics, fetcher = make_archiver(store, fake, FileArchive(str(tmp_path / "a")), clock, max_attempts=1)
    try:
        assert await archiver.backfill(0) == (0, 1)
        served.expired = False
        assert await archiver.backfill(0) == (1, 0)
    finally:
        await fetcher.aclose()
    assert (tmp_path / "a" / "t1.mp4").read_bytes() == video_bytes(0, 1000)


async def test_keep_days_removes_old_copies(store: Store, fake: FakeUpstream, tmp_path: Path) -> None:
    fake.always("*", "/files/", video(1000))
    await completed(store, "t1", f"{fake.url}/files/t1.mp4")
    clock = Clock()
    archiver, _metrics, fetcher = make_archiver(store, fake, FileArchive(str(tmp_path / "a")), clock, keep_days=2)
    try:
        assert await archiver.sweep(0) == (1, 0)
        clock.now += 86400
        assert await archiver.expire() == 0
        clock.now += 86401
        assert await archiver.expire() == 1
    finally:
        await fetcher.aclose()
    assert not (tmp_path / "a" / "t1.mp4").exists()
    record = await store.get_archive("t1")
    assert record is not None and record.state == "removed"
    assert await archiver.sweep(0) == (0, 0)  # never copied again


class RecordingStore:
    """The store, with the ``completed_since`` of every candidate query written down."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.since: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def archive_candidates(self, completed_since: float, now: float, limit: int = 100) -> list[tuple[str, float]]:
        self.since.append(completed_since)
        return await self._store.archive_candidates(completed_since, now, limit)


async def test_scans_start_at_the_floor(store: Store, fake: FakeUpstream, tmp_path: Path) -> None:
    """Once every task up to a time is done, later scans start there; a task still retrying holds the floor."""
    served = video(100, expired=True)
    fake.always("*", "/files/bad", served)
    fake.always("*", "/files/", video(100))
    await completed(store, "done", f"{fake.url}/files/done.mp4", at=T0)
    await completed(store, "bad", f"{fake.url}/files/bad.mp4", at=T0 + 10)
    recording = RecordingStore(store)
    clock = Clock()
    clock.now = T0 + 5000
    archiver, _metrics, fetcher = make_archiver(recording, fake, FileArchive(str(tmp_path / "a")), clock)  # type: ignore[arg-type]
    try:
        assert await archiver.sweep(0) == (1, 1)
        assert await archiver.sweep(0) == (0, 0)
        assert recording.since == [0, T0 + 10]  # held at the retrying task
        served.expired = False
        clock.now += 11
        assert await archiver.sweep(0) == (1, 0)
        assert await archiver.sweep(0) == (0, 0)
    finally:
        await fetcher.aclose()
    assert recording.since[-1] == clock.now - 300  # all done: a little behind now, for late settlements


class FlakyStore(RecordingStore):
    """The first two candidate queries fail: a store outage, then an unexpected error."""

    async def archive_candidates(self, completed_since: float, now: float, limit: int = 100) -> list[tuple[str, float]]:
        self.since.append(completed_since)
        if len(self.since) == 1:
            from gateway.store.base import StoreError

            raise StoreError("database is locked")
        if len(self.since) == 2:
            raise RuntimeError("surprise")
        return await self._store.archive_candidates(completed_since, now, limit)


async def test_background_loop_outlives_failures(store: Store, fake: FakeUpstream, tmp_path: Path) -> None:
    """The loop logs a failed or crashed scan and goes on: the task is archived on a later scan."""
    import asyncio

    fake.always("*", "/files/", video(100))
    await completed(store, "t1", f"{fake.url}/files/t1.mp4")
    flaky = FlakyStore(store)
    clock = Clock()
    archiver, metrics, fetcher = make_archiver(flaky, fake, FileArchive(str(tmp_path / "a")), clock, scan_s=0.01)  # type: ignore[arg-type]
    loop = asyncio.create_task(archiver.run())
    try:
        for _ in range(500):
            if count(metrics, "stored") == 1:
                break
            await asyncio.sleep(0.01)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await fetcher.aclose()
    assert count(metrics, "stored") == 1
    assert len(flaky.since) >= 3
