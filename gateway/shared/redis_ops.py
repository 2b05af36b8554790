"""Redis building blocks for scale-out: the shared status cache, rate limits and single flight (SPEC section 8).

With ``[cache] url = "redis://..."`` any number of gateway processes and replicas share what would otherwise be
per-process state. Every class takes a ``redis.asyncio.Redis`` client (from ``connect``) and a key ``prefix``
(default ``"kling-gateway:"``), so several gateways — or tests — can share one Redis::

    {prefix}status:<task_id>      string   RedisStatusCache entry (see _encode); PX = freshness + stale_keep_s
    {prefix}rate:<key name>       hash     RedisRateLimiter bucket: tokens, stamp (µs of Redis TIME)
    {prefix}flight:<key>          string   RedisSingleFlight lock: the holder's random token; PX = lock_ttl_s
    {prefix}accounts:aside        hash     RedisAccountMarks: account -> set aside until (epoch seconds)
    {prefix}accounts:unauthorized hash     RedisAccountMarks: account -> fingerprint of its rejected key

Each class's docstring says what it guarantees; the errors are described on :class:`CacheUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.status.poller import CachedStatus, HeaderTuple
from gateway.store.base import AccountMark
from gateway.url_secrets import redact_url, scrub, url_secrets

T = TypeVar("T")

DEFAULT_PREFIX: Final = "kling-gateway:"
#: Entries whose encoded size exceeds this are not stored (the memory cache skips oversize entries the same way).
DEFAULT_MAX_ENTRY_BYTES: Final = 1 << 20
#: How long one operation (a get, a put, a limit check, one step of single flight) may take before it fails.
DEFAULT_TIMEOUT_S: Final = 2.0
#: What a bucket key outlives the moment its bucket would be full again (then dropping it changes nothing).
BUCKET_EXPIRY_MARGIN_MS: Final = 1000

_FORMAT_VERSION: Final = 1
_HEAD = struct.Struct("!BI")  # format version, length of the JSON metadata that follows; then the raw body
_SCHEMES: Final = ("redis", "rediss")


class CacheUnavailable(Exception):
    """Redis could not be reached or failed to answer; the message never contains a password.

    Every Redis failure in ``get``/``put``/``check``/``run`` surfaces as ``CacheUnavailable`` (chained to the
    redis-py exception), never as a raw redis exception; the app decides whether to fail open or closed.
    """


def _unavailable(operation: str, exc: BaseException) -> CacheUnavailable:
    return CacheUnavailable(f"Redis {operation} failed: {type(exc).__name__}: {exc}")


_REDIS_ERRORS: Final = (RedisError, OSError)


# -- connection -------------------------------------------------------------------------------------------------


async def connect(url: str, **options: Any) -> aioredis.Redis:
    """A client for ``url`` (``redis://`` or ``rediss://``) that has answered a PING.

    ``options`` go to ``redis.asyncio.Redis.from_url``; the connect timeout defaults to 2 s, and each operation of
    the classes below is bounded by their own ``timeout_s`` (default ``DEFAULT_TIMEOUT_S``).
    Raises ``ValueError`` for a URL that is not a Redis URL (or asks for ``decode_responses``, which would break the
    binary entries) and ``CacheUnavailable`` when the server cannot be reached; neither message shows the password.
    """
    parts, safe, secrets = urlsplit(url), redact_url(url), url_secrets(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"cache URL must start with redis:// or rediss://, got {safe!r}")
    if options.get("decode_responses"):
        raise ValueError("decode_responses must stay off: cache entries are binary")
    options.setdefault("socket_connect_timeout", 2.0)
    # No per-command socket timeout: redis-py would wrap every send in asyncio.wait_for (a Task each) and every
    # read in a timeout, a third of a command's CPU. The classes below bound each operation once instead.
    options.setdefault("socket_timeout", None)
    try:
        client = aioredis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ValueError(f"invalid cache URL {safe!r}: {scrub(str(exc), secrets)}") from None
    try:
        await client.ping()
    except _REDIS_ERRORS as exc:
        await client.aclose()
        raise CacheUnavailable(f"cannot reach Redis at {safe}: {scrub(str(exc), secrets)}") from exc
    return client


async def ping(client: aioredis.Redis, timeout_s: float = 1.0) -> bool:
    """True if Redis answers PING within ``timeout_s``; never raises (for readiness checks)."""
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await client.ping())
    except Exception:
        return False


# -- status cache -----------------------------------------------------------------------------------------------


def _encode(entry: CachedStatus, fresh_ms: int, keep_ms: int) -> bytes:
    """``version | len(meta) | meta (JSON) | body``: the body stays raw bytes, the rest is a small JSON array."""
    meta = orjson.dumps([entry.status_text, entry.terminal, fresh_ms, keep_ms, entry.headers])
    return _HEAD.pack(_FORMAT_VERSION, len(meta)) + meta + entry.body


def _decode(value: bytes) -> tuple[bytes, HeaderTuple, str, bool, int, int] | None:
    """(body, headers, status_text, terminal, fresh_ms, keep_ms), or None for a value this version cannot read."""
    if len(value) < _HEAD.size:
        return None
    version, meta_len = _HEAD.unpack_from(value)
    start = _HEAD.size + meta_len
    if version != _FORMAT_VERSION or start > len(value):
        return None
    try:
        meta = orjson.loads(value[_HEAD.size : start])
        if not isinstance(meta, list) or len(meta) != 5:
            return None
        status_text, terminal, fresh_ms, keep_ms, headers = meta
        header_tuple = tuple((str(name), str(val)) for name, val in headers)
        return value[start:], header_tuple, str(status_text), bool(terminal), int(fresh_ms), int(keep_ms)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None


# KEYS[1] entry. Returns {value or nil, PTTL}: the entry and its time left in one command (a MULTI/EXEC pipeline of
# GET and PTTL costs the client four commands' work).
_READ_SCRIPT: Final = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""


class RedisStatusCache:
    """Status cache shared by every replica: async ``get``/``put`` with ``MemoryStatusCache``'s meaning.

    ``put`` stores an answer fresh for ``pending_ttl_s`` (``terminal_ttl_s`` if terminal); after that ``get`` still
    returns it, not fresh, so it can be served STALE, until Redis drops it ``stale_keep_s`` later. The key's PX is
    freshness + stale-keep, and the entry records both, so ``get`` knows it is fresh while PTTL > stale-keep: Redis's
    clock decides, not the replicas'. Entries encoding to more than ``max_entry_bytes`` are not stored (and replace
    any older entry by nothing, as in the memory cache). ``stored_at``/``fresh_until`` of returned entries are on the
    local ``clock`` (``time.monotonic``), derived from PTTL.

    Memory is bounded by the TTLs and ``max_entry_bytes``; a Redis ``maxmemory`` policy (``volatile-ttl``) is the
    operator's hard cap.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        pending_ttl_s: float,
        terminal_ttl_s: float,
        stale_keep_s: float,
        prefix: str = DEFAULT_PREFIX,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if min(pending_ttl_s, terminal_ttl_s, stale_keep_s) < 0:
            raise ValueError("pending_ttl_s, terminal_ttl_s and stale_keep_s must not be negative")
        if max_entry_bytes < 1:
            raise ValueError("max_entry_bytes must be positive")
        self._client = client
        self._pending_ms = round(pending_ttl_s * 1000)
        self._terminal_ms = round(terminal_ttl_s * 1000)
        self._keep_ms = round(stale_keep_s * 1000)
        self._prefix = f"{prefix}status:"
        self._max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._timeout_s = timeout_s
        self._read = client.register_script(_READ_SCRIPT)

    def key(self, task_id: str) -> str:
        """The Redis key of ``task_id``'s entry."""
        return f"{self._prefix}{task_id}"

    async def get(self, task_id: str) -> tuple[CachedStatus | None, bool]:
        """The entry (fresh or not) and whether it is still fresh; (None, False) when absent or unreadable."""
        try:
            async with asyncio.timeout(self._timeout_s):
                value, pttl = await self._read(keys=[self.key(task_id)])
        except _REDIS_ERRORS as exc:
            raise _unavailable("get", exc) from exc
        if value is None:
            return None, False
        decoded = _decode(value)
        if decoded is None:
            return None, False
        body, headers, status_text, terminal, fresh_ms, keep_ms = decoded
        remaining_ms = int(pttl) if pttl >= 0 else keep_ms  # -1: someone removed the expiry; never fresh then
        now = self._clock()
        entry = CachedStatus(
            body=body,
            headers=headers,
            status_text=status_text,
            terminal=terminal,
            stored_at=now - (fresh_ms + keep_ms - remaining_ms) / 1000,
            fresh_until=now + (remaining_ms - keep_ms) / 1000,
        )
        return entry, remaining_ms > keep_ms

    async def put(
        self, task_id: str, body: bytes, headers: Iterable[tuple[str, str]], status_text: str, terminal: bool
    ) -> CachedStatus:
        """Store a 200 status answer (callers never put errors); its freshness follows ``terminal``."""
        fresh_ms = self._terminal_ms if terminal else self._pending_ms
        now = self._clock()
        entry = CachedStatus(
            body=body,
            headers=tuple(headers),
            status_text=status_text,
            terminal=terminal,
            stored_at=now,
            fresh_until=now + fresh_ms / 1000,
        )
        value = _encode(entry, fresh_ms, self._keep_ms)
        try:
            async with asyncio.timeout(self._timeout_s):
                if len(value) > self._max_entry_bytes or fresh_ms + self._keep_ms == 0:
                    await self._client.delete(self.key(task_id))  # nothing to keep; an older answer must not linger
                else:
                    await self._client.set(self.key(task_id), value, px=fresh_ms + self._keep_ms)
        except _REDIS_ERRORS as exc:
            raise _unavailable("put", exc) from exc
        return entry


