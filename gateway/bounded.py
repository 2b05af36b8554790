"""A map bounded by entry count that drops its least recently used entry first: the per-process caches' one shape.

Pure data structure, imports nothing from the gateway. Values must not be ``None`` (``None`` means "absent").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most ``max_entries`` entries; :meth:`put` evicts the least recently used ones beyond that.

    "Used" means put, read with :meth:`get` or marked with :meth:`touch`; :meth:`peek` and ``in`` leave the order
    alone. ``peek`` and ``touch`` are the underlying dict's own methods, so the hot paths pay no extra call.
    """

    __slots__ = ("_data", "max_entries", "peek", "touch")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._data: OrderedDict[K, V] = OrderedDict()
        self.peek: Callable[[K], V | None] = self._data.get
        """The value for a key, or None, without marking it used."""
        self.touch: Callable[[K], None] = self._data.move_to_end
        """Mark a present key as the most recently used (KeyError if absent)."""

    def get(self, key: K) -> V | None:
        """The value for ``key`` (marked as the most recently used), or None."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Set ``key`` to ``value`` as the most recently used entry; evict the least recently used beyond the bound."""
        data = self._data
        data[key] = value
        data.move_to_end(key)
        while len(data) > self.max_entries:
            data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        """Remove ``key``; its value, or None if it was absent."""
        return self._data.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        """Keys from the least to the most recently used."""
        return iter(self._data)
