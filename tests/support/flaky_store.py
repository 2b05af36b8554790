"""A real store with injected write failures, for the paths that must survive them."""

from __future__ import annotations

from typing import Any

from gateway.store.base import IntentOutcome, Store, StoreError, TaskRecord


class FlakyStore:
    """``inner``, whose task writes fail the first ``failures`` times and, with ``intents_fail``, every intent
    write; everything else is passed through."""

    def __init__(self, inner: Store, failures: int, intents_fail: bool = False) -> None:
        self._inner = inner
        self.failures = failures
        self.intents_fail = intents_fail

    async def record_intent(self, *args: Any, **kwargs: Any) -> IntentOutcome:
        if self.intents_fail:
            raise StoreError("database is locked (injected)")
        return await self._inner.record_intent(*args, **kwargs)

    async def resolve_intent(self, intent_id: str, task: TaskRecord, release_hold: str | None = None) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("disk I/O error (injected)")
        return await self._inner.resolve_intent(intent_id, task, release_hold)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
