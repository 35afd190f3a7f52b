"""Jobs in the shared Redis, for replicas that share one (`state.redis_url`): any replica
takes a submit, answers a poll and runs a job.

Each change is one Lua script (atomic on the server, timed by the server's clock). A run
holds a lease (`LEASE_S`) that its runner renews while the run lasts; a replica that dies
mid-run stops renewing, and the job runs again on whichever replica claims it next, its
dispatches counted as on disk. Durability is Redis's: the 202 waits for the write to be
acknowledged, and survives a Redis crash only with `appendonly yes` and `appendfsync
always` (docs/jobs.md).

Keys, under `ztgate:jobs:`: `j:<id>` the job (a hash), `k:<sha256(owner, key)>` the
idempotency key, `o:<sha256(owner)>` an owner's open jobs, `a:<sha256(owner)>` all of
an owner's jobs (for an erasure by subject), `r:<receipt id>` the job of a receipt, and
the sorted sets `queued` (by next run), `running` (by lease end), `created` (open jobs
by age, the server's clock) and `finished` (by finish time). A job's own
`created` field is the gateway's sealed submit time (gateway/jobs/seal.py).

A run about to log its answer receipt first marks the job with its receipt log's id
(`mark_log`, `mark_at` by the server's clock; `marks`, every log ever marked): replicas
keep separate logs, so only the marked log's replica can find that receipt again. A claim
leaves a job marked for another replica's log to it until the mark is `adopt_after_s`
old (docs/jobs.md, "Replicas sharing Redis").

Redis keeps what it deletes in its AOF and RDB files until they are rewritten
(docs/jobs.md): an erased job's bytes leave the disk only then.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.jobs.model import (
    PROBLEM_HEADERS,
    Conflict,
    Full,
    JobRow,
    MacFor,
    NewJob,
    Outcome,
    Submitted,
)
from gateway.state import StoreUnavailable

__all__ = ["CLAIM_SCAN", "LEASE_S", "RedisJobStore"]

T = TypeVar("T")
PREFIX = "ztgate:jobs:"
LEASE_S = 30.0  # a run's lease (`jobs.lease_s`); renewed every third of it while it runs
# Jobs a claim may pass over (marked for another replica's log) beyond those it takes: a
# dead replica leaves at most `jobs.workers` such runs behind.
CLAIM_SCAN = 64
PURGE_BATCH = 1000  # jobs one expiry pass looks at, per kind
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TimeoutError, OSError)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local P = ARGV[1]
"""

# Removes a job and everything that points at it.
_DROP = """
local function drop(id)
  local h = P .. 'j:' .. id
  local f = redis.call('HMGET', h, 'kkey', 'okey', 'receipt_id', 'akey')
  if f[1] then redis.call('DEL', f[1]) end
  if f[2] then redis.call('SREM', f[2], id) end
  if f[3] then redis.call('DEL', P .. 'r:' .. f[3]) end
  if f[4] then redis.call('SREM', f[4], id) end
  redis.call('DEL', h)
  for _, z in ipairs({'queued', 'running', 'created', 'finished'}) do
    redis.call('ZREM', P .. z, id)
  end
end
"""

# ARGV: prefix, id, owner, kkey, okey, digest, route, model, cert, headers, body,
# per_identity, total, mac, created (the gateway's, sealed), akey
_SUBMIT = (
    _NOW
    + """
local id, kkey, okey = ARGV[2], ARGV[4], ARGV[5]
local found = redis.call('GET', kkey)
if found then
  local digest = redis.call('HGET', P .. 'j:' .. found, 'digest')
  if digest == ARGV[6] then return {'same', found} end
  if digest then return {'conflict', found} end
  redis.call('DEL', kkey)  -- its job is gone (purged): the key is free again
end
if redis.call('SCARD', okey) >= tonumber(ARGV[12]) then return {'full', 'identity'} end
if redis.call('ZCARD', P .. 'created') >= tonumber(ARGV[13]) then return {'full', 'replica'} end
redis.call('HSET', P .. 'j:' .. id, 'id', id, 'owner', ARGV[3], 'kkey', kkey, 'okey', okey,
  'digest', ARGV[6], 'route', ARGV[7], 'model', ARGV[8], 'cert', ARGV[9], 'headers', ARGV[10],
  'body', ARGV[11], 'state', 'queued', 'created', ARGV[15], 'updated', now, 'attempts', 0,
  'executions', 0, 'mac', ARGV[14], 'akey', ARGV[16])
redis.call('SET', kkey, id)
redis.call('SADD', okey, id)
redis.call('SADD', ARGV[16], id)
redis.call('ZADD', P .. 'queued', now, id)
redis.call('ZADD', P .. 'created', now, id)
return {'new', id}
"""
)

