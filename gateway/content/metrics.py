"""The content and archive metrics (SPEC section 10), created on the app's registry beside ``gateway.metrics``."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass(frozen=True)
class ContentMetrics:
    archive: Counter
    content_bytes: Counter


def create_content_metrics(registry: CollectorRegistry) -> ContentMetrics:
    archive = Counter(
        "kling_gateway_archive_total",
        "Videos copied to the archive (stored) or attempts that failed.",
        ("result",),
        registry=registry,
    )
    content_bytes = Counter(
        "kling_gateway_content_bytes_total",
        "Video bytes sent to clients, by where they came from.",
        ("source",),
        registry=registry,
    )
    for result in ("stored", "failed"):
        archive.labels(result)
    for source in ("archive", "upstream"):
        content_bytes.labels(source)
    return ContentMetrics(archive=archive, content_bytes=content_bytes)
