"""`StateStore` on Redis, shared by every gateway replica.

Design choices:

* Every read-modify-write is one Lua script (atomic on the server), registered once with
  `register_script` (EVALSHA, re-loaded transparently after a Redis restart).
* Scripts read the server's `TIME`, so replicas with skewed clocks take the same decisions.
  Tests may pass `clock=` to override it (the value travels as an argument; -1 = use TIME).
* Every call has a socket connect and read timeout, plus a hard asyncio deadline, and
  redis-py's own retries are pinned OFF. (redis-py 8's `Redis(host=...)` defaults to 10
  retries with backoff - measured 3.4 s for a refused port and 5.9 s for a silent one at
  0.2 s timeouts - while `Redis.from_url` happens to get none; we set it explicitly.)
  Retrying is also unsafe here: re-sending a script after a read timeout could apply it
  twice (double-counting a failure or a token). Connection-level failures surface as
  `StoreUnavailable`; the caller picks fail-open or fail-closed.
* Lua numbers are returned as strings: Redis truncates Lua numbers in replies to integers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.state import (
    TOKEN_SLACK_S,
    Clock,
    StoreUnavailable,
    check_bucket_args,
    check_eject_args,
    check_spend_args,
    check_ttl,
)

__all__ = ["RedisStore"]

T = TypeVar("T")

# Errors meaning "no usable answer now", as opposed to bugs (WRONGTYPE, script errors),
# which propagate unchanged. ReadOnlyError: we are talking to a replica after a failover.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TimeoutError, OSError)

# Shared by all scripts. `now_s` honours a test clock passed as ARGV[1] (>= 0), else reads
# the server clock. `num` formats numbers for replies and stored values at full precision.
_PRELUDE = """
local function now_s(arg)
  local n = tonumber(arg)
  if n ~= nil and n >= 0 then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
"""

# KEYS[1] bucket hash {t: tokens, ts: last refill}
# ARGV: now, rate, burst, cost, max_ttl_ms, slack_s
_TAKE_TOKEN = (
    _PRELUDE
    + """
local now = now_s(ARGV[1])
local rate, burst, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then
  tokens, ts = burst, now
elseif now > ts then  -- a clock stepping back refills nothing
  tokens, ts = math.min(burst, tokens + (now - ts) * rate), now
end
local allowed, retry = 0, 0
if tokens + rate * tonumber(ARGV[6]) >= cost then  -- ARGV[6]: TOKEN_SLACK_S
  tokens, allowed = tokens - cost, 1
else
  retry = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', num(tokens), 'ts', num(ts))
-- Untouched for burst/rate seconds, a bucket is full again: same as absent, so expire it.
local ttl = math.min(math.ceil(burst / rate * 1000) + 1000, tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl))
return {allowed, num(retry)}
"""
)

# KEYS[1] meter counter. ARGV: amount, limit, ttl_ms. The expiry is set on the first
# write only: the key names its window, and the window ends when it expires.
_SPEND = """
local amount, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if amount > 0 and n + amount > limit then return {0, n} end
if amount <= 0 and n == 0 then return {1, 0} end
local left = math.max(0, n + amount)
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[1], string.format('%d', left), 'KEEPTTL')
else
  redis.call('SET', KEYS[1], string.format('%d', left), 'PX', ARGV[3])
end
return {1, left}
"""

# KEYS[1] node hash {f: failures, n: times ejected, u: ejected until}
# ARGV: now, base_s, max_s, key ttl seconds
_EJECT = (
    _PRELUDE
    + """
local now = now_s(ARGV[1])
local base, maxs = tonumber(ARGV[2]), tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'n', 'u')
local n, u = tonumber(h[1]) or 0, tonumber(h[2]) or 0
redis.call('HDEL', KEYS[1], 'f')
if u > now then return num(u - now) end  -- already out: idempotent across replicas
if n > 0 and now - u >= maxs then n = 0 end  -- healthy long enough: forget history
local d = math.min(base * 2 ^ n, maxs)
redis.call('HSET', KEYS[1], 'n', string.format('%d', n + 1), 'u', num(now + d))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return num(d)
"""
)

# KEYS: node hashes; ARGV[1]: now. One reply per key: until, or '' when not ejected.
_EJECTED_UNTIL = (
    _PRELUDE
    + """