# ARGV: prefix, limit, lease_s, adopt_after_s, this replica's log ids (space-separated),
# scan. Due queued jobs, then runs whose lease ran out; of each, at most `scan` more are
# looked at than taken, past jobs left to the replica their mark names.
_CLAIM = (
    _NOW
    + """
local limit, adopt, scan = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[6])
local mine = ' ' .. ARGV[5] .. ' '
local ids = {}
local function take(z)
  if #ids >= limit then return end
  local due = redis.call('ZRANGEBYSCORE', P .. z, '-inf', now, 'LIMIT', 0, limit - #ids + scan)
  for _, id in ipairs(due) do
    if #ids >= limit then return end
    local m = redis.call('HMGET', P .. 'j:' .. id, 'mark_log', 'mark_at')
    if not m[1] or string.find(mine, ' ' .. m[1] .. ' ', 1, true) or
        now - (tonumber(m[2]) or 0) >= adopt then
      table.insert(ids, id)
    end
  end
end
take('queued')
take('running')
for _, id in ipairs(ids) do
  local h = P .. 'j:' .. id
  redis.call('ZREM', P .. 'queued', id)
  redis.call('ZADD', P .. 'running', now + tonumber(ARGV[3]), id)
  redis.call('HINCRBY', h, 'attempts', 1)
  redis.call('HINCRBY', h, 'executions', 1)
  redis.call('HSET', h, 'state', 'running', 'updated', now)
end
return ids
"""
)

# ARGV: prefix, id, lease_s
_RENEW = (
    _NOW
    + """
if redis.call('ZSCORE', P .. 'running', ARGV[2]) then
  redis.call('ZADD', P .. 'running', now + tonumber(ARGV[3]), ARGV[2])
end
return 1
"""
)

# A run's fence: the job's `executions` when the run claimed it. A run whose lease lapsed
# and that another claim took over neither marks nor requeues the job.
_FENCE = """
local function fenced(id, run)
  if not redis.call('ZSCORE', P .. 'running', id) then return true end
  return tonumber(redis.call('HGET', P .. 'j:' .. id, 'executions')) ~= tonumber(run)
end
"""

# ARGV: prefix, id, log id, run. Over a running job only, as that run (else nil): the log
# its receipt goes to, now; returns every log it was marked for.
_MARK = (
    _NOW
    + _FENCE
    + """
local id, log = ARGV[2], ARGV[3]
if fenced(id, ARGV[4]) then return false end
local h = P .. 'j:' .. id
local marks = redis.call('HGET', h, 'marks') or ''
if not string.find(' ' .. marks .. ' ', ' ' .. log .. ' ', 1, true) then
  marks = marks == '' and log or marks .. ' ' .. log
end
redis.call('HSET', h, 'mark_log', log, 'mark_at', now, 'marks', marks)
return marks
"""
)

# ARGV: prefix, id, delay_s, run
_RETRY = (
    _NOW
    + _FENCE
    + """
local id = ARGV[2]
if fenced(id, ARGV[4]) then return 0 end
redis.call('ZREM', P .. 'running', id)
redis.call('ZADD', P .. 'queued', now + tonumber(ARGV[3]), id)
redis.call('HSET', P .. 'j:' .. id, 'state', 'queued', 'updated', now)
return 1
"""
)

# The one result: over a running job only. ARGV: prefix, id, state, status, headers,
# result, receipt_id ('' for none), mac (the answer's seal)
_FINISH = (
    _NOW
    + """
local id = ARGV[2]
if not redis.call('ZSCORE', P .. 'running', id) then return 0 end
local h = P .. 'j:' .. id
redis.call('ZREM', P .. 'running', id)
redis.call('ZREM', P .. 'created', id)
redis.call('SREM', redis.call('HGET', h, 'okey'), id)
redis.call('HDEL', h, 'cert', 'headers', 'body')
redis.call('HSET', h, 'state', ARGV[3], 'status', ARGV[4], 'result_headers', ARGV[5],
  'result', ARGV[6], 'updated', now, 'mac', ARGV[8])
if ARGV[7] ~= '' then
  redis.call('HSET', h, 'receipt_id', ARGV[7])
  redis.call('SET', P .. 'r:' .. ARGV[7], id)
end
redis.call('ZADD', P .. 'finished', now, id)
return 1
"""
)

