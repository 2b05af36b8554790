"""Request validation for Kling v3 generations (SPEC section 5): pure, fast, and complete.

``validate(body, options)`` reports every problem at once, each a ``Problem`` with a dotted ``param`` and a stable
``code`` (catalogued in ``gateway.catalog.CODES``), or returns a ``ValidRequest`` with the body to forward.
Normalisation is kept small so every example on the upstream page goes through unchanged: the flattened SDK form
moves into ``extra_body``, integer strings for ``duration`` become integers, ``shot_type: "intelligence"`` becomes
``"intelligent"`` (with a warning). No I/O: the media host names are collected for ``validation.media_guard``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from gateway.catalog import (
    ASPECT_RATIOS,
    CFG_SCALE_MAX,
    CFG_SCALE_MIN,
    DURATION_MAX,
    DURATION_MIN,
    ELEMENT_ID_MAX,
    ELEMENT_LIST_MAX,
    FIELD_NAME_MAX,
    MEDIA_URL_MAX,
    MODELS,
    MULTI_PROMPT_MAX,
    NEGATIVE_PROMPT_MAX,
    PROMPT_MAX,
    SHOT_PROMPT_MAX,
    SHOT_TYPE_ALIASES,
    SHOT_TYPES,
    STRING_MAX,
    Mode,
    ModelInfo,
)
from gateway.errors import Problem
from gateway.suggest import did_you_mean
from gateway.validation.describe import got, json_type, show
from gateway.validation.media_urls import (
    is_private_address,
    media_host,
    parse_ip_literal,
    private_host_reason,
    split_media_url,
)

__all__ = [
    "MODELS",
    "ModelInfo",
    "ValidRequest",
    "ValidationOptions",
    "ValidationResult",
    "is_private_address",
    "media_host",
    "parse_ip_literal",
    "private_host_reason",
    "validate",
]


@dataclass(frozen=True, slots=True)
class ValidationOptions:
    """The ``[validation]`` settings that change what ``validate`` accepts.

    ``passthrough_models`` are other model ids forwarded without the Kling rules (their media URLs are
    still held to the private-media rule): ``ValidationOptions(passthrough_models=frozenset({"veo-3.1"}))``.
    """

    allow_unknown_fields: bool = False
    block_private_media: bool = True
    passthrough_models: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request that passed validation: the body to forward and what pricing and metrics need from it.

    ``media_hosts`` are the host names (never IP literals) of ``image``/``last_image`` left for the DNS check
    of ``MediaGuard``; it is empty when ``block_private_media`` is off. ``body`` is a new dict, but nested
    values it did not need to change are the caller's own objects: treat it as read-only.
    """

    body: dict[str, Any]
    model: str
    tier: str | None
    audio: bool | None
    mode: str
    duration: int | None
    media_hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """Everything ``validate`` found: the request when valid, all problems, and warnings either way."""

    request: ValidRequest | None
    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...]

    @property
    def valid(self) -> bool:
        return not self.problems


# -- limits and vocabularies ---------------------------------------------------------------------------------


_FLATTENED: Final = ("negative_prompt", "cfg_scale", "multi_prompt", "element_list", "shot_type")
_TOP_FIELDS: Final = ("model", "prompt", "image", "last_image", "aspect_ratio", "duration", "extra_body")
_TOP_KNOWN: Final = frozenset(_TOP_FIELDS + _FLATTENED)
_EXTRA_KNOWN: Final = frozenset(_FLATTENED)
_EXTRA_PATH: Final = MappingProxyType({name: f"extra_body.{name}" for name in _FLATTENED})
_SHOT_FIELDS: Final = ("index", "prompt", "duration")
_SHOT_KNOWN: Final = frozenset(_SHOT_FIELDS)
_ELEMENT_FIELDS: Final = ("element_id",)
_ELEMENT_KNOWN: Final = frozenset(_ELEMENT_FIELDS)
_MODEL_IDS: Final = tuple(MODELS)
_MODEL_LIST: Final = ", ".join(MODELS)
_ASPECT_SET: Final = frozenset(ASPECT_RATIOS)
_SHOT_TYPE_SET: Final = frozenset(SHOT_TYPES)
# Plain strings, looked up once (an enum member's .value is a descriptor call on the hot path).
_TEXT: Final = Mode.TEXT.value
_IMAGE: Final = Mode.IMAGE.value
_FIRST_LAST: Final = Mode.FIRST_LAST.value