# -- rate limits ------------------------------------------------------------------------------------------------

# KEYS[1] bucket; ARGV[1] rpm; ARGV[2] now in µs, or "" for Redis TIME; ARGV[3] expiry margin in ms; ARGV[4] the
# most tokens to take. Returns {granted, wait, left}: granted >= 1 and wait false, or granted 0 and the wait in µs
# as a string (a Lua number reply would be truncated to an integer); left is the whole tokens the bucket holds
# afterwards. With ARGV[4] = 1 this is exactly auth.rate_limits.RateLimiter.check's arithmetic; more takes what
# the bucket holds, up to that many, never more.
_BUCKET_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local capacity = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local want = tonumber(ARGV[4])
local rate = capacity / 60000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = capacity
if state[1] and state[2] then
  local elapsed = math.max(0, now - tonumber(state[2]))
  tokens = math.min(capacity, tonumber(state[1]) + elapsed * rate)
end
local granted = 0
local wait = false
if tokens >= 1 - 1e-9 then
  granted = math.max(1, math.min(want, math.floor(tokens + 1e-9)))
  tokens = math.max(0, tokens - granted)
else
  wait = string.format('%.17g', (1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate / 1000) + tonumber(ARGV[3]))
return {granted, wait, math.floor(tokens + 1e-9)}
"""


class RedisRateLimiter:
    """Per-key token buckets shared by every replica: capacity ``rpm``, refilled at ``rpm / 60`` per second.

    ``check`` has ``RateLimiter.check``'s meaning (``gateway.auth.rate_limits``) and runs as one Lua script
    (EVALSHA, loaded again after a ``SCRIPT FLUSH`` or failover), so concurrent checks on any replicas never
    over-grant. The clock is Redis's own ``TIME``; ``clock`` (seconds) replaces it in tests only. A bucket key
    expires ``BUCKET_EXPIRY_MARGIN_MS`` after its bucket would be full again, when a fresh full bucket is the same
    thing.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._client = client
        self._prefix = f"{prefix}rate:"
        self._clock = clock
        self._timeout_s = timeout_s
        self._script = client.register_script(_BUCKET_SCRIPT)

    def key(self, key_name: str) -> str:
        """The Redis key of ``key_name``'s bucket."""
        return f"{self._prefix}{key_name}"

    async def check(self, key_name: str, rpm: int | None) -> float | None:
        """Take one token for ``key_name``: None if allowed, else seconds until a token is available."""
        if rpm is None:
            return None
        _, wait, _ = await self.take(key_name, rpm, 1)
        return wait

    async def take(self, key_name: str, rpm: int, most: int) -> tuple[int, float | None, int]:
        """Take between one and ``most`` tokens for ``key_name``, as many as the bucket holds: ``(taken, None,
        left)``; or ``(0, seconds until a token is available, 0)`` when it holds less than one. ``left`` is the
        whole tokens the shared bucket holds after this take."""
        if rpm < 1:
            raise ValueError("rpm must be a positive integer or None")
        if most < 1:
            raise ValueError("most must be at least 1")
        now = "" if self._clock is None else repr(self._clock() * 1_000_000)
        try:
            async with asyncio.timeout(self._timeout_s):
                taken, wait, left = await self._script(
                    keys=[self.key(key_name)], args=[rpm, now, BUCKET_EXPIRY_MARGIN_MS, most]
                )
        except _REDIS_ERRORS as exc:
            raise _unavailable("rate limit check", exc) from exc
        return int(taken), None if wait is None else float(wait) / 1_000_000, int(left)

    async def forget(self, key_name: str) -> None:
        """Drop ``key_name``'s bucket (e.g. after revocation)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.delete(self.key(key_name))
        except _REDIS_ERRORS as exc:
            raise _unavailable("rate limit forget", exc) from exc


# -- single flight ----------------------------------------------------------------------------------------------

# Delete the lock only if it still holds our token: after a PX expiry it may belong to another replica.
_RELEASE_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisSingleFlight:
    """Concurrent calls with one key, on any replicas, share one call of ``factory``.

    ``value, followed = await flight.run(key, factory, ready=ready, lock_ttl_s=..., wait_s=...)``:

    * **Leader** — the caller that takes the lock (``SET {prefix}flight:<key> <token> NX PX lock_ttl_s``) awaits
      ``factory()`` and gets ``(value, False)``; its exception propagates. Either way the lock is then released —
      only if it still holds this caller's token (Lua compare-and-delete) — so a holder outliving ``lock_ttl_s``
      never frees another replica's lock. A failed release is ignored: the lock expires by itself.
    * **Follower** — a caller that finds the lock taken checks every ``poll_interval_s`` (one ``EXISTS``) until it
      is gone. Then, if ``await ready()`` (the factory's result is in the shared cache), it gets ``(None, True)``
      and reads the cache; if not (the leader failed or its answer was not cacheable), it tries to take the lock
      and lead itself. ``factory`` is expected to write its result where ``ready`` looks *before* returning.
    * **Deadline** — after ``wait_s`` of following (a dead or slow holder), ``ready()`` is asked once more, and if it
      is still False the caller runs ``factory()`` without the lock and gets ``(value, False)``: a dead holder never
      delays a poll longer than ``wait_s``.

    ``CacheUnavailable`` (Redis failed) means this call did not run ``factory``; the caller may then run it alone.
    ``lock_ttl_s`` should exceed the factory's longest run (the upstream timeout), or two replicas may both call.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        poll_interval_s: float = 0.02,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        self._client = client
        self._timeout_s = timeout_s
        self._prefix = f"{prefix}flight:"
        self._poll_interval_s = poll_interval_s
        self._release = client.register_script(_RELEASE_SCRIPT)

    def key(self, key: str) -> str:
        """The Redis key of ``key``'s lock."""
        return f"{self._prefix}{key}"

    async def run(
        self,
        key: str,
        factory: Callable[[], Awaitable[T]],
        *,
        ready: Callable[[], Awaitable[bool]],
        lock_ttl_s: float,
        wait_s: float,
    ) -> tuple[T | None, bool]:
        """``(factory(), False)`` if this caller ran it, ``(None, True)`` if another's result is ready (see class)."""
        if lock_ttl_s <= 0 or wait_s < 0:
            raise ValueError("lock_ttl_s must be positive and wait_s not negative")
        lock = self.key(key)
        token = secrets.token_hex(16)
        deadline = asyncio.get_running_loop().time() + wait_s
        try:
            turn = await self._take_or_wait(lock, token, max(1, math.ceil(lock_ttl_s * 1000)), ready, deadline)
        except _REDIS_ERRORS as exc:
            raise _unavailable("single flight", exc) from exc
        if turn == "ready":
            return None, True
        if turn == "deadline":
            return await factory(), False
        try:
            return await factory(), False
        finally:
            await self._release_lock(lock, token)

    async def _take_or_wait(
        self, lock: str, token: str, lock_ms: int, ready: Callable[[], Awaitable[bool]], deadline: float
    ) -> Literal["lead", "ready", "deadline"]:
        """Take the lock ("lead"), or follow its holders until the result is "ready" or the "deadline" passes."""
        loop = asyncio.get_running_loop()
        while not await self._bounded(self._client.set(lock, token, nx=True, px=lock_ms)):
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return "ready" if await ready() else "deadline"
                await asyncio.sleep(min(self._poll_interval_s, remaining))
                if not await self._bounded(self._client.exists(lock)):
                    break
            if await ready():
                return "ready"
        return "lead"

    async def _bounded(self, command: Awaitable[T]) -> T:
        async with asyncio.timeout(self._timeout_s):
            return await command

    async def _release_lock(self, lock: str, token: str) -> None:
        with contextlib.suppress(*_REDIS_ERRORS):  # the lock then expires on its own after lock_ttl_s
            await self._bounded(self._release(keys=[lock], args=[token]))


# -- upstream accounts set aside --------------------------------------------------------------------------------

# End a set-aside only if it is not later than the one the caller knew of: a newer refusal's stays.
_END_ASIDE_SCRIPT: Final = """
local aside = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if aside <= tonumber(ARGV[2]) then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


class RedisAccountMarks:
    """The set-aside marks of the upstream accounts (``gateway.accounts.board``) in two small hashes, one field per
    account: bounded by the number of accounts, so they need no expiry (a passed set-aside is ignored by readers).
    """

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._client = client
        self._aside = f"{prefix}accounts:aside"
        self._unauthorized = f"{prefix}accounts:unauthorized"
        self._timeout_s = timeout_s
        self._end = client.register_script(_END_ASIDE_SCRIPT)

    async def read(self) -> dict[str, AccountMark]:
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.hgetall(self._aside)
                    pipe.hgetall(self._unauthorized)
                    aside, unauthorized = await pipe.execute()
        except _REDIS_ERRORS as exc:
            raise _unavailable("account marks read", exc) from exc
        marks: dict[str, AccountMark] = {}
        for raw in set(aside) | set(unauthorized):
            account = raw.decode("utf-8", "replace")
            try:
                until = float(aside.get(raw, b"0"))
            except ValueError:
                until = 0.0
            key = unauthorized.get(raw)
            marks[account] = AccountMark(account, until, key.decode("ascii", "replace") if key else None)
        return marks

    async def set_aside(self, account: str, until: float) -> None:
        await self._write("account set aside", self._client.hset(self._aside, account, repr(until)))

    async def unauthorized(self, account: str, key_fingerprint: str) -> None:
        await self._write("account unauthorized", self._client.hset(self._unauthorized, account, key_fingerprint))

    async def end_aside(self, account: str, until: float) -> None:
        await self._write("account set-aside end", self._end(keys=[self._aside], args=[account, repr(until)]))

    async def _write(self, operation: str, command: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await command
        except _REDIS_ERRORS as exc:
            raise _unavailable(operation, exc) from exc