# ARGV: prefix, max_age_s, result_ttl_s, problem headers, problem body, batch, then
# (id, the seal of its expiry) pairs: the old jobs the caller read (`_OLD`) and sealed.
_OLD = """
local now = tonumber(redis.call('TIME')[1])
return redis.call('ZRANGEBYSCORE', ARGV[1] .. 'created', '-inf', now - tonumber(ARGV[2]),
  'LIMIT', 0, tonumber(ARGV[3]))
"""
_EXPIRE = (
    _NOW
    + _DROP
    + """
local batch = tonumber(ARGV[6])
local expired, deleted = 0, 0
for i = 7, #ARGV - 1, 2 do
  local id = ARGV[i]
  local born = redis.call('ZSCORE', P .. 'created', id)
  -- a running job finishes first
  if born and tonumber(born) < now - tonumber(ARGV[2]) and
      redis.call('ZSCORE', P .. 'queued', id) then
    local h = P .. 'j:' .. id
    redis.call('ZREM', P .. 'queued', id)
    redis.call('ZREM', P .. 'created', id)
    redis.call('SREM', redis.call('HGET', h, 'okey'), id)
    redis.call('HDEL', h, 'cert', 'headers', 'body')
    redis.call('HSET', h, 'state', 'failed', 'status', 504, 'result_headers', ARGV[4],
      'result', ARGV[5], 'updated', now, 'mac', ARGV[i + 1])
    redis.call('ZADD', P .. 'finished', now, id)
    expired = expired + 1
  end
end
local done = redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', now - tonumber(ARGV[3]),
  'LIMIT', 0, batch)
for _, id in ipairs(done) do
  drop(id)
  deleted = deleted + 1
end
return {expired, deleted}
"""
)

# ARGV: prefix, receipt ids...
_ERASE = (
    _NOW
    + _DROP
    + """
local n = 0
for i = 2, #ARGV do
  local id = redis.call('GET', P .. 'r:' .. ARGV[i])
  if id then drop(id); n = n + 1 end
end
return n
"""
)

# ARGV: prefix, job ids...
_ERASE_JOBS = (
    _NOW
    + _DROP
    + """
local n = 0
for i = 2, #ARGV do
  if redis.call('EXISTS', P .. 'j:' .. ARGV[i]) == 1 then drop(ARGV[i]); n = n + 1 end
end
return n
"""
)

# ARGV: prefix, akey, okey, batch. Up to `batch` of one owner's jobs (all, and open ones
# submitted before the `a:` set existed); the caller repeats until none are left.
_ERASE_OWNER = (
    _NOW
    + _DROP
    + """
local seen, n = 0, 0
for _, key in ipairs({ARGV[2], ARGV[3]}) do
  for _, id in ipairs(redis.call('SRANDMEMBER', key, tonumber(ARGV[4]))) do
    if redis.call('EXISTS', P .. 'j:' .. id) == 1 then n = n + 1 end
    drop(id)
    redis.call('SREM', key, id)
    seen = seen + 1
  end
end
return {seen, n}
"""
)


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _s(raw: dict[bytes, bytes], key: str) -> str | None:
    v = raw.get(key.encode())
    return None if v is None else v.decode()


def _row(raw: dict[bytes, bytes]) -> JobRow:
    def num(key: str) -> float:
        return float(_s(raw, key) or 0)

    status = _s(raw, "status")
    return JobRow(
        id=_s(raw, "id") or "",
        owner=_s(raw, "owner") or "",
        route=_s(raw, "route") or "",
        model=_s(raw, "model") or "",
        cert=_s(raw, "cert"),
        headers=json.loads(_s(raw, "headers") or "{}"),
        body=raw.get(b"body"),
        state=_s(raw, "state") or "",
        created=num("created"),
        updated=num("updated"),
        attempts=int(num("attempts")),
        executions=int(num("executions")),
        status=None if status is None else int(float(status)),
        result_headers=json.loads(_s(raw, "result_headers") or "{}"),
        result=raw.get(b"result"),
        receipt_id=_s(raw, "receipt_id"),
        mac=_s(raw, "mac"),
    )


