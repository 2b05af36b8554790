"""The one "did you mean" helper, for error messages about a misspelt name (a field, setting or dimension).

It imports nothing from ``gateway``, so any module may use it. Only error paths call it: it runs ``difflib``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Final

#: Longer words are cut to this before matching: bounds difflib's cost, and no real name is this long.
WORD_MAX: Final = 100


def closest(
    word: str,
    choices: Iterable[str],
    *,
    aliases: Mapping[str, str] | None = None,
    anagrams: bool = False,
    cutoff: float = 0.6,
) -> str | None:
    """The choice ``word`` most likely meant, or None.

    ``aliases`` map names other APIs use to ours (checked first); ``anagrams`` prefers a choice with the same
    letters ("modle" is closer to "model" than difflib thinks); else the closest spelling above ``cutoff``.

    >>> closest("prot", ["port", "host"]), closest("modle", ["mode", "model"], anagrams=True)
    ('port', 'model')
    """
    word = word[:WORD_MAX]
    if aliases is not None and word in aliases:
        return aliases[word]
    options = list(choices)
    if anagrams:
        letters = sorted(word)
        for option in options:
            if sorted(option) == letters:
                return option
    match = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    return match[0] if match else None


def did_you_mean(
    word: str,
    choices: Iterable[str],
    *,
    aliases: Mapping[str, str] | None = None,
    anagrams: bool = False,
    cutoff: float = 0.6,
) -> str:
    """``"; did you mean 'X'?"`` for the :func:`closest` choice, or ``""`` when nothing is close.

    >>> did_you_mean("servre", ["server", "upstream"])
    "; did you mean 'server'?"
    """
    found = closest(word, choices, aliases=aliases, anagrams=anagrams, cutoff=cutoff)
    return f"; did you mean {found!r}?" if found is not None else ""
