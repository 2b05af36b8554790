"""Short, safe descriptions of JSON values for error messages (shared by validation and media URL checks)."""

from __future__ import annotations

from typing import Final

SHOW_MAX: Final = 60


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def got(value: object) -> str:
    """``got <type> <value>`` for a message about a wrong value."""
    if value is None or isinstance(value, bool | list | dict):
        return f"got {show(value)}"
    return f"got {json_type(value)} {show(value)}"


def show(value: object) -> str:
    """The offending value for a message: short, escaped, in JSON's terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value) if -(10**18) < value < 10**18 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= SHOW_MAX else value[: SHOW_MAX - 1] + "…")
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
