"""gateway.state: both stores held to one contract, plus Redis sharing and failure modes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.state import StateStore, StoreUnavailable
from gateway.state.durable import FileRevocations, RevocationFileError
from gateway.state.factory import REVOCATIONS_FILE, open_store
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def _prefix() -> str:
    # One Redis serves the whole session: a fresh prefix isolates each test.
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# Function loop scope, like the tests: a RedisStore's connections belong to the loop that
# opened them, and the config would otherwise put async fixtures on the session loop.
@pytest_asyncio.fixture(params=["memory", "redis"], loop_scope="function")
async def store(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[StateStore]:
    s: StateStore
    if request.param == "memory":
        s = MemoryStore(revocations_path=tmp_path / "rev.jsonl", clock=clock)
    else:
        url = request.getfixturevalue("redis_server")
        s = RedisStore(url, prefix=_prefix(), clock=clock)
    try:
        yield s
    finally:
        await s.close()


# -- contract: both stores ------------------------------------------------------------


async def test_satisfies_protocol(store: StateStore) -> None:
    assert isinstance(store, StateStore)
    assert await store.ping()


async def test_failure_counting(store: StateStore) -> None:
    assert [await store.record_failure("a") for _ in range(3)] == [1, 2, 3]
    assert await store.record_failure("b") == 1  # per node
    await store.record_success("a")
    assert await store.record_failure("a") == 1
    await store.record_success("never-seen")  # no error


async def test_eject_grows_and_caps(store: StateStore, clock: FakeClock) -> None:
    durations = []
    for _ in range(5):
        d = await store.eject("n", base_s=1.0, max_s=5.0)
        durations.append(d)
        assert await store.ejected_until(["n", "other"]) == {"n": pytest.approx(clock.t + d)}
        clock.advance(d)  # ejection over, but re-ejected before max_s of good health
        assert await store.ejected_until(["n"]) == {}
    assert durations == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])


async def test_eject_is_idempotent_while_ejected(store: StateStore, clock: FakeClock) -> None:
    await store.record_failure("n")
    assert await store.eject("n", 2.0, 60.0) == pytest.approx(2.0)
    assert await store.record_failure("n") == 1  # ejecting reset the count
    clock.advance(0.5)
    # A second replica ejecting the same node neither extends nor escalates it.
    assert await store.eject("n", 2.0, 60.0) == pytest.approx(1.5)
    clock.advance(1.5)
    assert await store.eject("n", 2.0, 60.0) == pytest.approx(4.0)


async def test_ejection_history_decays(store: StateStore, clock: FakeClock) -> None:
    for d in (1.0, 2.0):
        assert await store.eject("n", 1.0, 10.0) == pytest.approx(d)
        clock.advance(d)
    clock.advance(10.0)  # admitted for max_s: forgiven
    assert await store.eject("n", 1.0, 10.0) == pytest.approx(1.0)


async def test_readmit_ends_ejection_but_keeps_backoff(store: StateStore, clock: FakeClock) -> None:
    assert await store.eject("n", 1.0, 100.0) == pytest.approx(1.0)
    assert await store.ejected_until(["n"]) == {"n": pytest.approx(clock.t + 1.0)}
    await store.readmit("n")
    assert await store.ejected_until(["n"]) == {}
    assert await store.eject("n", 1.0, 100.0) == pytest.approx(2.0)
    # Readmitting a node never ejected is a no-op: it leaves no history behind, so its
    # first ejection is still the base one.
    await store.readmit("never-seen")
    assert await store.ejected_until(["never-seen"]) == {}
    assert await store.eject("never-seen", 1.0, 100.0) == pytest.approx(1.0)


async def test_eject_rejects_bad_args(store: StateStore) -> None:
    with pytest.raises(ValueError, match="need 0 < base_s <= max_s"):
        await store.eject("n", 0.0, 1.0)
    with pytest.raises(ValueError, match="need 0 < base_s <= max_s"):
        await store.eject("n", 2.0, 1.0)
    # Control: the same call with sound arguments ejects, and nothing was ejected before.
    assert await store.ejected_until(["n"]) == {}
    assert await store.eject("n", 1.0, 2.0) == pytest.approx(1.0)


async def test_token_bucket_refill_and_retry_after(store: StateStore, clock: FakeClock) -> None:
    take = store.take_token
    assert [await take("k", 2.0, 3) for _ in range(3)] == [(True, 0.0)] * 3
    ok, retry = await take("k", 2.0, 3)
    assert not ok and retry == pytest.approx(0.5)
    clock.advance(0.25)
    ok, retry = await take("k", 2.0, 3)
    assert not ok and retry == pytest.approx(0.25)
    clock.advance(0.25)
    assert await take("k", 2.0, 3) == (True, 0.0)
    # Refill is capped at burst however long the bucket idles.
    clock.advance(1000.0)
    assert sum([(await take("k", 2.0, 3))[0] for _ in range(10)]) == 3
    # Buckets are independent; cost takes several tokens at once.
    assert await take("other", 2.0, 3, cost=3) == (True, 0.0)
    ok, retry = await take("other", 2.0, 3, cost=2)
    assert not ok and retry == pytest.approx(1.0)


async def test_token_bucket_clock_stepping_back(store: StateStore, clock: FakeClock) -> None:
    assert (await store.take_token("k", 1.0, 1))[0]
    clock.advance(-50.0)  # e.g. NTP step: must not refill, must not go negative
    ok, retry = await store.take_token("k", 1.0, 1)
    assert not ok and retry == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("rate", "burst", "cost", "needle"),
    [
        (0.0, 1, 1, "rate_per_s must be > 0"),
        (float("nan"), 1, 1, "rate_per_s must be > 0"),
        (1.0, 0, 1, "burst must be >= 1"),
        (1.0, 2, 3, r"cost must be in \[1, burst=2\]"),
    ],
)
async def test_token_bucket_rejects_bad_args(
    store: StateStore, rate: float, burst: int, cost: int, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        await store.take_token("k", rate, burst, cost)
    # Control: the bucket the refused call named is untouched and admits a sound call.
    assert await store.take_token("k", 1.0, 1) == (True, 0.0)


async def test_revocations_grow_only_and_versioned(store: StateStore) -> None:
    assert await store.revocations_since(0) == (0, set())
    assert await store.add_revocation("ca-1", "01") == 1
    assert await store.add_revocation("ca-1", "02") == 2
    assert await store.add_revocation("ca-1", "01") == 2  # re-adding is a no-op
    # No separator games: these are two different entries.
    assert await store.add_revocation("a|b", "c") == 3
    assert await store.add_revocation("a", "b|c") == 4
    everything = {("ca-1", "01"), ("ca-1", "02"), ("a|b", "c"), ("a", "b|c")}
    assert await store.revocations_since(0) == (4, everything)
    assert await store.revocations_since(2) == (4, {("a|b", "c"), ("a", "b|c")})
    assert await store.revocations_since(4) == (4, set())
    # A caller ahead of the store (store was reset) sees a lower version and nothing new.
    assert await store.revocations_since(99) == (4, set())


async def test_nonce_replay(store: StateStore, clock: FakeClock) -> None:
    assert await store.check_nonce("n1", 60.0)
    assert not await store.check_nonce("n1", 60.0)
    assert await store.check_nonce("n2", 60.0)
    clock.advance(59.9)
    assert not await store.check_nonce("n1", 60.0)
    clock.advance(0.2)
    assert await store.check_nonce("n1", 60.0)  # expired: a new first sighting
    assert not await store.check_nonce("n1", 60.0)
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        await store.check_nonce("n3", 0.0)
    assert await store.check_nonce("n3", 1.0)  # control: n3 was not consumed by the refusal


# -- Redis: sharing between replicas -----------------------------------------------------


async def _admitted(stores: list[StateStore], key: str, calls: int, burst: int) -> int:
    results = await asyncio.gather(
        *(stores[i % len(stores)].take_token(key, 1.0, burst) for i in range(calls))
    )
    return sum(ok for ok, _ in results)


def _check_joint_limit(admitted: int, burst: int) -> None:
    # The replicas share one stopped clock, so nothing refills: exactly `burst` admitted.
    # A deny-all store (0) or two stores that do not share state (2 * burst) fail.
    assert admitted == burst, f"admitted {admitted}, burst {burst}"


async def test_two_replicas_enforce_one_bucket(redis_server: str, clock: FakeClock) -> None:
    prefix = _prefix()
    replicas: list[StateStore] = [
        RedisStore(redis_server, prefix=prefix, timeout_s=5.0, clock=clock) for _ in range(2)
    ]
    try:
        _check_joint_limit(await _admitted(replicas, "shared", 200, burst=10), burst=10)
        # Control: time moving on refills the one shared bucket, seen by both replicas.
        clock.advance(3.0)
        assert await _admitted(replicas, "shared", 10, burst=10) == 3
    finally:
        for r in replicas:
            await r.close()


class _DenyAll(MemoryStore):
    """Stand-in: a store that refuses everything, a fault no real store can be made to
    show on demand; it proves the joint-limit check can fail."""

    async def take_token(
        self, key: str, rate_per_s: float, burst: int, cost: int = 1
    ) -> tuple[bool, float]:
        return False, 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda clock: [_DenyAll(clock=clock), _DenyAll(clock=clock)],
        lambda clock: [MemoryStore(clock=clock), MemoryStore(clock=clock)],
    ],
    ids=["deny-all", "unshared"],
)
async def test_joint_limit_check_catches_broken_stores(
    make: Callable[[FakeClock], list[StateStore]], clock: FakeClock
) -> None:
    admitted = await _admitted(make(clock), "shared", 200, burst=10)
    with pytest.raises(AssertionError):
        _check_joint_limit(admitted, burst=10)


async def test_replicas_share_health_and_revocations(redis_server: str) -> None:
    prefix = _prefix()
    a, b = (
        RedisStore(redis_server, prefix=prefix, timeout_s=5.0),
        RedisStore(redis_server, prefix=prefix, timeout_s=5.0),
    )
    try:
        assert await a.record_failure("n") == 1
        assert await b.record_failure("n") == 2
        # No test clock: the server's TIME decides. This host runs the server, so its
        # clock brackets the ejection's start however slow the calls are; the 1 ms margin
        # is for float rounding only.
        before = time.time()
        d = await a.eject("n", 30.0, 300.0)
        until = (await b.ejected_until(["n"]))["n"]
        after = time.time()
        assert d == pytest.approx(30.0)
        assert before + d - 1e-3 <= until <= after + d + 1e-3, (before, until, after)
        assert await b.eject("n", 30.0, 300.0) <= d  # already out: not escalated
        await b.readmit("n")
        assert await a.ejected_until(["n"]) == {}
        assert await a.add_revocation("ca", "1") == 1
        assert await b.revocations_since(0) == (1, {("ca", "1")})
        assert await a.check_nonce("x", 5.0)
        assert not await b.check_nonce("x", 5.0)
    finally:
        await a.close()
        await b.close()


# -- Redis: failure modes ----------------------------------------------------------------
# How long each failure takes to surface is measured in bench/store_failures.py; here only
# what it is. A hung call is caught by the outer guard, which raises TimeoutError, never
# StoreUnavailable, so it fails the test instead of passing it.

_HANG_GUARD_S = 30.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _calls(store: StateStore) -> list[Callable[[], Awaitable[object]]]:
    """One call of each kind that talks to the store."""
    return [
        lambda: store.record_failure("n"),
        lambda: store.eject("n", 1.0, 2.0),
        lambda: store.take_token("k", 1.0, 1),
        lambda: store.revocations_since(0),
        lambda: store.check_nonce("x", 1.0),
    ]


async def _all_calls_unavailable(store: RedisStore, because: str) -> None:
    for call in _calls(store):
        with pytest.raises(StoreUnavailable, match=because):
            async with asyncio.timeout(_HANG_GUARD_S):
                await call()
    assert not await store.ping()


async def test_reachable_redis_answers_the_same_calls(redis_server: str) -> None:
    """Control for the two failure tests below: same calls, same timeouts, a live server."""
    store = RedisStore(redis_server, prefix=_prefix(), timeout_s=0.2)
    try:
        for call in _calls(store):
            async with asyncio.timeout(_HANG_GUARD_S):
                await call()
        assert await store.ping()
    finally:
        await store.close()


async def test_unreachable_redis_raises_store_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{_closed_port()}/0", timeout_s=0.2)
    try:
        await _all_calls_unavailable(store, because="ConnectionError")
    finally:
        await store.close()


async def test_silent_redis_times_out_instead_of_hanging() -> None:
    # Accepts connections and never answers: only timeouts can save the caller.
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        await _all_calls_unavailable(store, because="Timeout")
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


async def test_errors_do_not_leak_credentials() -> None:
    port = _closed_port()
    store = RedisStore(f"redis://alice:s3cret@127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        with pytest.raises(StoreUnavailable) as failed:
            await store.record_failure("n")
    finally:
        await store.close()
    message = str(failed.value)
    assert f"redis://127.0.0.1:{port}/0" in message  # the error does say where
    assert "s3cret" not in message and "alice" not in message


# -- durable revocations -----------------------------------------------------------------


def test_file_revocations_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rev.jsonl"
    rev = FileRevocations(path)
    assert rev.add("ca", "1") == 1
    assert rev.add("ca", "2") == 2
    assert rev.add("ca", "1") == 2
    rev.close()
    rev = FileRevocations(path)
    assert rev.since(0) == (2, {("ca", "1"), ("ca", "2")})
    assert rev.since(1) == (2, {("ca", "2")})
    rev.close()
    assert len(path.read_text().splitlines()) == 2  # the duplicate was never written


@pytest.mark.parametrize("tail", [b'{"issuer": "ca", "ser', b"\0\0\0\0", b"garbage\n"])
def test_file_revocations_tolerate_torn_last_line(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "rev.jsonl"
    rev = FileRevocations(path)
    rev.add("ca", "1")
    rev.close()
    with open(path, "ab") as f:
        f.write(tail)
    rev = FileRevocations(path)
    assert rev.since(0) == (1, {("ca", "1")})
    assert rev.add("ca", "2") == 2  # starts on a fresh line, not glued to the debris
    rev.close()
    rev = FileRevocations(path)
    assert rev.since(0) == (2, {("ca", "1"), ("ca", "2")})
    rev.close()


def test_file_revocations_keep_complete_entry_missing_newline(tmp_path: Path) -> None:
    path = tmp_path / "rev.jsonl"
    path.write_bytes(json.dumps({"issuer": "ca", "serial": "1"}).encode())
    rev = FileRevocations(path)
    assert rev.add("ca", "2") == 2
    rev.close()
    assert FileRevocations(path).since(0) == (2, {("ca", "1"), ("ca", "2")})


def test_file_revocations_refuse_corruption_mid_file(tmp_path: Path) -> None:
    path = tmp_path / "rev.jsonl"
    good = json.dumps({"issuer": "ca", "serial": "1"})
    path.write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(RevocationFileError, match="line 2"):
        FileRevocations(path)


def test_file_revocations_single_owner(tmp_path: Path) -> None:
    rev = FileRevocations(tmp_path / "rev.jsonl")
    with pytest.raises(RevocationFileError, match="in use"):
        FileRevocations(tmp_path / "rev.jsonl")
    rev.close()
    FileRevocations(tmp_path / "rev.jsonl").close()


async def test_memory_store_revocations_survive_restart(tmp_path: Path) -> None:
    store = open_store(None, tmp_path / "data")
    assert isinstance(store, MemoryStore)
    assert await store.add_revocation("ca", "1") == 1
    await store.close()
    store = open_store(None, tmp_path / "data")
    assert await store.revocations_since(0) == (1, {("ca", "1")})
    await store.close()
    assert (tmp_path / "data" / REVOCATIONS_FILE).exists()


async def test_open_store_picks_redis_for_a_url(redis_server: str, tmp_path: Path) -> None:
    store = open_store(redis_server, tmp_path)
    try:
        assert isinstance(store, RedisStore)
        assert await store.ping()
    finally:
        await store.close()


# -- memory: bounds ----------------------------------------------------------------------


async def test_memory_tables_are_bounded(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock, max_keys=3)
    for i in range(10):
        await store.take_token(f"k{i}", 1.0, 1)
        await store.record_failure(f"n{i}")
    assert len(store._buckets) == 3 and len(store._nodes) == 3
    for i in range(3):
        assert await store.check_nonce(f"x{i}", 10.0)
    # Full of live nonces: refuse rather than evict one (that would allow its replay).
    with pytest.raises(StoreUnavailable):
        await store.check_nonce("x3", 10.0)
    clock.advance(10.0)
    assert await store.check_nonce("x3", 10.0)
    assert len(store._nonces) == 1


# -- token bucket property (memory, exact clock) -----------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(0.1, 100.0),
    burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(1, 20)), max_size=40),
)
def test_token_bucket_never_exceeds_rate(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)

    async def run() -> None:
        spent, elapsed = 0, 0.0
        for dt, cost in steps:
            cost = min(cost, burst)
            clock.advance(dt)
            elapsed += dt
            ok, retry = await store.take_token("k", rate, burst, cost)
            if ok:
                spent += cost
                assert retry == 0.0
            else:
                # Waiting exactly retry_after admits the same request.
                assert retry > 0
                clock.advance(retry)
                elapsed += retry
                assert (await store.take_token("k", rate, burst, cost))[0]
                spent += cost
            assert spent <= burst + rate * elapsed + 1e-3

    asyncio.run(run())


async def test_a_store_that_lost_its_revocations_gets_them_back(
    redis_server: str, tmp_path: Path
) -> None:
    """Redis restarted empty (a wipe here, FLUSHDB being what an unpersisted restart does to
    these keys): the replica that knows a revocation publishes it again at its next sync, so
    a replica that never saw it, or starts afterwards, still learns it."""
    import redis.asyncio as aioredis

    from gateway.revocation import Revocations

    prefix = _prefix()
    stores = [RedisStore(redis_server, prefix=prefix, timeout_s=5.0) for _ in range(3)]
    a = Revocations(stores[0], tmp_path / "a.jsonl")
    raw = aioredis.from_url(redis_server)
    try:
        assert await a.sync() == 0
        await a.revoke("ca", "AB")
        await raw.delete(*[k async for k in raw.scan_iter(f"{prefix}*")])
        # Control: the wipe really lost it; a fresh replica syncing now learns nothing.
        fresh = Revocations(stores[1], tmp_path / "b.jsonl")
        assert await fresh.sync() == 0 and not fresh.revoked("ca", "ab")
        await a.sync()  # sees the store went backwards, and gives it back
        late = Revocations(stores[2], tmp_path / "c.jsonl")
        assert await late.sync() == 1 and late.revoked("ca", "ab")
        assert await fresh.sync() == 1 and fresh.revoked("ca", "ab")
        for r in (a, fresh, late):
            r.close()
    finally:
        await raw.aclose()
        for s in stores:
            await s.close()
