"""Media URL parsing and the private-address rule: every IPv4/IPv6 spelling, host normalization, local names.

Pure (no I/O). ``gateway.validation.checks`` uses it for ``image``/``last_image`` and ``gateway.webhooks.targets``
for callback URLs; the asynchronous half (names that resolve only to private addresses) is
``gateway.validation.media_guard``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final
from urllib.parse import unquote, urlsplit

from gateway.validation.describe import got, show

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Anywhere in a media URL, whitespace, C0/C1 controls, backslashes and Unicode spaces or format characters
# are where URL parsers disagree (WHATWG reads "\" as "/", Python drops tabs): such URLs are refused outright.
_URL_FORBIDDEN: Final = re.compile(
    "[\x00-\x20\x7f-\x9f\\\\\u00a0\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\ufeff]"
)
# A host name after percent-decoding, IDNA mapping and lower-casing: dot-separated labels of [a-z0-9_-].
_HOST_NAME: Final = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")
_PORT: Final = re.compile(r"[0-9]{0,5}")
_ZONE_ID: Final = re.compile(r"[A-Za-z0-9._~-]{1,64}")
_RADIX_DIGITS: Final = {
    10: re.compile(r"[0-9]+"),
    8: re.compile(r"[0-7]+"),
    16: re.compile(r"[0-9a-f]+"),
}
_HEX_OR_EMPTY: Final = re.compile(r"[0-9a-f]*")

# Special-use and conventionally private name suffixes (RFC 6761, RFC 6762, RFC 8375, ICANN name collisions).
_PRIVATE_SUFFIXES: Final = (
    ".localhost",
    ".local",
    ".internal",
    ".localdomain",
    ".home.arpa",
    ".lan",
    ".home",
    ".corp",
    ".intranet",
)


def _ranges(*cidrs: str) -> tuple[tuple[int, int], ...]:
    nets = (ipaddress.ip_network(cidr) for cidr in cidrs)
    return tuple((int(net.network_address), int(net.broadcast_address)) for net in nets)


# Never a public media host. IPv4: RFC 6890 special-purpose registry entries that are not globally reachable.
_V4_BLOCKED: Final = _ranges(
    "0.0.0.0/8",  # "this network", unspecified
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # CGNAT shared address space
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata lives here)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation TEST-NET-1
    "192.88.99.0/24",  # deprecated 6to4 relay anycast
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation TEST-NET-2
    "203.0.113.0/24",  # documentation TEST-NET-3
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, including broadcast 255.255.255.255
)
# IPv6 outside global unicast 2000::/3 is blocked wholesale (loopback, unspecified, unique-local fc00::/7,
# link-local fe80::/10, site-local, multicast ff00::/8, discard 100::/64, local NAT64 64:ff9b:1::/48, ...);
# inside it, these are not globally reachable. Forms embedding an IPv4 address are judged by that address.
_V6_GLOBAL_UNICAST: Final = _ranges("2000::/3")[0]
_V6_BLOCKED: Final = _ranges(
    "2001::/23",  # IETF protocol assignments (Teredo 2001::/32 is judged by its embedded client address)
    "2001:db8::/32",  # documentation
    "3fff::/20",  # documentation
)
_NAT64_PREFIX: Final = int(ipaddress.IPv6Address("64:ff9b::")) >> 32
_V4_IN_V6_PREFIXES: Final = frozenset(
    {
        0,  # ::a.b.c.d, IPv4-compatible (deprecated); also :: and ::1 (-> 0.0.0.0/8)
        0xFFFF,  # ::ffff:a.b.c.d, IPv4-mapped
        0xFFFF_0000,  # ::ffff:0:a.b.c.d, IPv4-translated (SIIT)
        _NAT64_PREFIX,  # 64:ff9b::a.b.c.d, well-known NAT64
    }
)


def is_private_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether media at ``ip`` could only be inside a private network (or nowhere): never a public host.

    Loopback, private, link-local, CGNAT, unique-local, multicast, unspecified, reserved, documentation and
    benchmarking ranges are private; IPv6 forms that embed an IPv4 address (mapped, compatible, translated,
    NAT64, 6to4, Teredo) are judged by the embedded address.

    >>> [is_private_address(ipaddress.ip_address(ip)) for ip in ("::ffff:127.0.0.1", "8.8.8.8")]
    [True, False]
    """
    if isinstance(ip, ipaddress.IPv4Address):
        value = int(ip)
        return any(low <= value <= high for low, high in _V4_BLOCKED)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return is_private_address(embedded)
    value = int(ip)
    low, high = _V6_GLOBAL_UNICAST
    if not low <= value <= high:
        return True
    return any(low <= value <= high for low, high in _V6_BLOCKED)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    value = int(ip)
    if value >> 32 in _V4_IN_V6_PREFIXES:
        return ipaddress.IPv4Address(value & 0xFFFF_FFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def parse_ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a URL host spells, in any spelling parsers accept; ``None`` for names and non-addresses.

    IPv4 follows the WHATWG URL host parser (which is also what ``inet_aton`` accepts): one to four parts,
    each decimal, octal (leading ``0``) or hex (``0x``), the last part filling the remaining bytes — so
    ``2130706433``, ``0177.0.0.1``, ``017700000001``, ``0x7f.1`` and ``127.1`` are all 127.0.0.1.
    Percent-encoded characters, full-width digits and dots (IDNA mapping) and a trailing dot are undone
    first. IPv6 may come bracketed or bare, with a zone id (``%eth0`` or URL-encoded ``%25eth0``), which is
    dropped.

    >>> parse_ip_literal("0x7f.1"), parse_ip_literal("[::ffff:7f00:1]"), parse_ip_literal("example.com")
    (IPv4Address('127.0.0.1'), IPv6Address('::ffff:7f00:1'), None)
    """
    if host.startswith("[") and host.endswith("]"):
        return _parse_ipv6(host[1:-1])
    if ":" in host:
        return _parse_ipv6(host)
    name = _normalize_name(host)
    if name is None or not _ends_in_number(name):
        return None
    return _parse_ipv4(name)


def _parse_ipv6(text: str) -> ipaddress.IPv6Address | None:
    text = text.replace("%25", "%", 1)  # RFC 6874: the zone separator is percent-encoded inside URLs
    address, percent, zone = text.partition("%")
    if percent and not _ZONE_ID.fullmatch(zone):
        return None
    try:
        return ipaddress.IPv6Address(address)
    except ValueError:
        return None


def _normalize_name(raw: str) -> str | None:
    """A host (not bracketed) as resolvers see it: decoded, IDNA-mapped, lower-case, no trailing dot."""
    host = raw
    if "%" in host:
        try:
            host = unquote(host, errors="strict")
        except UnicodeDecodeError:
            return None
    if not host.isascii():
        try:
            # Python's IDNA 2003 codec applies nameprep (NFKC), so full-width digits and dots become ASCII.
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        return None
    return host


def _ends_in_number(host: str) -> bool:
    """WHATWG "ends in a number": such a host is parsed as IPv4, and is invalid if that fails."""
    last = host.rpartition(".")[2]
    if last.isdigit():
        return True
    return last.startswith("0x") and _HEX_OR_EMPTY.fullmatch(last, 2) is not None


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    parts = host.split(".")
    if len(parts) > 4:
        return None
    numbers: list[int] = []
    for part in parts:
        if part.startswith("0x"):
            digits, radix = part[2:], 16
        elif len(part) > 1 and part.startswith("0"):
            digits, radix = part[1:], 8
        else:
            digits, radix = part, 10
        if not digits:
            if radix == 10:
                return None  # an empty part, as in "1..2"
            numbers.append(0)  # a bare "0x" is zero
            continue
        if len(digits) > 40 or not _RADIX_DIGITS[radix].fullmatch(digits):
            return None
        numbers.append(int(digits, radix))
    last = numbers.pop()
    if any(number > 255 for number in numbers) or last >= 1 << (8 * (4 - len(numbers))):
        return None
    value = last
    for position, number in enumerate(numbers):
        value |= number << (8 * (3 - position))
    return ipaddress.IPv4Address(value)


# (host, ip literal or None, credentials present) or the reason the URL is unusable.
_SplitUrl = tuple[str, IPAddress | None, bool]


def split_media_url(value: object) -> _SplitUrl | str:
    """Parse a media URL ourselves, strictly, so no later parser can read another host into it."""
    if not isinstance(value, str):
        return got(value)
    if _URL_FORBIDDEN.search(value) is not None:
        return f"it contains whitespace, control characters or backslashes, got {show(value)}"
    try:
        parts = urlsplit(value)
    except ValueError:
        return f"it cannot be parsed, got {show(value)}"
    scheme = parts.scheme
    if scheme not in ("https", "http"):
        if not scheme:
            return f"it is not absolute (no http:// or https://), got {show(value)}"
        return f"scheme {scheme!r} is not allowed, got {show(value)}"
    _userinfo, at, hostport = parts.netloc.rpartition("@")
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            return f"its IPv6 host has no closing bracket, got {show(value)}"
        raw_host, port = hostport[1:close], hostport[close + 1 :]
        if port and (port[0] != ":" or not _PORT.fullmatch(port, 1)):
            return f"its port is not a number, got {show(value)}"
        ip6 = _parse_ipv6(raw_host)
        if ip6 is None:
            return f"its host is not a valid IPv6 address, got {show(value)}"
        return str(ip6), ip6, bool(at)
    raw_host, colon, port = hostport.partition(":")
    if colon and not _PORT.fullmatch(port):
        return f"its port is not a number, got {show(value)}"
    if port and int(port) > 65535:
        return f"its port is above 65535, got {show(value)}"
    if not raw_host:
        return f"it has no host, got {show(value)}"
    host = _normalize_name(raw_host)
    if host is None:
        return f"its host is not a valid host name, got {show(value)}"
    if _ends_in_number(host):
        ip4 = _parse_ipv4(host)
        if ip4 is None:
            return f"its host looks like an IPv4 address but is not a valid one, got {show(value)}"
        return str(ip4), ip4, bool(at)
    return host, None, bool(at)


def media_host(url: object) -> str | None:
    """The normalized host name of a media URL, or ``None`` for an IP literal or an unusable URL.

    ``MediaGuard`` uses it to tie the names in ``ValidRequest.media_hosts`` back to ``image``/``last_image``.
    """
    parsed = split_media_url(url)
    if isinstance(parsed, str) or parsed[1] is not None:
        return None
    return parsed[0]


def private_host_reason(host: str, ip: IPAddress | None) -> str | None:
    """Why a normalized host (or its IP literal) is private or local, or None (shared with webhook URL checks)."""
    if ip is not None:
        return f"{ip} is a private, loopback, link-local or reserved address" if is_private_address(ip) else None
    if host == "localhost" or host.endswith(_PRIVATE_SUFFIXES):
        return f"{host!r} is a local or internal host name"
    if "." not in host:
        return f"{host!r} is a single-label name, which only resolves inside private networks"
    return None
