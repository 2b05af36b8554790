"""The secrets one app masks in log lines and in upstream answers: those configured at start-up, and upstream keys
loaded later (a ``UNIALL_API_KEYS_FILE`` rotation). A rotated-out key stays masked for ``RETIRED_KEEP_S`` (at most
``MAX_RETIRED`` of them): requests sent with it may still be answered, and their log lines written, after the change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final

RETIRED_KEEP_S: Final = 7 * 24 * 3600.0
MAX_RETIRED: Final = 256
MIN_SECRET_LEN: Final = 4
"""Shorter strings are not masked: replacing every "ab" in a log line would hide more than it protects."""


class KnownSecrets:
    """A set of secrets that grows when upstream keys change; readers compare ``version`` to rebuild what they
    derive from ``values`` (every secret) or ``upstream`` (the upstream keys, current and rotated-out: all an
    upstream answer can echo), each longest first, so a secret containing another is masked whole."""

    def __init__(self, secrets: Iterable[str] = (), *, clock: Callable[[], float] = time.monotonic) -> None:
        self._fixed = frozenset(s for s in secrets if len(s) >= MIN_SECRET_LEN)
        self._upstream: frozenset[str] = frozenset()
        self._retired: dict[str, float] = {}  # secret -> masked until (insertion order: oldest first)
        self._clock = clock
        self.version = 0
        self.values: tuple[str, ...] = ()
        self.upstream: tuple[str, ...] = ()
        self._rebuild()

    def upstream_keys(self, keys: Iterable[str]) -> None:
        """The upstream keys are now ``keys``: new ones are masked from now on, dropped ones for a while longer."""
        keys = frozenset(k for k in keys if len(k) >= MIN_SECRET_LEN)
        if keys == self._upstream:
            return
        now = self._clock()
        for key in self._upstream - keys:
            self._retired.pop(key, None)
            self._retired[key] = now + RETIRED_KEEP_S
        for key in keys:
            self._retired.pop(key, None)
        self._upstream = keys
        self._rebuild()

    def _rebuild(self) -> None:
        now = self._clock()
        for key in [k for k, until in self._retired.items() if until <= now]:
            del self._retired[key]
        while len(self._retired) > MAX_RETIRED:
            del self._retired[next(iter(self._retired))]
        upstream = self._upstream | set(self._retired)
        self.upstream = _longest_first(upstream)
        self.values = _longest_first(self._fixed | upstream)
        self.version += 1


def _longest_first(secrets: set[str] | frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(secrets, key=lambda s: (-len(s), s)))
