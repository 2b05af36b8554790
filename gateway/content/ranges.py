"""The ``Range`` request header (RFC 9110 section 14): one byte range, parsed apart from any size, then resolved.

Pure. A header that is not one well-formed byte range (several ranges, other units, bad syntax) is ignored, as
RFC 9110 allows: the whole representation is served. Resolving against the size says which bytes to send, or
that the range is unsatisfiable (416).

>>> resolve(parse_range("bytes=-10"), 100)
ByteSpan(start=90, end=99)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_ONE_RANGE: Final = re.compile(r"bytes[ \t]*=[ \t]*([0-9]{0,19})-([0-9]{0,19})[ \t]*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """``first-last`` (``last`` None: to the end) or, with ``first`` None, the final ``suffix`` bytes."""

    first: int | None
    last: int | None = None
    suffix: int | None = None

    def header(self) -> str:
        """The spec as a ``Range`` header value again (sent on to an origin)."""
        if self.first is None:
            return f"bytes=-{self.suffix}"
        return f"bytes={self.first}-" + ("" if self.last is None else str(self.last))


@dataclass(frozen=True, slots=True)
class ByteSpan:
    """Inclusive byte positions ``start``..``end`` of a representation."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class Unsatisfiable:
    """The range lies outside the representation: 416 with ``Content-Range: bytes */size``."""

    def __repr__(self) -> str:
        return "UNSATISFIABLE"


UNSATISFIABLE: Final = Unsatisfiable()


def parse_range(header: str | None) -> RangeSpec | None:
    """One byte range, or None (no header, several ranges, another unit or bad syntax: serve it all)."""
    if header is None:
        return None
    match = _ONE_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        if last:
            end = int(last)
            return None if end < start else RangeSpec(start, end)
        return RangeSpec(start)
    if last:
        return RangeSpec(None, suffix=int(last))
    return None  # "bytes=-"


def resolve(spec: RangeSpec | None, size: int) -> ByteSpan | Unsatisfiable | None:
    """The bytes to send for ``spec`` of a ``size``-byte representation: None = all of it (200)."""
    if spec is None:
        return None
    if spec.first is None:
        suffix = spec.suffix or 0
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return ByteSpan(max(0, size - suffix), size - 1)
    if spec.first >= size:
        return UNSATISFIABLE
    last = size - 1 if spec.last is None else min(spec.last, size - 1)
    return ByteSpan(spec.first, last)


def parse_content_range(value: str | None) -> tuple[ByteSpan, int] | None:
    """An origin's ``Content-Range: bytes a-b/size`` (size known), or None if it is anything else."""
    if value is None:
        return None
    match = re.fullmatch(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})", value.strip())
    if match is None:
        return None
    start, end, size = (int(group) for group in match.groups())
    if end < start or end >= size:
        return None
    return ByteSpan(start, end), size
