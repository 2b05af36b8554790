"""LRUCache: the bound, what counts as a use (get, put, touch) and what does not (peek, in)."""

from __future__ import annotations

import pytest

from gateway.bounded import LRUCache

# (steps, max_entries, keys left from least to most recently used). A step is (operation, key[, value]).
CASES: list[tuple[str, list[tuple[str, ...]], int, list[str]]] = [
    ("under the bound nothing is evicted", [("put", "a"), ("put", "b")], 3, ["a", "b"]),
    ("the oldest put goes first", [("put", "a"), ("put", "b"), ("put", "c")], 2, ["b", "c"]),
    ("a bound of one keeps the last put", [("put", "a"), ("put", "b"), ("put", "c")], 1, ["c"]),
    ("get marks used", [("put", "a"), ("put", "b"), ("get", "a"), ("put", "c")], 2, ["a", "c"]),
    ("peek does not mark used", [("put", "a"), ("put", "b"), ("peek", "a"), ("put", "c")], 2, ["b", "c"]),
    ("in does not mark used", [("put", "a"), ("put", "b"), ("in", "a"), ("put", "c")], 2, ["b", "c"]),
    ("touch marks used", [("put", "a"), ("put", "b"), ("touch", "a"), ("put", "c")], 2, ["a", "c"]),
    ("put again marks used", [("put", "a"), ("put", "b"), ("put", "a"), ("put", "c")], 2, ["a", "c"]),
    ("a get that misses changes nothing", [("put", "a"), ("get", "z"), ("put", "b")], 2, ["a", "b"]),
    ("pop frees a place", [("put", "a"), ("put", "b"), ("pop", "a"), ("put", "c")], 2, ["b", "c"]),
    ("pop of an absent key is harmless", [("put", "a"), ("pop", "z")], 2, ["a"]),
]


@pytest.mark.parametrize(("steps", "max_entries", "left"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_eviction_order(steps: list[tuple[str, ...]], max_entries: int, left: list[str]) -> None:
    cache: LRUCache[str, str] = LRUCache(max_entries)
    for operation, key, *_ in steps:
        if operation == "put":
            cache.put(key, key.upper())
        elif operation == "get":
            cache.get(key)
        elif operation == "peek":
            cache.peek(key)
        elif operation == "in":
            assert key in cache
        elif operation == "touch":
            cache.touch(key)
        else:
            cache.pop(key)
    assert list(cache) == left
    assert len(cache) == len(left)
    assert [cache.peek(key) for key in left] == [key.upper() for key in left]


@pytest.mark.parametrize(
    ("read", "expected"),
    [("get", "A2"), ("peek", "A2"), ("pop", "A2")],
)
def test_reads_return_the_latest_value(read: str, expected: str) -> None:
    cache: LRUCache[str, str] = LRUCache(4)
    cache.put("a", "A1")
    cache.put("a", "A2")
    assert getattr(cache, read)("a") == expected


@pytest.mark.parametrize("read", ["get", "peek", "pop"])
def test_absent_key_reads_none(read: str) -> None:
    cache: LRUCache[str, int] = LRUCache(4)
    assert getattr(cache, read)("missing") is None


def test_pop_removes() -> None:
    cache: LRUCache[str, int] = LRUCache(4)
    cache.put("a", 1)
    assert cache.pop("a") == 1
    assert "a" not in cache
    assert len(cache) == 0


def test_touch_of_an_absent_key_is_a_key_error() -> None:
    cache: LRUCache[str, int] = LRUCache(4)
    with pytest.raises(KeyError):
        cache.touch("missing")


@pytest.mark.parametrize("max_entries", [0, -1])
def test_bound_must_be_positive(max_entries: int) -> None:
    with pytest.raises(ValueError, match="max_entries must be at least 1"):
        LRUCache(max_entries)