# Names other APIs use for our fields: "did you mean" hints difflib would not find by spelling.
_FIELD_ALIASES: Final = MappingProxyType(
    {
        "seconds": "duration",
        "length": "duration",
        "size": "aspect_ratio",
        "ratio": "aspect_ratio",
        "resolution": "aspect_ratio",
        "image_url": "image",
        "input_reference": "image",
        "first_image": "image",
        "first_frame": "image",
        "start_image": "image",
        "image_tail": "last_image",
        "tail_image": "last_image",
        "end_image": "last_image",
        "last_frame": "last_image",
        "cfg": "cfg_scale",
        "guidance_scale": "cfg_scale",
        "negative": "negative_prompt",
        "elements": "element_list",
        "multi_shot": "multi_prompt",
        "shots": "multi_prompt",
    }
)

_MISSING: Final = object()

# Integers, possibly signed, as strings: "5", "+5", "-3". ASCII digits only ([0-9], not \d).
_INT_STRING: Final = re.compile(r"[+-]?[0-9]+")

# -- messages ------------------------------------------------------------------------------------------------


def _hint(word: str, choices: Sequence[str], aliases: Mapping[str, str] | None = None) -> str:
    """``"; did you mean 'X'?"`` for the closest choice, or ``""``; only ever called on the error path."""
    return did_you_mean(word.lower(), choices, aliases=aliases)


def _whole_number(value: object) -> int | None:
    """An int, or the int an integer-valued string spells; ``None`` for anything else.

    Floats are refused even when whole (``5.0``): the upstream declares an integer, and a float usually
    means a computed value the client should round deliberately. Booleans are refused (``type is int``).
    """
    if type(value) is int:
        return value
    if isinstance(value, str) and _INT_STRING.fullmatch(value):
        if len(value) > 12:  # far out of any range; avoids int() on megabyte strings
            return -(10**12) if value.startswith("-") else 10**12
        return int(value)
    return None


# -- the check -----------------------------------------------------------------------------------------------


