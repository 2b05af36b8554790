"""Ledger records for tests that write the store directly: a plain std-silent text task, fields overridable."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

from gateway.store.base import TaskRecord


def std_task(task_id: str, key: str, at: float, usd: str = "0.42", **fields: Any) -> TaskRecord:
    """A 5 s ``kling-v3-std-silent`` text task estimated at ``usd``, submitted at ``at``; ``fields`` override."""
    record = TaskRecord(
        task_id=task_id,
        key_name=key,
        model="kling-v3-std-silent",
        mode="text",
        tier="std",
        audio=False,
        duration=5,
        duration_defaulted=False,
        estimate_seconds=5,
        estimate_usd=Decimal(usd),
        price_per_second_usd=Decimal(usd) / 5,
        mode_multiplier=Decimal(1),
        request_id=f"req-{task_id}",
        submitted_at=at,
    )
    return dataclasses.replace(record, **fields) if fields else record
