"""Builds the content service and, when ``[archive] url`` is set, the archive and its copier (for the app factory)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from gateway.config import Settings
from gateway.content.archive_store import ArchiveBackend, open_archive
from gateway.content.archiver import Archiver
from gateway.content.fetch import AuthFailed, Dial, VideoFetcher
from gateway.content.metrics import ContentMetrics
from gateway.content.origin import KeyForTask, origin_of, team_key
from gateway.content.service import ContentService, Poll
from gateway.store.base import Store
from gateway.validation.media_guard import Resolver


def build_content(
    settings: Settings,
    *,
    metrics: ContentMetrics,
    store: Store,
    poll: Poll,
    log: Any,
    clock: Callable[[], float],
    stack: contextlib.AsyncExitStack,
    resolver: Resolver | None = None,
    dial: Dial | None = None,
    key_for: KeyForTask | None = None,
    auth_failed: AuthFailed | None = None,
) -> tuple[ContentService, Archiver | None]:
    """The ``/content`` service and the archiver (None while the archive is off); closed by ``stack``.

    ``auth_failed`` (``UpstreamClient.auth_failed``) counts and logs a video origin rejecting the key as the API's
    rejections are."""
    key_for = key_for or team_key(settings.upstream_api_key)
    upstream = origin_of(settings.upstream.base_url)
    fetcher = VideoFetcher(settings.content, upstream, resolver=resolver, dial=dial, auth_failed=auth_failed)
    stack.push_async_callback(fetcher.aclose)
    archive = open_archive(settings.archive)
    if archive is not None:
        stack.push_async_callback(archive.aclose)
    service = ContentService(settings.content, fetcher, archive, store, metrics, key_for, poll, log)
    archiver = None
    if archive is not None:
        archiver = make_archiver(settings, archive, store, fetcher, key_for, metrics, log, clock)
    return service, archiver


def make_archiver(
    settings: Settings,
    archive: ArchiveBackend,
    store: Store,
    fetcher: VideoFetcher,
    key_for: KeyForTask,
    metrics: ContentMetrics,
    log: Any,
    clock: Callable[[], float],
) -> Archiver:
    return Archiver(settings.archive, settings.content, store, archive, fetcher, key_for, metrics, log, clock)