class _Check:
    """One validation run: accumulates problems and warnings while building the normalized body."""

    __slots__ = ("allow_unknown", "block_private", "media_hosts", "problems", "warnings")

    def __init__(self, options: ValidationOptions) -> None:
        self.allow_unknown = options.allow_unknown_fields
        self.block_private = options.block_private_media
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.media_hosts: list[str] = []

    def problem(self, param: str, code: str, message: str) -> None:
        self.problems.append(Problem(param, code, message))

    def strings(self, value: object, path: str, key: str, *, own_rules: bool) -> None:
        """``string_too_long`` for every string (and field name) in ``value`` over its bound (``_STRING_LIMITS``,
        else ``STRING_MAX``); with ``own_rules``, fields with a rule of their own are left to it and its code."""
        if isinstance(value, str):
            if own_rules and key in _OWN_LENGTH_RULES:
                return
            limit = _STRING_LIMITS.get(key, STRING_MAX)
            if len(value) > limit:
                self.problem(
                    path, "string_too_long", f"{path} has {len(value)} characters; at most {limit} are allowed"
                )
        elif isinstance(value, dict):
            for name, item in value.items():
                child = f"{path}.{name}" if path else str(name)
                if len(name) > FIELD_NAME_MAX:
                    shown = f"{path}.{name[:FIELD_NAME_MAX]}..." if path else f"{name[:FIELD_NAME_MAX]}..."
                    message = f"a field name has {len(name)} characters; at most {FIELD_NAME_MAX} are allowed"
                    self.problem(shown, "string_too_long", message)
                    continue
                self.strings(item, child, name, own_rules=own_rules)
        elif isinstance(value, list):
            for position, item in enumerate(value):
                self.strings(item, f"{path}.{position}", key, own_rules=own_rules)

    def result(self, request: ValidRequest | None) -> ValidationResult:
        if self.problems:
            return ValidationResult(None, tuple(self.problems), tuple(self.warnings))
        return ValidationResult(request, (), tuple(self.warnings))

    # -- the Kling body --------------------------------------------------------------------------------------

    def run(self, body: dict[str, Any]) -> ValidationResult:
        self.strings(body, "", "", own_rules=True)
        out = dict(body)
        info = self.model(body.get("model", _MISSING))
        image = body.get("image", _MISSING)
        last_image = body.get("last_image", _MISSING)
        has_image = image is not _MISSING
        has_last = last_image is not _MISSING
        raw_extra = body.get("extra_body")
        has_multi = "multi_prompt" in body or (isinstance(raw_extra, dict) and "multi_prompt" in raw_extra)

        self.prompt(body.get("prompt", _MISSING), has_image, has_multi)
        if has_image:
            self.media("image", image)
        if has_last:
            self.media("last_image", last_image)
            if not has_image:
                self.problem("last_image", "last_image_requires_image", "last_image requires image (the first frame)")
        self.aspect_ratio(body.get("aspect_ratio", _MISSING), has_image)
        duration = self.duration(body.get("duration", _MISSING), out)
        extra, paths = self.merge_extra(body, out)
        if extra is not None:
            self.extra_fields(extra, paths, body, out, has_image, has_last, duration)
        if not _TOP_KNOWN.issuperset(body):
            self.unknown(body, "", _TOP_FIELDS + _FLATTENED, _TOP_KNOWN)

        if self.problems:
            return self.result(None)
        assert info is not None  # a missing or unknown model is a problem
        mode = _FIRST_LAST if has_last else _IMAGE if has_image else _TEXT
        request = ValidRequest(
            body=out,
            model=body["model"],
            tier=info.tier,
            audio=info.audio,
            mode=mode,
            duration=duration,
            media_hosts=tuple(dict.fromkeys(self.media_hosts)),
        )
        return self.result(request)

    def model(self, value: object) -> ModelInfo | None:
        if value is _MISSING:
            self.problem("model", "missing_field", f"model is required; use one of {_MODEL_LIST}")
            return None
        if not isinstance(value, str):
            self.problem("model", "invalid_type", f"model must be a string, {got(value)}")
            return None
        info = MODELS.get(value)
        if info is None:
            self.problem(
                "model",
                "unknown_model",
                f"unknown model {show(value)}; Kling v3 models are {_MODEL_LIST}{_hint(value, _MODEL_IDS)}",
            )
        return info

    def prompt(self, value: object, has_image: bool, has_multi: bool) -> None:
        if has_multi and has_image:
            if value is not _MISSING:
                self.problem(
                    "prompt",
                    "prompt_with_multi_prompt",
                    "do not send prompt together with extra_body.multi_prompt in image mode; "
                    "each shot carries its own prompt",
                )
            return
        if value is _MISSING:
            if not has_multi:  # with multi_prompt in text mode, multi_prompt_requires_image says it all
                self.problem(
                    "prompt",
                    "missing_field",
                    f"prompt is required (a string of at most {PROMPT_MAX} characters)",
                )
            return
        if not isinstance(value, str):
            self.problem("prompt", "invalid_type", f"prompt must be a string, {got(value)}")
        elif len(value) > PROMPT_MAX:
            self.problem(
                "prompt",
                "prompt_too_long",
                f"prompt has {len(value)} characters; at most {PROMPT_MAX} are allowed",
            )
        elif not value or value.isspace():
            self.problem("prompt", "empty_prompt", "prompt must not be empty or only whitespace")

    def media(self, param: str, value: object, *, strict: bool = True) -> None:
        """URL syntax (``invalid_url`` when ``strict``) and the literal half of the private-media rule."""
        parsed = split_media_url(value)
        if isinstance(parsed, str):
            if strict:
                self.problem(param, "invalid_url", f"{param} must be an absolute http or https URL; {parsed}")
            return
        if not self.block_private:
            return
        host, ip, credentials = parsed
        if credentials:
            self.problem(
                param,
                "private_media_url",
                f"{param} must not carry credentials (user:password@) in the URL; media must be public",
            )
            return
        reason = private_host_reason(host, ip)
        if reason is not None:
            self.problem(
                param,
                "private_media_url",
                f"{param} must be publicly reachable, but {reason}: {show(value)}",
            )
        elif ip is None:
            self.media_hosts.append(host)

    def aspect_ratio(self, value: object, has_image: bool) -> None:
        if value is _MISSING:
            return
        if not isinstance(value, str):
            self.problem(
                "aspect_ratio",
                "invalid_type",
                f"aspect_ratio must be a string ('16:9', '9:16' or '1:1'), {got(value)}",
            )
        elif value not in _ASPECT_SET:
            self.problem(
                "aspect_ratio",
                "invalid_enum",
                f"aspect_ratio must be '16:9', '9:16' or '1:1', got {show(value)}"
                f"{_hint(value.replace('x', ':').replace('/', ':'), ASPECT_RATIOS)}",
            )
        elif has_image:
            self.warnings.append(
                Problem(
                    "aspect_ratio",
                    "aspect_ratio_not_guaranteed",
                    f"aspect_ratio {value!r} is not guaranteed in image modes; "
                    "the output may follow the input image's ratio",
                )
            )

    def duration(self, value: object, out: dict[str, Any]) -> int | None:
        if value is _MISSING:
            return None
        seconds = _whole_number(value)
        if seconds is None:
            self.problem(
                "duration",
                "invalid_type",
                f"duration must be a whole number of seconds from {DURATION_MIN} to {DURATION_MAX}, {got(value)}",
            )
            return None
        if not DURATION_MIN <= seconds <= DURATION_MAX:
            self.problem(
                "duration",
                "duration_out_of_range",
                f"duration must be from {DURATION_MIN} to {DURATION_MAX} seconds, got {show(value)}",
            )
            return None
        if isinstance(value, str):
            out["duration"] = seconds
        return seconds

    # -- extra_body ------------------------------------------------------------------------------------------

    def merge_extra(self, body: dict[str, Any], out: dict[str, Any]) -> tuple[dict[str, Any] | None, Mapping[str, str]]:
        """extra_body with flattened fields moved in, and the path each field is reported under."""
        raw = body.get("extra_body", _MISSING)
        source: dict[str, Any] | None = None
        if isinstance(raw, dict):
            source = raw
        elif raw is not _MISSING:
            self.problem("extra_body", "invalid_type", f"extra_body must be an object, {got(raw)}")
        flat = [name for name in _FLATTENED if name in body]
        if not flat:
            return source, _EXTRA_PATH
        merged = dict(source) if source is not None else {}
        paths = dict(_EXTRA_PATH)
        for name in flat:
            value = out.pop(name)
            if source is not None and name in source:
                self.problem(
                    name,
                    "duplicate_field",
                    f"{name} is sent both at the top level and in extra_body; send it once",
                )
                continue
            merged[name] = value
            paths[name] = name  # reported where the client put it
        if source is not None or raw is _MISSING:
            out["extra_body"] = merged
        return merged, paths

    def extra_fields(
        self,
        extra: dict[str, Any],
        paths: Mapping[str, str],
        body: dict[str, Any],
        out: dict[str, Any],
        has_image: bool,
        has_last: bool,
        duration: int | None,
    ) -> None:
        if not _EXTRA_KNOWN.issuperset(extra):
            self.unknown(extra, "extra_body.", _FLATTENED, _EXTRA_KNOWN)
        if "negative_prompt" in extra:
            self.negative_prompt(extra["negative_prompt"], paths["negative_prompt"])
        if "cfg_scale" in extra:
            self.cfg_scale(extra["cfg_scale"], paths["cfg_scale"])
        if "shot_type" in extra:
            shot_type = self.shot_type(extra["shot_type"], paths["shot_type"])
            if shot_type is not None:
                _writable_extra(body, out)["shot_type"] = shot_type
        if "multi_prompt" in extra:
            param = paths["multi_prompt"]
            if not has_image:
                self.problem(
                    param,
                    "multi_prompt_requires_image",
                    "multi_prompt is for image mode only (multi-shot from a reference image); "
                    "add image, or use prompt for text-to-video",
                )
            if has_last:
                self.problem(
                    param,
                    "multi_prompt_with_last_image",
                    "multi_prompt cannot be combined with last_image; drop one of them",
                )
            if "duration" not in body:
                self.problem(
                    "duration",
                    "missing_field",
                    "duration is required with multi_prompt: the shot durations must add up to it",
                )
            shots = self.multi_prompt(extra["multi_prompt"], param, duration)
            if shots is not None:
                _writable_extra(body, out)["multi_prompt"] = shots
        if "element_list" in extra:
            self.element_list(extra["element_list"], paths["element_list"])

    def negative_prompt(self, value: object, param: str) -> None:
        if not isinstance(value, str):
            self.problem(param, "invalid_type", f"negative_prompt must be a string, {got(value)}")
        elif len(value) > NEGATIVE_PROMPT_MAX:
            self.problem(
                param,
                "negative_prompt_too_long",
                f"negative_prompt has {len(value)} characters; at most {NEGATIVE_PROMPT_MAX} are allowed",
            )

    def cfg_scale(self, value: object, param: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.problem(
                param,
                "invalid_type",
                f"cfg_scale must be a number from 0 to 1, {got(value)}",
            )
            return
        if not CFG_SCALE_MIN <= value <= CFG_SCALE_MAX:
            self.problem(param, "cfg_scale_out_of_range", f"cfg_scale must be from 0 to 1, got {show(value)}")

    def shot_type(self, value: object, param: str) -> str | None:
        """Check shot_type; returns the normalized value when it must be rewritten."""
        if not isinstance(value, str):
            self.problem(
                param,
                "invalid_type",
                f"shot_type must be 'customize' or 'intelligent', {got(value)}",
            )
            return None
        if value in _SHOT_TYPE_SET:
            return None
        alias = SHOT_TYPE_ALIASES.get(value)
        if alias is not None:
            self.warnings.append(
                Problem(param, "shot_type_normalized", f"shot_type {value!r} was normalized to {alias!r}")
            )
            return alias
        self.problem(
            param,
            "invalid_enum",
            f"shot_type must be 'customize' or 'intelligent', got {show(value)}{_hint(value, SHOT_TYPES)}",
        )
        return None

    def multi_prompt(self, value: object, param: str, duration: int | None) -> list[Any] | None:
        """Check the shots; returns a rewritten list when string durations were normalized to integers."""
        if not isinstance(value, list):
            self.problem(
                param,
                "invalid_type",
                f"multi_prompt must be an array of 1 to {MULTI_PROMPT_MAX} shots, {got(value)}",
            )
            return None
        count = len(value)
        if not 1 <= count <= MULTI_PROMPT_MAX:
            self.problem(
                param,
                "multi_prompt_count",
                f"multi_prompt must have 1 to {MULTI_PROMPT_MAX} shots, got {count}",
            )
        rewritten: list[Any] | None = None
        seen: set[int] = set()
        total = 0
        sums = True
        for position, shot in enumerate(value):
            path = f"{param}.{position}"
            if not isinstance(shot, dict):
                self.problem(
                    path,
                    "invalid_type",
                    f"each multi_prompt shot must be an object {{index, prompt, duration}}, {got(shot)}",
                )
                sums = False
                continue
            if not _SHOT_KNOWN.issuperset(shot):
                self.unknown(shot, f"{path}.", _SHOT_FIELDS, _SHOT_KNOWN)
            for name in _SHOT_FIELDS:
                if name not in shot:
                    self.problem(f"{path}.{name}", "missing_field", f"each shot needs {name}")
            self.shot_index(shot.get("index", _MISSING), f"{path}.index", seen)
            self.shot_prompt(shot.get("prompt", _MISSING), f"{path}.prompt")
            seconds = self.shot_duration(shot.get("duration", _MISSING), f"{path}.duration")
            if seconds is None:
                sums = False
                continue
            total += seconds
            if isinstance(shot["duration"], str):
                if rewritten is None:
                    rewritten = list(value)
                rewritten[position] = {**shot, "duration": seconds}
        if sums and count and duration is not None and total != duration:
            self.problem(
                param,
                "multi_prompt_duration_mismatch",
                f"multi_prompt shot durations add up to {total} seconds, but duration is {duration}; "
                "they must be equal",
            )
        return rewritten

    def shot_index(self, value: object, param: str, seen: set[int]) -> None:
        if value is _MISSING:
            return
        if type(value) is not int:
            self.problem(param, "invalid_type", f"index must be an integer, {got(value)}")
        elif value < 0:
            self.problem(param, "multi_prompt_index_out_of_range", f"index must be 0 or more, got {value}")
        elif value in seen:
            self.problem(param, "duplicate_index", f"index {value} is used by an earlier shot; indexes must be unique")
        else:
            seen.add(value)

    def shot_prompt(self, value: object, param: str) -> None:
        if value is _MISSING:
            return
        if not isinstance(value, str):
            self.problem(param, "invalid_type", f"prompt must be a string, {got(value)}")
        elif len(value) > SHOT_PROMPT_MAX:
            self.problem(
                param,
                "multi_prompt_prompt_too_long",
                f"a shot prompt has {len(value)} characters; at most {SHOT_PROMPT_MAX} are allowed",
            )
        elif not value or value.isspace():
            self.problem(param, "empty_prompt", "a shot prompt must not be empty or only whitespace")

    def shot_duration(self, value: object, param: str) -> int | None:
        if value is _MISSING:
            return None
        seconds = _whole_number(value)
        if seconds is None:
            self.problem(
                param,
                "invalid_type",
                f"a shot duration must be a whole number of seconds, {got(value)}",
            )
            return None
        if seconds < 1:
            self.problem(
                param,
                "multi_prompt_duration_out_of_range",
                f"a shot duration must be at least 1 second, got {show(value)}",
            )
            return None
        return seconds

    def element_list(self, value: object, param: str) -> None:
        if not isinstance(value, list):
            self.problem(
                param,
                "invalid_type",
                f"element_list must be an array of {{element_id}} objects, {got(value)}",
            )
            return
        if len(value) > ELEMENT_LIST_MAX:
            self.problem(
                param,
                "element_list_too_long",
                f"element_list may have at most {ELEMENT_LIST_MAX} elements, got {len(value)}",
            )
        for position, element in enumerate(value):
            path = f"{param}.{position}"
            if not isinstance(element, dict):
                self.problem(
                    path,
                    "invalid_type",
                    f"each element must be an object {{element_id}}, {got(element)}",
                )
                continue
            if not _ELEMENT_KNOWN.issuperset(element):
                self.unknown(element, f"{path}.", _ELEMENT_FIELDS, _ELEMENT_KNOWN)
            element_id = element.get("element_id", _MISSING)
            if element_id is _MISSING:
                self.problem(f"{path}.element_id", "missing_field", "each element needs element_id")
            elif not (type(element_id) is int or (isinstance(element_id, str) and element_id.strip())):
                self.problem(
                    f"{path}.element_id",
                    "invalid_type",
                    f"element_id must be a non-empty string or an integer, {got(element_id)}",
                )

    def unknown(self, obj: dict[str, Any], prefix: str, choices: Sequence[str], known: frozenset[str]) -> None:
        """``unknown_field`` for every key not in ``known`` — unless unknown fields are to be forwarded."""
        if self.allow_unknown:
            return
        for key in obj:
            if key in known:
                continue
            name = str(key)
            hint = _hint(name, choices, _FIELD_ALIASES) or f"; known fields are {', '.join(choices)}"
            self.problem(f"{prefix}{name}", "unknown_field", f"unknown field {show(name)}{hint}")


def _writable_extra(body: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The normalized body's extra_body, copied first if it is still the caller's object."""
    value = out.get("extra_body")
    if not isinstance(value, dict):
        return {}  # extra_body itself is invalid: the rewrite has nowhere to go, and the body is rejected
    current: dict[str, Any] = value
    if current is body.get("extra_body"):
        current = dict(value)
        out["extra_body"] = current
    return current


def _passthrough(body: dict[str, Any], model: str, options: ValidationOptions) -> ValidationResult:
    """A configured non-Kling model: forwarded as is, but its strings are bounded and its media URLs held to the
    same strict parse and private rule as a Kling model's (a URL no check can read is never forwarded)."""
    check = _Check(options)
    check.strings(body, "", "", own_rules=False)
    has_image = "image" in body
    for param in ("image", "last_image"):
        if param in body:
            check.media(param, body[param])
    if check.problems:
        return check.result(None)
    request = ValidRequest(
        body=dict(body),
        model=model,
        tier=None,
        audio=None,
        mode=(_FIRST_LAST if "last_image" in body else _IMAGE) if has_image else _TEXT,
        duration=_whole_number(body.get("duration")),
        media_hosts=tuple(dict.fromkeys(check.media_hosts)),
    )
    return check.result(request)


#: Strings with a bound of their own (by field name); every other string is bounded by ``STRING_MAX``.
_STRING_LIMITS: Final[Mapping[str, int]] = MappingProxyType(
    {"element_id": ELEMENT_ID_MAX, "image": MEDIA_URL_MAX, "last_image": MEDIA_URL_MAX}
)
#: Kling fields whose own rule bounds them, with its own code (``prompt_too_long``, ``invalid_enum``...).
_OWN_LENGTH_RULES: Final = frozenset({"model", "prompt", "negative_prompt", "duration", "aspect_ratio", "shot_type"})

_DEFAULT_OPTIONS: Final = ValidationOptions()


def validate(body: object, options: ValidationOptions = _DEFAULT_OPTIONS) -> ValidationResult:
    """Check a generation request body against SPEC section 5, reporting every problem at once.

    >>> result = validate({"model": "kling-v3-std-silent", "prompt": "a fox", "duration": "5"})
    >>> result.valid, result.request.body["duration"], result.request.mode
    (True, 5, 'text')
    >>> [(p.param, p.code) for p in validate({"model": "kling-v3", "duration": 20}).problems]
    [('model', 'unknown_model'), ('prompt', 'missing_field'), ('duration', 'duration_out_of_range')]
    """
    if not isinstance(body, dict):
        message = f"the request body must be a JSON object, got {json_type(body)}"
        problem = Problem("body", "invalid_body", message)
        return ValidationResult(None, (problem,), ())
    model = body.get("model")
    if isinstance(model, str) and model in options.passthrough_models and model.strip() and model not in MODELS:
        return _passthrough(body, model, options)
    return _Check(options).run(body)