class RedisJobStore:
    """`JobBackend` on Redis. Every call has a deadline; no answer is `StoreUnavailable`
    (the API's 503 state-unavailable; the runner tries again)."""

    lease_s: float | None = LEASE_S

    def __init__(
        self, url: str, *, timeout_s: float = 0.5, prefix: str = PREFIX, lease_s: float = LEASE_S
    ) -> None:
        self.prefix = prefix
        self.lease_s = self._lease_s = lease_s
        # Bodies and results are bytes: no decoding here (the state store decodes).
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # a script re-sent after a timeout could apply twice
            client_name="ztgate-jobs",
        )
        self._deadline_s = 2 * timeout_s + 0.25
        reg = self._client.register_script
        self._submit = reg(_SUBMIT)
        self._claim = reg(_CLAIM)
        self._renew = reg(_RENEW)
        self._mark = reg(_MARK)
        self._retry = reg(_RETRY)
        self._finish = reg(_FINISH)
        self._expire = reg(_EXPIRE)
        self._erase = reg(_ERASE)
        self._erase_owner = reg(_ERASE_OWNER)
        self._erase_jobs = reg(_ERASE_JOBS)
        self._old = reg(_OLD)

    async def _call(self, aw: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._deadline_s):
                return await aw
        except _UNAVAILABLE as exc:
            raise StoreUnavailable("the job store (Redis) did not answer") from exc

    async def submit(self, job: NewJob, per_identity: int, total: int) -> Submitted:
        p, owner = self.prefix, job.owner
        args: list[Any] = [p, job.id, owner, p + "k:" + _sha(owner, job.key)]
        args += [p + "o:" + _sha(owner), job.digest, job.route, job.model, job.cert]
        args += [json.dumps(job.headers), job.body, per_identity, total, job.mac]
        args += [repr(float(job.created)), p + "a:" + _sha(owner)]
        what, arg = await self._call(self._submit(args=args))
        what, arg = what.decode(), arg.decode()
        if what == "conflict":
            raise Conflict(arg)
        if what == "full":
            raise Full(arg)
        return Submitted(arg, what == "new")

    async def get(self, job_id: str) -> JobRow | None:
        raw: dict[bytes, bytes] = await self._call(
            self._client.hgetall(self.prefix + "j:" + job_id)  # type: ignore[arg-type]
        )
        return _row(raw) if raw else None

    async def requeue_running(self) -> int:
        return 0  # leases bring back what a dead replica was running

    async def claim(
        self, limit: int, logs: Sequence[str] = (), adopt_after_s: float = 0.0
    ) -> list[JobRow]:
        args: list[Any] = [self.prefix, limit, self._lease_s, adopt_after_s, " ".join(logs)]
        args.append(CLAIM_SCAN)
        ids = await self._call(self._claim(args=args))
        rows = [await self.get(i.decode()) for i in ids]
        return [r for r in rows if r is not None]

    async def mark(self, job_id: str, log_id: str, run: int) -> tuple[str, ...] | None:
        marks = await self._call(self._mark(args=[self.prefix, job_id, log_id, run]))
        return None if marks is None else tuple(marks.decode().split())

    async def renew(self, job_id: str) -> None:
        await self._call(self._renew(args=[self.prefix, job_id, self._lease_s]))

    async def retry(self, job_id: str, delay_s: float, run: int) -> None:
        await self._call(self._retry(args=[self.prefix, job_id, delay_s, run]))

    async def finish(self, job_id: str, out: Outcome) -> bool:
        args: list[Any] = [self.prefix, job_id, out.state, out.status, json.dumps(out.headers)]
        args += [out.result, out.receipt_id or "", out.mac]
        return bool(await self._call(self._finish(args=args)))

    async def expire(
        self, max_age_s: float, result_ttl_s: float, result: bytes, mac_for: MacFor
    ) -> tuple[int, int]:
        # The seal needs the key, which Redis never sees: read the old ids, seal each
        # one's expiry here, and let the script expire those still queued and old.
        old = await self._call(self._old(args=[self.prefix, max_age_s, PURGE_BATCH]))
        args: list[Any] = [self.prefix, max_age_s, result_ttl_s, PROBLEM_HEADERS, result]
        args.append(PURGE_BATCH)
        for raw in old:
            job_id = raw.decode()
            args += [job_id, mac_for(job_id)]
        expired, deleted = await self._call(self._expire(args=args))
        return int(expired), int(deleted)

    async def erase_receipts(self, receipt_ids: list[str]) -> int:
        return int(await self._call(self._erase(args=[self.prefix, *receipt_ids])))

    async def erase_jobs(self, job_ids: Sequence[str]) -> int:
        """Delete these jobs, whatever their state (the jobs an erased receipt named)."""
        return int(await self._call(self._erase_jobs(args=[self.prefix, *job_ids])))

    async def erase_owner(self, owner: str) -> int:
        """Delete every job of one client, queued ones too (`ztgate audit erase --subject`)."""
        p, n = self.prefix, 0
        while True:
            args: list[Any] = [p, p + "a:" + _sha(owner), p + "o:" + _sha(owner), PURGE_BATCH]
            seen, erased = await self._call(self._erase_owner(args=args))
            n += int(erased)
            if int(seen) == 0:
                return n

    async def close(self) -> None:
        await self._client.aclose()
