"""Table-driven tests of ``gateway.validation.checks``: one row per rule and per edge (SPEC section 5)."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from support.seed_examples import SEEDS

from gateway.validation.checks import (
    MODELS,
    ValidationOptions,
    ValidationResult,
    is_private_address,
    media_host,
    parse_ip_literal,
    validate,
)

IMG = "https://example.com/a.png"
LAST = "https://example.com/b.png"
DROP = object()  # a field value meaning "leave the field out"
FULLWIDTH_LOOPBACK = "".join(chr(ord(c) + 0xFEE0) for c in "127.0.0.1")  # "127.0.0.1" in full-width forms
FULLWIDTH_LOCALHOST = "".join(chr(ord(c) + 0xFEE0) for c in "localhost")


def make(base: dict[str, Any] | None = None, /, **fields: Any) -> dict[str, Any]:
    """A small valid text-mode body (or ``base``) with ``fields`` set, or dropped when set to ``DROP``."""
    body = copy.deepcopy(base) if base is not None else {"model": "kling-v3-std-silent", "prompt": "a red fox"}
    for name, value in fields.items():
        if value is DROP:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def shots(*durations: Any, image: bool = True) -> dict[str, Any]:
    """An image-mode multi-shot body whose shots last ``durations`` seconds and add up to ``duration``."""
    multi = [{"index": i + 1, "prompt": f"shot {i + 1}", "duration": d} for i, d in enumerate(durations)]
    total = sum(d for d in durations if isinstance(d, int))
    body: dict[str, Any] = {
        "model": "kling-v3-pro-silent",
        "duration": total,
        "extra_body": {"multi_prompt": multi},
    }
    if image:
        body["image"] = IMG
    return body


def pairs(result: ValidationResult) -> list[tuple[str, str]]:
    """The (param, code) of every problem, in order."""
    return [(p.param, p.code) for p in result.problems]


def warning_pairs(result: ValidationResult) -> list[tuple[str, str]]:
    """The (param, code) of every warning, in order."""
    return [(w.param, w.code) for w in result.warnings]


def assert_only(result: ValidationResult, param: str, code: str) -> None:
    """The result holds exactly one problem, with this param and code."""
    assert pairs(result) == [(param, code)], [p.message for p in result.problems]


def assert_valid(result: ValidationResult) -> dict[str, Any]:
    """The result is valid; returns the normalized body."""
    assert result.valid, [p.as_dict() for p in result.problems]
    assert result.request is not None
    return result.request.body


class TestSeedExamples:
    @pytest.mark.parametrize("name", list(SEEDS))
    def test_valid_and_forwarded_unchanged(self, name: str) -> None:
        """Every example on the upstream page validates and its normalized body equals the input."""
        body = SEEDS[name]
        before = copy.deepcopy(body)
        result = validate(body)
        normalized = assert_valid(result)
        assert normalized == before
        assert list(normalized) == list(before)  # same key order, too
        assert body == before  # input untouched
        assert normalized is not body

    @pytest.mark.parametrize(
        ("name", "model", "tier", "audio", "mode", "duration", "hosts"),
        [
            ("text", "kling-v3-std-silent", "std", False, "text", 5, ()),
            ("image", "kling-v3-pro-audio", "pro", True, "image", 6, ("example.com",)),
            ("first_last", "kling-v3-pro-silent", "pro", False, "first_last", 8, ("example.com",)),
        ],
    )
    def test_derived_fields(
        self, name: str, model: str, tier: str, audio: bool, mode: str, duration: int, hosts: tuple[str, ...]
    ) -> None:
        """Model, tier, audio, mode, duration and the media host names are derived from each seed."""
        request = validate(SEEDS[name]).request
        assert request is not None
        assert (request.model, request.tier, request.audio) == (model, tier, audio)
        assert (request.mode, request.duration, request.media_hosts) == (mode, duration, hosts)

    @pytest.mark.parametrize(
        ("name", "warnings"),
        [("text", []), ("image", [("aspect_ratio", "aspect_ratio_not_guaranteed")]), ("first_last", [])],
    )
    def test_warnings(self, name: str, warnings: list[tuple[str, str]]) -> None:
        """Only the image-to-video seed warns, because it sends aspect_ratio in an image mode."""
        assert warning_pairs(validate(SEEDS[name])) == warnings


class TestBody:
    @pytest.mark.parametrize("body", [[], "text", None, 5, 1.5, True, [{"model": "kling-v3-std-silent"}]])
    def test_not_an_object(self, body: object) -> None:
        """A body that is not a JSON object is one invalid_body problem."""
        result = validate(body)
        assert_only(result, "body", "invalid_body")
        assert result.request is None and not result.valid

    def test_empty_object(self) -> None:
        """An empty object names both required fields."""
        assert pairs(validate({})) == [("model", "missing_field"), ("prompt", "missing_field")]


class TestModel:
    @pytest.mark.parametrize(("model", "info"), list(MODELS.items()))
    def test_known_models(self, model: str, info: Any) -> None:
        """Each Kling v3 id is valid and sets tier and audio."""
        request = validate(make(model=model)).request
        assert request is not None
        assert (request.tier, request.audio) == (info.tier, info.audio)

    @pytest.mark.parametrize(
        ("model", "code", "hint"),
        [
            (DROP, "missing_field", None),
            (5, "invalid_type", None),
            (None, "invalid_type", None),
            (["kling-v3-std-silent"], "invalid_type", None),
            ("kling-v3-std", "unknown_model", "kling-v3-std-audio"),
            ("kling-v3-pro-audi", "unknown_model", "kling-v3-pro-audio"),
            ("Kling-V3-Pro-Silent", "unknown_model", "kling-v3-pro-silent"),
            ("veo-3.1", "unknown_model", None),
            ("", "unknown_model", None),
        ],
    )
    def test_invalid(self, model: object, code: str, hint: str | None) -> None:
        """A missing, mistyped or unknown model is named; near misses get a did-you-mean hint."""
        result = validate(make(model=model))
        assert_only(result, "model", code)
        message = result.problems[0].message
        if hint is not None:
            assert message.endswith(f"; did you mean '{hint}'?")
        else:
            assert "did you mean" not in message


class TestPrompt:
    @pytest.mark.parametrize(
        ("prompt", "code"),
        [
            (DROP, "missing_field"),
            (None, "invalid_type"),
            (42, "invalid_type"),
            (["a"], "invalid_type"),
            ("", "empty_prompt"),
            ("   \n\t", "empty_prompt"),
            ("x" * 2501, "prompt_too_long"),
            (" " * 2501, "prompt_too_long"),
        ],
    )
    def test_invalid(self, prompt: object, code: str) -> None:
        """prompt is required, a string, not blank, and at most 2500 characters."""
        assert_only(validate(make(prompt=prompt)), "prompt", code)

    @pytest.mark.parametrize("prompt", ["x", "x" * 2500, "é" * 2500, "a fox 🦊"])
    def test_valid(self, prompt: str) -> None:
        """Prompts up to 2500 characters (not bytes) pass."""
        assert_valid(validate(make(prompt=prompt)))

    def test_too_long_message_counts(self) -> None:
        """The message says how long the prompt is and what the limit is."""
        message = validate(make(prompt="x" * 2600)).problems[0].message
        assert "2600" in message and "2500" in message

    def test_image_mode_multi_prompt_without_prompt(self) -> None:
        """In image mode with multi_prompt, prompt is not required."""
        assert_valid(validate(shots(2, 3)))

    def test_image_mode_multi_prompt_with_prompt(self) -> None:
        """In image mode, prompt together with multi_prompt is prompt_with_multi_prompt (seed errors)."""
        assert_only(validate(make(shots(2, 3), prompt="a fox")), "prompt", "prompt_with_multi_prompt")

    def test_text_mode_multi_prompt(self) -> None:
        """multi_prompt without image is multi_prompt_requires_image, and prompt is not demanded too."""
        assert_only(validate(shots(2, 3, image=False)), "extra_body.multi_prompt", "multi_prompt_requires_image")


class TestDuration:
    @pytest.mark.parametrize(
        ("duration", "normalized"),
        [(3, 3), (5, 5), (15, 15), ("5", 5), ("15", 15), ("03", 3), ("+7", 7)],
    )
    def test_valid(self, duration: object, normalized: int) -> None:
        """Integers 3-15 pass; integer-valued strings are normalized to the integer."""
        result = validate(make(duration=duration))
        body = assert_valid(result)
        assert body["duration"] == normalized and type(body["duration"]) is int
        assert result.request is not None and result.request.duration == normalized

    def test_absent(self) -> None:
        """duration is optional; ValidRequest.duration is then None."""
        request = validate(make()).request
        assert request is not None and request.duration is None and "duration" not in request.body

    @pytest.mark.parametrize(
        ("duration", "code"),
        [
            (2, "duration_out_of_range"),
            (16, "duration_out_of_range"),
            (0, "duration_out_of_range"),
            (-5, "duration_out_of_range"),
            ("20", "duration_out_of_range"),
            ("-3", "duration_out_of_range"),
            ("9" * 5000, "duration_out_of_range"),
            (10**30, "duration_out_of_range"),
            (True, "invalid_type"),
            (False, "invalid_type"),
            (5.5, "invalid_type"),
            (5.0, "invalid_type"),  # floats are refused even when whole: the upstream declares an integer
            ("5.5", "invalid_type"),
            ("5.0", "invalid_type"),
            ("five", "invalid_type"),
            ("", "invalid_type"),
            (" 5", "invalid_type"),
            ("\uff15", "invalid_type"),  # full-width digit five: ASCII digits only
            (None, "invalid_type"),
            ([5], "invalid_type"),
            ({"seconds": 5}, "invalid_type"),
        ],
    )
    def test_invalid(self, duration: object, code: str) -> None:
        """Out-of-range values, booleans, fractions and non-numbers are rejected."""
        assert_only(validate(make(duration=duration)), "duration", code)

    def test_out_of_range_message(self) -> None:
        """The message gives the value and the allowed range."""
        message = validate(make(duration=20)).problems[0].message
        assert "20" in message and "3" in message and "15" in message


class TestAspectRatio:
    @pytest.mark.parametrize("ratio", ["16:9", "9:16", "1:1"])
    def test_valid_text_mode(self, ratio: str) -> None:
        """The three ratios pass without a warning in text mode."""
        result = validate(make(aspect_ratio=ratio))
        assert_valid(result)
        assert result.warnings == ()

    @pytest.mark.parametrize(
        ("extra", "mode"), [({"image": IMG}, "image"), ({"image": IMG, "last_image": LAST}, "first_last")]
    )
    def test_warning_in_image_modes(self, extra: dict[str, Any], mode: str) -> None:
        """In image modes a valid aspect_ratio passes with an aspect_ratio_not_guaranteed warning."""
        result = validate(make(aspect_ratio="9:16", **extra))
        assert_valid(result)
        assert result.request is not None and result.request.mode == mode
        assert warning_pairs(result) == [("aspect_ratio", "aspect_ratio_not_guaranteed")]

    @pytest.mark.parametrize(
        ("ratio", "code", "hint"),
        [
            ("16x9", "invalid_enum", "16:9"),
            ("16/9", "invalid_enum", "16:9"),
            ("9:61", "invalid_enum", "9:16"),
            ("4:3", "invalid_enum", None),
            ("", "invalid_enum", None),
            (1.78, "invalid_type", None),
            (None, "invalid_type", None),
        ],
    )
    def test_invalid(self, ratio: object, code: str, hint: str | None) -> None:
        """Other values are invalid_enum, with a did-you-mean hint when close; non-strings invalid_type."""
        result = validate(make(aspect_ratio=ratio))
        assert_only(result, "aspect_ratio", code)
        if hint is not None:
            assert result.problems[0].message.endswith(f"; did you mean '{hint}'?")

    def test_invalid_in_image_mode_no_warning(self) -> None:
        """An invalid aspect_ratio in image mode is a problem, not also a warning."""
        result = validate(make(aspect_ratio="4:3", image=IMG))
        assert_only(result, "aspect_ratio", "invalid_enum")
        assert result.warnings == ()


class TestMediaUrlSyntax:
    @pytest.mark.parametrize(
        "url",
        [
            "https://example.com/a.png",
            "http://example.com/a.png",
            "HTTPS://Example.COM/a.png?x=1#frag",
            "https://example.com:8443/a.png",
            "https://example.com:/a.png",
            "https://cdn.example.co.uk/path/with%20escapes.png",
            "https://bücher.example/a.png",
            "https://8.8.8.8/a.png",
            "https://[2001:4860:4860::8888]:443/a.png",
            "https://example.com/#@127.0.0.1",
        ],
    )
    def test_valid(self, url: str) -> None:
        """Absolute http(s) URLs with a sane host pass."""
        assert_valid(validate(make(image=url)))

    @pytest.mark.parametrize(
        "url",
        [
            5,
            None,
            ["https://example.com/a.png"],
            {"url": "https://example.com/a.png"},
            "",
            "example.com/a.png",
            "/a.png",
            "//example.com/a.png",
            "ftp://example.com/a.png",
            "file:///etc/passwd",
            "data:image/png;base64,iVBORw0KGgo=",
            "javascript:alert(1)",
            "gopher://example.com/",
            "https://",
            "https:///a.png",
            "https:example.com/a.png",
            "https://:443/a.png",
            "https://exa mple.com/a.png",
            "https://example.com/a b.png",
            " https://example.com/a.png",
            "https://example.com/a.png\n",
            "https://exa\tmple.com/",
            "https://example.com\\@127.0.0.1/",
            "https://example.com\\a.png",
            "https://exam\x00ple.com/",
            "https://example.com\u00a0/",
            "https://example.com\u200b/",
            "https://example.com:99999/",
            "https://example.com:80a/",
            "https://example.com:-1/",
            "https://[::1/",
            "https://[::1]x/",
            "https://[not-ipv6]/",
            "https://[127.0.0.1]/",
            "https://[fe80::1%25]/",
            "https://exa_mple..com/",
            "https://exa%mple.com/",
            "https://example.com%2f.evil/",
            "https://%zz.example.com/",
            "https://%ff.example.com/",
            "https://ex<ample.com/",
            "https://1.2.3.4.5/",
            "https://256.1.1.1/",
            "https://1.2.3.256.0/",
            "https://4294967296/",
            "https://08.0.0.1/",
            "https://0x1g.0.0.1/",
            "https://foo.09/",
            "https://example.0x7f/",
            "https://" + "a" * 64 + ".com/",
        ],
    )
    def test_invalid_url(self, url: object) -> None:
        """Non-strings, relative URLs, other schemes, malformed or ambiguous hosts are invalid_url."""
        assert_only(validate(make(image=url)), "image", "invalid_url")

    def test_invalid_url_checked_when_blocking_is_off(self) -> None:
        """URL syntax is checked even when private media is allowed."""
        options = ValidationOptions(block_private_media=False)
        assert_only(validate(make(image="ftp://example.com/a.png"), options), "image", "invalid_url")

    def test_last_image_checked_too(self) -> None:
        """last_image gets the same URL rules as image."""
        assert_only(validate(make(image=IMG, last_image="nope")), "last_image", "invalid_url")

    def test_last_image_requires_image(self) -> None:
        """last_image without image is last_image_requires_image."""
        assert_only(validate(make(last_image=LAST)), "last_image", "last_image_requires_image")

    def test_message_names_the_reason_and_value(self) -> None:
        """The message says why and shows the (truncated) URL."""
        message = validate(make(image="ftp://example.com/" + "x" * 200)).problems[0].message
        assert "'ftp'" in message and "ftp://example.com/" in message and len(message) < 200


# Every spelling of a private address, as a URL host: each must be private_media_url.
PRIVATE_HOSTS = [
    # IPv4 loopback in every spelling
    "127.0.0.1",
    "127.0.0.1.",
    "127.1",
    "127.0.1",
    "2130706433",
    "0177.0.0.1",
    "0177.0.0.01",
    "017700000001",
    "0x7f.0.0.1",
    "0X7F.0.0.1",
    "0x7f.0x0.0x0.0x1",
    "0x7f000001",
    "0x7f.1",
    "0x7f.0.1",
    "0177.1",
    "127.0x0.1",
    "%31%32%37.0.0.1",
    "%31%32%37%2e%30%2e%30%2e%31",
    FULLWIDTH_LOOPBACK,
    "127。0。0。1",
    "127.000.000.001",
    # other private and special ranges
    "0",
    "0.0.0.0",
    "0x0",
    "10.0.0.1",
    "10.255.255.255",
    "167772161",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "0xc0a80101",
    "0300.0250.1.1",
    "169.254.169.254",
    "0xa9fea9fe",
    "100.64.0.1",
    "100.127.255.255",
    "192.0.0.8",
    "192.0.2.1",
    "198.18.0.1",
    "198.51.100.1",
    "203.0.113.1",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "4294967295",
    # IPv6
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::]",
    "[fe80::1]",
    "[fe80::1%25eth0]",
    "[FE80::1%25en0]",
    "[fc00::1]",
    "[fd12:3456:789a::1]",
    "[fd00:ec2::254]",
    "[fec0::1]",
    "[ff02::1]",
    "[100::1]",
    "[2001:db8::1]",
    "[3fff::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::FFFF:7F00:0001]",
    "[::ffff:10.0.0.1]",
    "[::ffff:169.254.169.254]",
    "[::127.0.0.1]",
    "[::ffff:0:127.0.0.1]",
    "[64:ff9b::127.0.0.1]",
    "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b:1::1]",
    "[2002:7f00:1::]",
    "[2002:c0a8:101::1]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo, client 127.0.0.1
    # names
    "localhost",
    "LOCALHOST",
    "localhost.",
    "LocalHost.",
    "api.localhost",
    "printer.local",
    "metadata.google.internal",
    "db.INTERNAL.",
    "nas.home.arpa",
    "router.localdomain",
    "intranet",
    "metadata",
    "%6c%6f%63%61%6c%68%6f%73%74",
    FULLWIDTH_LOCALHOST,
]

# Public addresses and names in the same spellings: each must pass (names go on to the DNS check).
PUBLIC_HOSTS = [
    ("8.8.8.8", None),
    ("0x08080808", None),
    ("134744072", None),
    ("010.010.010.010", None),
    ("8.8.2056", None),
    ("1.1.1.1", None),
    ("100.63.255.255", None),
    ("100.128.0.1", None),
    ("172.32.0.1", None),
    ("192.169.0.1", None),
    ("223.255.255.255", None),
    ("[2001:4860:4860::8888]", None),
    ("[2606:4700:4700::1111]", None),
    ("[::ffff:8.8.8.8]", None),
    ("[64:ff9b::808:808]", None),
    ("[2002:808:808::1]", None),
    ("example.com", "example.com"),
    ("EXAMPLE.com.", "example.com"),
    ("cdn.example.co.uk", "cdn.example.co.uk"),
    ("localhost.example.com", "localhost.example.com"),
    ("local.example.com", "local.example.com"),
    ("example.com.internal.example.org", "example.com.internal.example.org"),
    ("1x.example.com", "1x.example.com"),
    ("example.123x", "example.123x"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("%65xample.com", "example.com"),
]


class TestPrivateMedia:
    @pytest.mark.parametrize("host", PRIVATE_HOSTS)
    @pytest.mark.parametrize("param", ["image", "last_image"])
    def test_private_hosts_rejected(self, host: str, param: str) -> None:
        """Private, loopback, link-local, CGNAT, unique-local, reserved and local names, in every spelling."""
        body = make(image=IMG, last_image=LAST)
        body[param] = f"http://{host}/a.png"
        assert_only(validate(body), param, "private_media_url")

    @pytest.mark.parametrize(("host", "name"), PUBLIC_HOSTS)
    def test_public_hosts_pass(self, host: str, name: str | None) -> None:
        """Public literals pass outright; public-looking names pass, normalized, into media_hosts."""
        result = validate(make(image=f"https://{host}/a.png"))
        assert_valid(result)
        assert result.request is not None
        assert result.request.media_hosts == ((name,) if name else ())

    @pytest.mark.parametrize(
        "url",
        [
            "https://user:pass@example.com/a.png",
            "https://user@example.com/a.png",
            "https://@example.com/a.png",
            "https://:@example.com/a.png",
            "https://example.com%2f@evil.example/a.png",
            "https://user:pass@8.8.8.8/a.png",
            "https://u:p@[::1]/a.png",
        ],
    )
    def test_credentials_rejected(self, url: str) -> None:
        """Credentials (userinfo) in a media URL are private_media_url."""
        result = validate(make(image=url))
        assert_only(result, "image", "private_media_url")
        assert "credentials" in result.problems[0].message

    @pytest.mark.parametrize(
        "url", ["http://127.0.0.1/a.png", "http://localhost/a.png", "https://u:p@example.com/a.png"]
    )
    def test_allowed_when_blocking_is_off(self, url: str) -> None:
        """With block_private_media off, private media passes and no names are collected for DNS."""
        result = validate(make(image=url), ValidationOptions(block_private_media=False))
        assert_valid(result)
        assert result.request is not None and result.request.media_hosts == ()

    def test_media_hosts_deduplicated(self) -> None:
        """image and last_image on one host give one name to resolve."""
        request = validate(make(image=IMG, last_image=LAST)).request
        assert request is not None and request.media_hosts == ("example.com",)

    def test_media_hosts_in_order(self) -> None:
        """Two hosts are listed image first."""
        request = validate(make(image="https://a.example/x.png", last_image="https://B.example./y.png")).request
        assert request is not None and request.media_hosts == ("a.example", "b.example")

    def test_message_names_the_address(self) -> None:
        """The message names the address a disguised spelling really means."""
        message = validate(make(image="http://0x7f.1/a.png")).problems[0].message
        assert "127.0.0.1" in message and "0x7f.1" in message


class TestParseIpLiteral:
    @pytest.mark.parametrize(
        ("host", "expected"),
        [
            ("127.0.0.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("017700000001", "127.0.0.1"),
            ("0x7f.0.0.1", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("127.1", "127.0.0.1"),
            ("127.0.1", "127.0.0.1"),
            ("127.0.0.1.", "127.0.0.1"),
            ("%31%32%37.0.0.1", "127.0.0.1"),
            (FULLWIDTH_LOOPBACK, "127.0.0.1"),
            ("0x", "0.0.0.0"),
            ("0", "0.0.0.0"),
            ("1.0x", "1.0.0.0"),
            ("8.8.2056", "8.8.8.8"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
            ("::ffff:7f00:1", "::ffff:7f00:1"),
            ("fe80::1%eth0", "fe80::1"),
            ("[fe80::1%25eth0]", "fe80::1"),
            ("2001:DB8::1", "2001:db8::1"),
        ],
    )
    def test_addresses(self, host: str, expected: str) -> None:
        """Every spelling parses to the address it means."""
        assert parse_ip_literal(host) == ipaddress.ip_address(expected)

    @pytest.mark.parametrize(
        "host",
        [
            "example.com",
            "localhost",
            "",
            "1.2.3.4.5",
            "256.0.0.1",
            "1.256.0.0.1",
            "4294967296",
            "09.0.0.1",
            "1..2",
            "0x1g",
            "example.0x7f",
            "[::1",
            "::ffff:0177.0.0.1",
            "[127.0.0.1]",
            "fe80::1%",
            "1.2.3.4 ",
        ],
    )
    def test_not_addresses(self, host: str) -> None:
        """Names and malformed literals are not addresses."""
        assert parse_ip_literal(host) is None


class TestIsPrivateAddress:
    @pytest.mark.parametrize(
        ("address", "private"),
        [
            ("127.0.0.1", True),
            ("10.1.2.3", True),
            ("172.20.0.1", True),
            ("192.168.0.1", True),
            ("169.254.1.1", True),
            ("100.64.0.0", True),
            ("100.127.255.255", True),
            ("0.0.0.0", True),
            ("224.0.0.251", True),
            ("240.0.0.0", True),
            ("192.0.2.1", True),
            ("::1", True),
            ("::", True),
            ("fc00::1", True),
            ("fdff::1", True),
            ("fe80::1", True),
            ("ff05::2", True),
            ("::ffff:192.168.0.1", True),
            ("64:ff9b::10.0.0.1", True),
            ("2002:0a00:0001::", True),
            ("2001:db8::1", True),
            ("2001:2::1", True),
            ("8.8.8.8", False),
            ("100.63.255.255", False),
            ("100.128.0.0", False),
            ("172.15.255.255", False),
            ("172.32.0.0", False),
            ("2001:4860:4860::8888", False),
            ("::ffff:8.8.8.8", False),
            ("64:ff9b::8.8.8.8", False),
            ("2002:0808:0808::", False),
        ],
    )
    def test_table(self, address: str, private: bool) -> None:
        """Special-purpose ranges are private; global unicast (and forms embedding it) is not."""
        assert is_private_address(ipaddress.ip_address(address)) is private


class TestMediaHost:
    @pytest.mark.parametrize(
        ("url", "host"),
        [
            ("https://Example.COM./a.png", "example.com"),
            ("https://user@example.com/a.png", "example.com"),
            ("https://127.0.0.1/a.png", None),
            ("https://[::1]/a.png", None),
            ("ftp://example.com/a.png", None),
            (None, None),
        ],
    )
    def test_table(self, url: object, host: str | None) -> None:
        """media_host gives the normalized name of a URL, None for literals and unusable URLs."""
        assert media_host(url) == host


class TestExtraBody:
    @pytest.mark.parametrize("extra", ["cfg", 5, [], None, True])
    def test_not_an_object(self, extra: object) -> None:
        """extra_body must be an object."""
        assert_only(validate(make(extra_body=extra)), "extra_body", "invalid_type")

    def test_empty_object(self) -> None:
        """An empty extra_body is fine and forwarded as is."""
        assert assert_valid(validate(make(extra_body={})))["extra_body"] == {}

    @pytest.mark.parametrize(
        ("field", "value", "code"),
        [
            ("negative_prompt", 5, "invalid_type"),
            ("negative_prompt", None, "invalid_type"),
            ("negative_prompt", ["blur"], "invalid_type"),
            ("negative_prompt", "x" * 2501, "negative_prompt_too_long"),
            ("cfg_scale", "0.5", "invalid_type"),
            ("cfg_scale", True, "invalid_type"),
            ("cfg_scale", None, "invalid_type"),
            ("cfg_scale", float("nan"), "invalid_type"),
            ("cfg_scale", float("inf"), "invalid_type"),
            ("cfg_scale", -0.1, "cfg_scale_out_of_range"),
            ("cfg_scale", 1.01, "cfg_scale_out_of_range"),
            ("cfg_scale", 2, "cfg_scale_out_of_range"),
            ("cfg_scale", -1, "cfg_scale_out_of_range"),
            ("shot_type", "custom", "invalid_enum"),
            ("shot_type", "Customize", "invalid_enum"),
            ("shot_type", "auto", "invalid_enum"),
            ("shot_type", "", "invalid_enum"),
            ("shot_type", 1, "invalid_type"),
            ("shot_type", None, "invalid_type"),
            ("element_list", "el_1", "invalid_type"),
            ("element_list", {"element_id": "el_1"}, "invalid_type"),
            ("element_list", [{"element_id": i} for i in range(4)], "element_list_too_long"),
            ("multi_prompt", "shot", "invalid_type"),
        ],
    )
    def test_invalid(self, field: str, value: object, code: str) -> None:
        """Each extra_body field has its own type and range rule."""
        body = make(extra_body={field: value}, image=IMG, duration=5)
        body.pop("prompt") if field == "multi_prompt" else None
        assert_only(validate(body), f"extra_body.{field}", code)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("negative_prompt", ""),
            ("negative_prompt", "x" * 2500),
            ("cfg_scale", 0),
            ("cfg_scale", 1),
            ("cfg_scale", 0.0),
            ("cfg_scale", 1.0),
            ("cfg_scale", 0.5),
            ("shot_type", "customize"),
            ("shot_type", "intelligent"),
            ("element_list", []),
            ("element_list", [{"element_id": "el_1"}, {"element_id": 2}, {"element_id": 0}]),
        ],
    )
    def test_valid(self, field: str, value: object) -> None:
        """Boundary and ordinary values pass and are forwarded unchanged."""
        body = make(extra_body={field: value})
        assert assert_valid(validate(body)) == body

    @pytest.mark.parametrize(
        ("value", "hint"),
        [("custom", "customize"), ("Customize", "customize"), ("intelligente", "intelligent")],
    )
    def test_shot_type_hint(self, value: str, hint: str) -> None:
        """A near-miss shot_type gets a did-you-mean hint."""
        message = validate(make(extra_body={"shot_type": value})).problems[0].message
        assert message.endswith(f"; did you mean '{hint}'?")

    def test_shot_type_intelligence_normalized(self) -> None:
        """shot_type 'intelligence' is forwarded as 'intelligent' with a warning; input untouched."""
        body = make(extra_body={"shot_type": "intelligence", "cfg_scale": 0.5})
        before = copy.deepcopy(body)
        result = validate(body)
        normalized = assert_valid(result)
        assert normalized["extra_body"] == {"shot_type": "intelligent", "cfg_scale": 0.5}
        assert warning_pairs(result) == [("extra_body.shot_type", "shot_type_normalized")]
        assert body == before

    @pytest.mark.parametrize(
        ("element", "param", "code"),
        [
            ("el_1", "extra_body.element_list.0", "invalid_type"),
            ({}, "extra_body.element_list.0.element_id", "missing_field"),
            ({"element_id": None}, "extra_body.element_list.0.element_id", "invalid_type"),
            ({"element_id": ""}, "extra_body.element_list.0.element_id", "invalid_type"),
            ({"element_id": "  "}, "extra_body.element_list.0.element_id", "invalid_type"),
            ({"element_id": True}, "extra_body.element_list.0.element_id", "invalid_type"),
            ({"element_id": 1.5}, "extra_body.element_list.0.element_id", "invalid_type"),
            ({"element_id": "el_1", "weight": 1}, "extra_body.element_list.0.weight", "unknown_field"),
        ],
    )
    def test_element_items(self, element: object, param: str, code: str) -> None:
        """Each element is an object with a required element_id (string or integer) and nothing else."""
        assert_only(validate(make(extra_body={"element_list": [element]})), param, code)


class TestMultiPrompt:
    def test_valid(self) -> None:
        """Shots with unique indexes and durations adding up to duration pass unchanged."""
        body = shots(2, 3, 5)
        result = validate(body)
        assert assert_valid(result) == body
        assert result.request is not None and result.request.mode == "image"

    @pytest.mark.parametrize("durations", [(5,), (2,) * 6, (15,)])
    def test_count_bounds(self, durations: tuple[int, ...]) -> None:
        """One to six shots pass."""
        assert_valid(validate(shots(*durations)))

    @pytest.mark.parametrize(("durations", "count"), [((), 0), ((2,) * 7, 7)])
    def test_count_out_of_range(self, durations: tuple[int, ...], count: int) -> None:
        """Zero or more than six shots is multi_prompt_count."""
        body = shots(*durations)
        body["duration"] = 14 if count else 5
        result = validate(body)
        assert ("extra_body.multi_prompt", "multi_prompt_count") in pairs(result)

    @pytest.mark.parametrize(
        ("shot", "param", "code"),
        [
            ("shot", "extra_body.multi_prompt.0", "invalid_type"),
            ({"prompt": "a", "duration": 5}, "extra_body.multi_prompt.0.index", "missing_field"),
            ({"index": 1, "duration": 5}, "extra_body.multi_prompt.0.prompt", "missing_field"),
            ({"index": 1, "prompt": "a"}, "extra_body.multi_prompt.0.duration", "missing_field"),
            ({"index": "1", "prompt": "a", "duration": 5}, "extra_body.multi_prompt.0.index", "invalid_type"),
            (
                {"index": True, "prompt": "a", "duration": 5},
                "extra_body.multi_prompt.0.index",
                "invalid_type",
            ),
            ({"index": 1.0, "prompt": "a", "duration": 5}, "extra_body.multi_prompt.0.index", "invalid_type"),
            (
                {"index": -1, "prompt": "a", "duration": 5},
                "extra_body.multi_prompt.0.index",
                "multi_prompt_index_out_of_range",
            ),
            ({"index": 1, "prompt": 7, "duration": 5}, "extra_body.multi_prompt.0.prompt", "invalid_type"),
            ({"index": 1, "prompt": " ", "duration": 5}, "extra_body.multi_prompt.0.prompt", "empty_prompt"),
            (
                {"index": 1, "prompt": "x" * 513, "duration": 5},
                "extra_body.multi_prompt.0.prompt",
                "multi_prompt_prompt_too_long",
            ),
            (
                {"index": 1, "prompt": "a", "duration": 2.5},
                "extra_body.multi_prompt.0.duration",
                "invalid_type",
            ),
            (
                {"index": 1, "prompt": "a", "duration": True},
                "extra_body.multi_prompt.0.duration",
                "invalid_type",
            ),
            (
                {"index": 1, "prompt": "a", "duration": "2.5"},
                "extra_body.multi_prompt.0.duration",
                "invalid_type",
            ),
            (
                {"index": 1, "prompt": "a", "duration": 0},
                "extra_body.multi_prompt.0.duration",
                "multi_prompt_duration_out_of_range",
            ),
            (
                {"index": 1, "prompt": "a", "duration": 5, "camera": "pan"},
                "extra_body.multi_prompt.0.camera",
                "unknown_field",
            ),
        ],
    )
    def test_shot_rules(self, shot: object, param: str, code: str) -> None:
        """Each shot is {index, prompt, duration} with its own type and range rules."""
        body = {
            "model": "kling-v3-pro-silent",
            "image": IMG,
            "duration": 5,
            "extra_body": {"multi_prompt": [shot]},
        }
        assert_only(validate(body), param, code)

    @pytest.mark.parametrize("index", [0, 1, 7])
    def test_index_values(self, index: int) -> None:
        """Any integer index of 0 or more is accepted."""
        body = shots(5)
        body["extra_body"]["multi_prompt"][0]["index"] = index
        assert_valid(validate(body))

    def test_prompt_at_limit(self) -> None:
        """A shot prompt of exactly 512 characters passes."""
        body = shots(5)
        body["extra_body"]["multi_prompt"][0]["prompt"] = "x" * 512
        assert_valid(validate(body))

    def test_duplicate_index(self) -> None:
        """A repeated index is duplicate_index on the later shot."""
        body = shots(2, 3, 5)
        body["extra_body"]["multi_prompt"][2]["index"] = 1
        assert_only(validate(body), "extra_body.multi_prompt.2.index", "duplicate_index")

    @pytest.mark.parametrize("duration", [9, 11, "11"])
    def test_duration_mismatch(self, duration: object) -> None:
        """Shot durations must add up exactly to duration."""
        body = shots(2, 3, 5)
        body["duration"] = duration
        assert_only(validate(body), "extra_body.multi_prompt", "multi_prompt_duration_mismatch")

    def test_duration_required(self) -> None:
        """With multi_prompt, the top-level duration is required."""
        body = shots(2, 3)
        del body["duration"]
        result = validate(body)
        assert_only(result, "duration", "missing_field")
        assert "multi_prompt" in result.problems[0].message

    def test_no_mismatch_on_top_of_bad_durations(self) -> None:
        """An invalid shot duration is reported alone, without a sum mismatch on top."""
        body = shots(2, 3)
        body["extra_body"]["multi_prompt"][1]["duration"] = "three"
        assert_only(validate(body), "extra_body.multi_prompt.1.duration", "invalid_type")

    def test_with_last_image(self) -> None:
        """multi_prompt together with last_image is multi_prompt_with_last_image."""
        body = make(shots(2, 3), last_image=LAST)
        assert_only(validate(body), "extra_body.multi_prompt", "multi_prompt_with_last_image")

    def test_string_durations_normalized(self) -> None:
        """Integer-valued string shot durations are normalized to integers, without touching the input."""
        body = shots(2, 3)
        body["extra_body"]["multi_prompt"][1]["duration"] = "3"
        body["duration"] = "5"
        before = copy.deepcopy(body)
        normalized = assert_valid(validate(body))
        assert [s["duration"] for s in normalized["extra_body"]["multi_prompt"]] == [2, 3]
        assert normalized["duration"] == 5
        assert body == before

    def test_problems_at_every_shot(self) -> None:
        """Problems in several shots are all reported with their positions."""
        body = shots(2, 3, 5)
        multi = body["extra_body"]["multi_prompt"]
        multi[0]["prompt"] = ""
        multi[2]["duration"] = -1
        del multi[1]["index"]
        assert pairs(validate(body)) == [
            ("extra_body.multi_prompt.0.prompt", "empty_prompt"),
            ("extra_body.multi_prompt.1.index", "missing_field"),
            ("extra_body.multi_prompt.2.duration", "multi_prompt_duration_out_of_range"),
        ]


class TestFlattenedForm:
    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("negative_prompt", "blur"),
            ("cfg_scale", 0.5),
            ("shot_type", "customize"),
            ("element_list", [{"element_id": "el_1"}]),
        ],
    )
    def test_moved_into_extra_body(self, field: str, value: object) -> None:
        """A flattened field is forwarded inside extra_body and removed from the top level."""
        body = make(**{field: value})
        normalized = assert_valid(validate(body))
        assert field not in normalized
        assert normalized["extra_body"] == {field: value}
        assert field in body and "extra_body" not in body  # input untouched

    def test_multi_prompt_moved(self) -> None:
        """A flattened multi_prompt is moved and validated like the nested one."""
        body = shots(2, 3)
        body["multi_prompt"] = body.pop("extra_body")["multi_prompt"]
        normalized = assert_valid(validate(body))
        assert "multi_prompt" not in normalized
        assert normalized["extra_body"]["multi_prompt"] == body["multi_prompt"]

    def test_merged_with_existing_extra_body(self) -> None:
        """Flattened fields join an existing extra_body, after its own fields."""
        body = make(cfg_scale=0.5, extra_body={"negative_prompt": "blur"})
        normalized = assert_valid(validate(body))
        assert normalized["extra_body"] == {"negative_prompt": "blur", "cfg_scale": 0.5}
        assert body["extra_body"] == {"negative_prompt": "blur"}

    def test_all_five_at_once(self) -> None:
        """All five flattened fields move together (SDK form of an image multi-shot request)."""
        body = {
            "model": "kling-v3-pro-audio",
            "image": IMG,
            "duration": 5,
            "negative_prompt": "blur",
            "cfg_scale": 0.7,
            "shot_type": "customize",
            "element_list": [{"element_id": "el_1"}],
            "multi_prompt": [{"index": 1, "prompt": "a", "duration": 5}],
        }
        normalized = assert_valid(validate(body))
        assert set(normalized) == {"model", "image", "duration", "extra_body"}
        assert set(normalized["extra_body"]) == {
            "negative_prompt",
            "cfg_scale",
            "shot_type",
            "element_list",
            "multi_prompt",
        }

    @pytest.mark.parametrize(
        ("field", "value", "code"),
        [
            ("negative_prompt", 5, "invalid_type"),
            ("cfg_scale", 3, "cfg_scale_out_of_range"),
            ("shot_type", "custom", "invalid_enum"),
            ("element_list", [{}] * 4, "element_list_too_long"),
        ],
    )
    def test_problems_named_where_sent(self, field: str, value: object, code: str) -> None:
        """Problems with a flattened field carry its top-level name as param."""
        result = validate(make(**{field: value}))
        assert (field, code) in pairs(result)

    def test_flattened_shot_paths(self) -> None:
        """Problems inside a flattened multi_prompt are reported under multi_prompt.N."""
        body = shots(2, 3)
        body["multi_prompt"] = body.pop("extra_body")["multi_prompt"]
        body["multi_prompt"][1]["duration"] = 0
        assert_only(validate(body), "multi_prompt.1.duration", "multi_prompt_duration_out_of_range")

    @pytest.mark.parametrize(
        ("field", "value"),
        [("negative_prompt", "blur"), ("cfg_scale", 0.5), ("shot_type", "customize"), ("element_list", [])],
    )
    def test_duplicate_field(self, field: str, value: object) -> None:
        """A field both at the top level and in extra_body is duplicate_field, under its top-level name."""
        result = validate(make(**{field: value}, extra_body={field: value}))
        assert_only(result, field, "duplicate_field")

    def test_flattened_with_invalid_extra_body(self) -> None:
        """A flattened field is still checked when extra_body itself is not an object."""
        assert pairs(validate(make(cfg_scale=5, extra_body="x"))) == [
            ("extra_body", "invalid_type"),
            ("cfg_scale", "cfg_scale_out_of_range"),
        ]


class TestUnknownFields:
    @pytest.mark.parametrize(
        ("field", "param", "hint"),
        [
            ("promt", "promt", "prompt"),
            ("modle", "modle", "model"),
            ("aspectRatio", "aspectRatio", "aspect_ratio"),
            ("last_img", "last_img", "last_image"),
            ("negative_promt", "negative_promt", "negative_prompt"),
            ("seconds", "seconds", "duration"),
            ("size", "size", "aspect_ratio"),
            ("image_tail", "image_tail", "last_image"),
            ("n", "n", None),
            ("zzzzzz", "zzzzzz", None),
        ],
    )
    def test_top_level(self, field: str, param: str, hint: str | None) -> None:
        """Unknown top-level fields are unknown_field, with a did-you-mean hint when one is close."""
        result = validate(make(**{field: 1}))
        assert_only(result, param, "unknown_field")
        message = result.problems[0].message
        if hint is None:
            assert "did you mean" not in message and "known fields are" in message
        else:
            assert message.endswith(f"; did you mean '{hint}'?")

    @pytest.mark.parametrize(("field", "hint"), [("cfgscale", "cfg_scale"), ("shot", "shot_type"), ("seed", None)])
    def test_in_extra_body(self, field: str, hint: str | None) -> None:
        """Unknown fields inside extra_body are unknown_field at extra_body.<name>."""
        result = validate(make(extra_body={field: 1}))
        assert_only(result, f"extra_body.{field}", "unknown_field")
        if hint is not None:
            assert result.problems[0].message.endswith(f"; did you mean '{hint}'?")

    def test_forwarded_when_allowed(self) -> None:
        """With allow_unknown_fields, unknown fields at every level are forwarded, without problems."""
        body = shots(2, 3)
        body["seed"] = 42
        body["extra_body"]["watermark"] = False
        body["extra_body"]["multi_prompt"][0]["camera"] = "pan"
        body["extra_body"]["element_list"] = [{"element_id": "e", "weight": 1}]
        result = validate(body, ValidationOptions(allow_unknown_fields=True))
        assert assert_valid(result) == body
        assert result.warnings == ()

    def test_allowed_does_not_relax_known_fields(self) -> None:
        """allow_unknown_fields forwards unknown fields but still checks the known ones."""
        result = validate(make(seed=1, duration=99), ValidationOptions(allow_unknown_fields=True))
        assert_only(result, "duration", "duration_out_of_range")


class TestAllProblemsAtOnce:
    def test_many_problems(self) -> None:
        """Every problem in a body is reported, in a stable order, with dotted params."""
        body = {
            "model": "kling-v3-std",
            "prompt": "",
            "last_image": "http://localhost/x.png",
            "aspect_ratio": "4:3",
            "duration": 20,
            "cfg_scale": 2,
            "extra_body": {
                "cfg_scale": 0.5,
                "shot_type": "custom",
                "negative_prompt": 7,
                "element_list": [{}, {}, {}, {}],
                "seeed": 1,
            },
            "sound": True,
        }
        result = validate(body)
        assert pairs(result) == [
            ("model", "unknown_model"),
            ("prompt", "empty_prompt"),
            ("last_image", "private_media_url"),
            ("last_image", "last_image_requires_image"),
            ("aspect_ratio", "invalid_enum"),
            ("duration", "duration_out_of_range"),
            ("cfg_scale", "duplicate_field"),
            ("extra_body.seeed", "unknown_field"),
            ("extra_body.negative_prompt", "invalid_type"),
            ("extra_body.shot_type", "invalid_enum"),
            ("extra_body.element_list", "element_list_too_long"),
            ("extra_body.element_list.0.element_id", "missing_field"),
            ("extra_body.element_list.1.element_id", "missing_field"),
            ("extra_body.element_list.2.element_id", "missing_field"),
            ("extra_body.element_list.3.element_id", "missing_field"),
            ("sound", "unknown_field"),
        ]
        assert result.request is None and not result.valid

    def test_multi_shot_conflicts(self) -> None:
        """prompt, last_image and a missing duration around multi_prompt are all reported."""
        body = make(shots(2, 3), prompt="a fox", last_image=LAST)
        del body["duration"]
        assert pairs(validate(body)) == [
            ("prompt", "prompt_with_multi_prompt"),
            ("extra_body.multi_prompt", "multi_prompt_with_last_image"),
            ("duration", "missing_field"),
        ]

    def test_warnings_kept_when_invalid(self) -> None:
        """Warnings are reported alongside problems."""
        result = validate(make(image=IMG, aspect_ratio="1:1", duration=1))
        assert_only(result, "duration", "duration_out_of_range")
        assert warning_pairs(result) == [("aspect_ratio", "aspect_ratio_not_guaranteed")]


class TestPassthroughModels:
    OPTIONS = ValidationOptions(passthrough_models=frozenset({"veo-3.1", "kling-v3-std-silent"}))

    def test_forwarded_without_kling_rules(self) -> None:
        """A pass-through model is forwarded unchanged, whatever its other fields."""
        body = {"model": "veo-3.1", "prompt": "", "duration": 60, "resolution": "4k", "image": IMG}
        result = validate(body, self.OPTIONS)
        assert assert_valid(result) == body
        request = result.request
        assert request is not None
        assert (request.tier, request.audio, request.mode, request.duration) == (None, None, "image", 60)

    @pytest.mark.parametrize(
        ("fields", "mode", "duration"),
        [
            ({}, "text", None),
            ({"image": IMG, "last_image": LAST}, "first_last", None),
            ({"duration": "8"}, "text", 8),
        ],
    )
    def test_derived(self, fields: dict[str, Any], mode: str, duration: int | None) -> None:
        """Mode and duration are still derived where they can be."""
        request = validate({"model": "veo-3.1", **fields}, self.OPTIONS).request
        assert request is not None and (request.mode, request.duration) == (mode, duration)

    def test_private_media_still_blocked(self) -> None:
        """The private-media rule applies to pass-through models too."""
        result = validate({"model": "veo-3.1", "image": "http://10.0.0.1/a.png"}, self.OPTIONS)
        assert_only(result, "image", "private_media_url")

    @pytest.mark.parametrize(
        "url",
        [
            "http:/10.0.0.1/a.png",
            "http:\\\\10.0.0.1\\a.png",
            "http:///10.0.0.1/a.png",
            "data:image/png;base64,AAAA",
            "//x/a",
        ],
    )
    def test_media_url_parsed_strictly(self, url: str) -> None:
        """A media URL no strict parse can read (browsers read some as internal hosts) is refused for every model."""
        assert_only(validate({"model": "veo-3.1", "image": url}, self.OPTIONS), "image", "invalid_url")

    def test_strings_bounded(self) -> None:
        """A pass-through body's strings are bounded too (it is forwarded without Kling's field rules)."""
        result = validate({"model": "veo-3.1", "prompt": "p" * 4097, "style": {"a": ["s" * 5000]}}, self.OPTIONS)
        assert pairs(result) == [("prompt", "string_too_long"), ("style.a.0", "string_too_long")]

    def test_media_hosts_collected(self) -> None:
        """Pass-through media names are collected for the DNS check."""
        request = validate({"model": "veo-3.1", "image": IMG}, self.OPTIONS).request
        assert request is not None and request.media_hosts == ("example.com",)

    def test_kling_ids_keep_kling_rules(self) -> None:
        """Listing a Kling id as pass-through does not switch its rules off."""
        assert_only(validate(make(duration=99), self.OPTIONS), "duration", "duration_out_of_range")

    def test_other_models_still_unknown(self) -> None:
        """Models not configured as pass-through stay unknown_model."""
        assert_only(validate(make(model="sora-2"), self.OPTIONS), "model", "unknown_model")


class TestStringBounds:
    @pytest.mark.parametrize(
        ("fields", "param", "limit"),
        [
            (
                {"extra_body": {"element_list": [{"element_id": "e" * 129}]}},
                "extra_body.element_list.0.element_id",
                128,
            ),
            ({"element_list": [{"element_id": "e" * 900_000}]}, "element_list.0.element_id", 128),
            ({"image": "https://example.com/" + "a" * 2029}, "image", 2048),
            ({"image": IMG, "last_image": "https://example.com/" + "a" * 2029}, "last_image", 2048),
        ],
    )
    def test_each_bound(self, fields: dict[str, Any], param: str, limit: int) -> None:
        """One character over each bound is string_too_long, naming the field and the bound."""
        result = validate(make(**fields))
        assert_only(result, param, "string_too_long")
        assert f"at most {limit} are allowed" in result.problems[0].message

    @pytest.mark.parametrize(
        "fields",
        [
            {"extra_body": {"element_list": [{"element_id": "e" * 128}]}},
            {"image": "https://example.com/" + "a" * 2028},
        ],
    )
    def test_at_the_bound_is_fine(self, fields: dict[str, Any]) -> None:
        """Exactly at the bound passes."""
        assert_valid(validate(make(**fields)))

    def test_forwarded_unknown_fields_and_names_bounded(self) -> None:
        """With unknown fields forwarded, their values (4096) and every field name (64) are bounded too."""
        options = ValidationOptions(allow_unknown_fields=True)
        result = validate(make(note="n" * 4097, extra_body={"x" * 65: 1, "deep": [{"v": "v" * 4097}]}), options)
        assert pairs(result) == [
            ("note", "string_too_long"),
            ("extra_body." + "x" * 64 + "...", "string_too_long"),
            ("extra_body.deep.0.v", "string_too_long"),
        ]
        assert_valid(validate(make(note="n" * 4096), options))


class TestMessages:
    def test_long_values_truncated(self) -> None:
        """Bad values are shown truncated, never in full."""
        message = validate(make(aspect_ratio="z" * 4000)).problems[0].message
        assert len(message) < 200 and "…" in message

    def test_control_characters_escaped(self) -> None:
        """Control characters in a bad value are escaped in the message."""
        message = validate(make(aspect_ratio="16:9\n\x1b[31m")).problems[0].message
        assert "\n" not in message and "\x1b" not in message

    def test_every_problem_is_described(self) -> None:
        """Every problem has a non-empty human message that names its param's field."""
        body = {"model": 1, "prompt": 2, "image": 3, "aspect_ratio": 4, "duration": 5.5, "extra_body": 6}
        for problem in validate(body).problems:
            assert problem.message and problem.param.split(".")[-1] in problem.message

    def test_input_never_mutated(self) -> None:
        """Validation never changes the object it is given, whatever it normalizes."""
        body = make(
            shots(2, 3),
            duration="5",
            cfg_scale=0.5,
            shot_type="intelligence",
            extra_body={
                "multi_prompt": [
                    {"index": 1, "prompt": "a", "duration": "2"},
                    {"index": 2, "prompt": "b", "duration": 3},
                ]
            },
        )
        before = copy.deepcopy(body)
        assert_valid(validate(body))
        assert body == before