local now = now_s(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  local u = tonumber(redis.call('HGET', k, 'u'))
  if u ~= nil and u > now then out[i] = num(u) else out[i] = '' end
end
return out
"""
)

# KEYS[1] node hash; ARGV[1]: now. Ends the ejection but keeps the count 'n'.
_READMIT = (
    _PRELUDE
    + """
local now = now_s(ARGV[1])
local u = tonumber(redis.call('HGET', KEYS[1], 'u'))
redis.call('HDEL', KEYS[1], 'f')
if u ~= nil and u > now then redis.call('HSET', KEYS[1], 'u', num(now)) end
return 1
"""
)

# KEYS[1] nonce key; ARGV: now, ttl_s. The stored value is the expiry, checked against the
# same clock as everything else; PX only reclaims memory.
_NONCE = (
    _PRELUDE
    + """
local now = now_s(ARGV[1])
local ttl = tonumber(ARGV[2])
local e = tonumber(redis.call('GET', KEYS[1]))
if e ~= nil and e > now then return 0 end
redis.call('SET', KEYS[1], num(now + ttl), 'PX', string.format('%d', math.ceil(ttl * 1000)))
return 1
"""
)

# KEYS[1] zset member -> version it was added at; KEYS[2] version counter. ARGV[1] member.
_REVOKE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
local v = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], v, ARGV[1])
return v
"""

# Same keys; ARGV[1] version. Atomic, so the version and the entries agree.
_REVOKED_SINCE = """
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
return {v, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')}
"""

# KEYS[1] evidence hash {count fields..., s: statistic}; ARGV: step, then field, n pairs.
# The CUSUM step and the counts move together, floored at 0 (docs/reputation.md).
_EVIDENCE = (
    _PRELUDE
    + """
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
local s = (tonumber(redis.call('HGET', KEYS[1], 's')) or 0) + tonumber(ARGV[1])
if s < 0 then s = 0 end
redis.call('HSET', KEYS[1], 's', num(s))
return redis.call('HGETALL', KEYS[1])
"""
)

_MAX_BUCKET_TTL_MS = str(30 * 86400 * 1000)
_SLACK = repr(TOKEN_SLACK_S)


def _redact(url: str) -> str:
    """The URL without credentials, for error messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisStore:
    """`StateStore` on a Redis server shared by all gateway replicas.

    `url` is passed to redis-py unchanged: `redis://` or `rediss://` (TLS; `ssl_*` options
    may go in `redis_kwargs`), ACL user and password as `redis://user:pass@host:port/db`.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "ztgate:",
        *,
        timeout_s: float = 0.5,
        connect_timeout_s: float | None = None,
        clock: Clock | None = None,
        state_ttl_s: int = 86_400,
        redis_kwargs: dict[str, Any] | None = None,
    ) -> None:
        connect_timeout = timeout_s if connect_timeout_s is None else connect_timeout_s
        self._where = _redact(url)
        self._prefix = prefix
        self._clock = clock
        # Node state is dropped after a day without writes, so churned node ids do not
        # accumulate; it is kept at least long enough for ejection history to decay.
        self._state_ttl_s = state_ttl_s
        # The hard deadline backs up the socket timeouts (e.g. a TLS handshake that
        # trickles): one connect plus one read, and a little slack.
        self._deadline_s = connect_timeout + timeout_s + 0.25
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": connect_timeout,
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "ztgate",
        }
        kwargs.update(redis_kwargs or {})
        self._client: Redis = Redis.from_url(url, **kwargs)
        reg = self._client.register_script
        self._take_token = reg(_TAKE_TOKEN)
        self._eject = reg(_EJECT)
        self._ejected_until = reg(_EJECTED_UNTIL)
        self._readmit = reg(_READMIT)
        self._nonce = reg(_NONCE)
        self._revoke = reg(_REVOKE)
        self._revoked_since = reg(_REVOKED_SINCE)
        self._add_evidence = reg(_EVIDENCE)
        self._spend = reg(_SPEND)

    # -- plumbing -------------------------------------------------------------------
    async def _do(self, aw: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._deadline_s):
                return await aw
        except _UNAVAILABLE as e:
            if isinstance(e, RedisConnectionError):
                # The server went away: every pooled connection is as dead as this one, and
                # the first use of each after it comes back would fail again (readiness
                # would flap). Drop them all; the next call connects afresh.
                with contextlib.suppress(*_UNAVAILABLE):
                    await self._client.connection_pool.disconnect()
            raise StoreUnavailable(f"redis at {self._where}: {type(e).__name__}: {e}") from e

    def _now(self) -> str:
        return "-1" if self._clock is None else repr(float(self._clock()))

    def _node_key(self, node_id: str) -> str:
        return f"{self._prefix}node:{node_id}"

    # -- node health ----------------------------------------------------------------
    async def record_failure(self, node_id: str) -> int:
        key = self._node_key(node_id)
        pipe = self._client.pipeline(transaction=True)
        pipe.hincrby(key, "f", 1)
        pipe.expire(key, self._state_ttl_s)
        count, _ = await self._do(pipe.execute())
        return int(count)

    async def record_success(self, node_id: str) -> None:
        await self._do(self._client.hdel(self._node_key(node_id), "f"))

    async def eject(self, node_id: str, base_s: float, max_s: float) -> float:
        check_eject_args(base_s, max_s)
        ttl = max(self._state_ttl_s, math.ceil(2 * max_s) + 60)
        args = [self._now(), repr(float(base_s)), repr(float(max_s)), str(ttl)]
        out = await self._do(self._eject(keys=[self._node_key(node_id)], args=args))
        return float(out)

    async def ejected_until(self, node_ids: Iterable[str]) -> dict[str, float]:
        ids = list(dict.fromkeys(node_ids))  # dedupe, keep order
        if not ids:
            return {}
        keys = [self._node_key(n) for n in ids]
        out = await self._do(self._ejected_until(keys=keys, args=[self._now()]))
        return {n: float(u) for n, u in zip(ids, out, strict=True) if u != ""}

    async def readmit(self, node_id: str) -> None:
        await self._do(self._readmit(keys=[self._node_key(node_id)], args=[self._now()]))

    # -- rate limiting --------------------------------------------------------------
    async def take_token(
        self, key: str, rate_per_s: float, burst: int, cost: int = 1
    ) -> tuple[bool, float]:
        check_bucket_args(rate_per_s, burst, cost)
        rate = repr(float(rate_per_s))
        args = [self._now(), rate, str(burst), str(cost), _MAX_BUCKET_TTL_MS, _SLACK]
        allowed, retry = await self._do(
            self._take_token(keys=[f"{self._prefix}tb:{key}"], args=args)
        )
        return bool(allowed), float(retry)

    # -- token meters ---------------------------------------------------------------
    async def spend(self, key: str, amount: int, limit: int, ttl_s: float) -> tuple[bool, int]:
        check_spend_args(amount, limit, ttl_s)
        args = [str(int(amount)), str(int(limit)), str(max(1, math.ceil(ttl_s * 1000)))]
        ok, n = await self._do(self._spend(keys=[f"{self._prefix}meter:{key}"], args=args))
        return bool(int(ok)), int(n)

    # -- revocations ----------------------------------------------------------------
    def _revocation_keys(self) -> list[str]:
        return [f"{self._prefix}revoked", f"{self._prefix}revoked:version"]

    async def add_revocation(self, issuer: str, serial: str) -> int:
        # JSON, not "issuer|serial": no separator can be ambiguous.
        member = json.dumps([issuer, serial])
        out = await self._do(self._revoke(keys=self._revocation_keys(), args=[member]))
        return int(out)

    async def revocations_since(self, version: int) -> tuple[int, set[tuple[str, str]]]:
        keys = self._revocation_keys()
        current, members = await self._do(self._revoked_since(keys=keys, args=[int(version)]))
        entries: set[tuple[str, str]] = set()
        for m in members:
            issuer, serial = json.loads(m)
            entries.add((str(issuer), str(serial)))
        return int(current), entries

    # -- replay protection ----------------------------------------------------------
    async def check_nonce(self, key: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        args = [self._now(), repr(float(ttl_s))]
        out = await self._do(self._nonce(keys=[f"{self._prefix}nonce:{key}"], args=args))
        return bool(out)

    # -- receipt log directory -------------------------------------------------------
    async def publish_log(self, log_id: str, url: str) -> None:
        await self._do(self._client.hset(f"{self._prefix}logs", log_id, url))

    async def find_log(self, log_id: str) -> str | None:
        got = await self._do(self._client.hget(f"{self._prefix}logs", log_id))
        if got is None:
            return None
        return got.decode() if isinstance(got, bytes) else str(got)

    # -- lie accounting -------------------------------------------------------------
    def _evidence_key(self, subject: str) -> str:
        return f"{self._prefix}evidence:{subject}"

    @staticmethod
    def _parse_evidence(flat: list[Any]) -> tuple[dict[str, int], float]:
        pairs = dict(zip(flat[::2], flat[1::2], strict=True))
        stat = float(pairs.pop("s", 0.0))
        return {str(k): int(v) for k, v in pairs.items()}, stat

    async def add_evidence(
        self, subject: str, counts: Mapping[str, int], step: float
    ) -> tuple[dict[str, int], float]:
        args = [repr(float(step))]
        for k, n in counts.items():
            args += [k, str(int(n))]
        out = await self._do(self._add_evidence(keys=[self._evidence_key(subject)], args=args))
        return self._parse_evidence(list(out))

    async def evidence(self, subjects: Iterable[str]) -> dict[str, tuple[dict[str, int], float]]:
        names = list(dict.fromkeys(subjects))
        if not names:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(self._evidence_key(n))
        got = await self._do(pipe.execute())
        out: dict[str, tuple[dict[str, int], float]] = {}
        for n, h in zip(names, got, strict=True):
            if h:
                out[n] = self._parse_evidence([x for kv in h.items() for x in kv])
        return out

    async def reset_statistic(self, subject: str) -> None:
        key = self._evidence_key(subject)
        if await self._do(self._client.exists(key)):
            await self._do(self._client.hset(key, "s", "0"))

    async def put_quarantine(self, node_id: str, record: str) -> None:
        await self._do(self._client.hset(f"{self._prefix}quarantine", node_id, record))

    async def quarantine_records(self) -> dict[str, str]:
        got = await self._do(self._client.hgetall(f"{self._prefix}quarantine"))
        return {str(k): str(v) for k, v in got.items()}

    # -- lifecycle ------------------------------------------------------------------
    async def ping(self) -> bool:
        try:
            return bool(await self._do(self._client.ping()))
        except (StoreUnavailable, RedisError):
            return False

    async def close(self) -> None:
        await self._client.aclose()  # from_url clients own their pool: this closes it
