"""The one "did you mean" helper: aliases, swapped letters, spelling, and nothing when nothing is close."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.suggest import WORD_MAX, closest, did_you_mean

FIELDS = ("model", "prompt", "duration", "aspect_ratio")
GROUPS = ("key", "model", "mode", "day")


class TestClosest:
    @pytest.mark.parametrize(
        ("word", "choices", "options", "expected"),
        [
            ("modle", FIELDS, {}, "model"),
            ("promt", FIELDS, {}, "prompt"),
            ("xyz", FIELDS, {}, None),
            ("seconds", FIELDS, {"aliases": {"seconds": "duration"}}, "duration"),
            ("seconds", FIELDS, {}, None),
            ("modle", GROUPS, {"anagrams": True}, "model"),
            ("edom", GROUPS, {"anagrams": True}, "mode"),
            ("days", GROUPS, {"cutoff": 0.5}, "day"),
            ("da", GROUPS, {"cutoff": 0.9}, None),
            ("", FIELDS, {}, None),
        ],
    )
    def test_table(self, word: str, choices: tuple[str, ...], options: dict[str, Any], expected: str | None) -> None:
        """Aliases first, then (when asked) swapped letters, then the closest spelling above the cutoff."""
        assert closest(word, choices, **options) == expected

    def test_long_words_are_cut(self) -> None:
        """A huge word is cut before difflib sees it, so an error path stays cheap."""
        assert closest("model" + "x" * (WORD_MAX * 100), FIELDS) is None
        assert closest(("m" * WORD_MAX) + "seconds", FIELDS, aliases={"m" * WORD_MAX: "model"}) == "model"


class TestDidYouMean:
    @pytest.mark.parametrize(
        ("word", "expected"),
        [("prot", "; did you mean 'prompt'?"), ("zzz", "")],
    )
    def test_message_tail(self, word: str, expected: str) -> None:
        """The hint is a message tail, empty when there is nothing to suggest."""
        assert did_you_mean(word, ("prompt", "model")) == expected
