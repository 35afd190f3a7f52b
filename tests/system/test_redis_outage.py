"""Scenario: the shared Redis SIGKILLed under load and brought back, as clients see it
(issue 13, item 8), in the production deployment: two replicas, the customer's PKI, the
TLS + ACL redis-server of tests/system/cluster.py.

One client loop per replica sends `shop`'s plain (`none`) iris inferences and, every few
requests, one from `mallory` (not in the officer's identities: a 403 and a denial
receipt). Part-way through, the suite's redis-server is SIGKILLed; later it is started
again with the same command line (same port, certificate, ACL user and password, and,
since nothing is ever saved, empty). What must hold:

* sent and answered while Redis is down: 503 `state-unavailable` with Retry-After, never
  `no-healthy-node` (the nodes are fine); no body or header a client sees names Redis,
  its host:port, its URL or its ACL credentials;
* during the outage both replicas' admin `/readyz`, admin `/v2/health/ready` and API
  `/v2/health/ready` say not ready, every time they are asked; after the restart all say
  ready again, and the replicas (the same processes: no restart) answer 200s again;
* every 200 has its answer receipt in its replica's log, and every refusal names, in its
  `ztgate-receipt` header, a denial receipt of the same problem type (both read back with
  `GET /v2/receipts/{id}` as the auditor); the coalesced denial runs in each replica's
  exported log add up to exactly the refusals each caller saw there.

Positive control: the same loop, before the kill, gets only 200s (and 403s for mallory).
Redis is restored in a `finally`, and both replicas are ready again, before the next
scenario of the package runs on this cluster.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.protocol.problems import PROBLEM_BASE
from tests.system.cluster import ProductionCluster, RedisServer, Replica
from tests.system.figures import say
from tests.system.traffic import Call, receipt_from_header

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

STATE_UNAVAILABLE = PROBLEM_BASE + "state-unavailable"
NO_HEALTHY_NODE = PROBLEM_BASE + "no-healthy-node"
FORBIDDEN_CALLER = "mallory"  # in the customer's PKI, not in the officer's identities
PER_PHASE = 8  # answers per replica (shop's) that each phase must see, at least
MALLORY_EVERY = 4  # every 4th request of a loop is mallory's
# Between two requests of one loop: two loops keep `shop` well under its 600/minute.
PACE_S = 0.25
# Hang guards only (a shared 2-core machine may be slow); nothing asserts on a duration.
HANG_GUARD_S = 120.0
COALESCE_GUARD_S = 90.0  # denial runs close 10 s after they open; the rest is slack


@dataclass(frozen=True)
class Answer:
    replica: int
    caller: str
    phase: str  # the phase when the request was sent
    ended: str  # the phase when its answer came back
    status: int  # 0: no HTTP answer at all
    type: str | None  # problem type, for refusals
    text: str  # body and every header: all a client sees
    receipt_id: str | None  # 200: the body's ztgate.receipt_id; else the header's id
    header: str | None  # the ztgate-receipt header
    retry_after: str | None

    @property
    def steady(self) -> bool:
        """Sent and answered within one phase."""
        return self.phase == self.ended


class Load:
    """One loop per replica, each in its own thread with its own mTLS clients."""

    def __init__(self, cluster: ProductionCluster) -> None:
        self.cluster = cluster
        self.phase = "before"
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.body = Call("shop", "iris", "none", 0, 200).body()
        self.errors: list[BaseException] = []  # a loop that died: the waits report it
        # Made here, one after the other: the customer PKI writes a caller's certificate
        # and key the first time it is asked, and two threads asking at once can leave a
        # certificate with the other one's key (KEY_VALUES_MISMATCH for every later test).
        self.clients = [
            {n: cluster.client(n, timeout=30) for n in ("shop", FORBIDDEN_CALLER)}
            for _ in cluster.replicas
        ]
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True)
            for i in range(len(cluster.replicas))
        ]

    def _loop(self, i: int) -> None:
        url = f"{self.cluster.replicas[i].base}/v2/models/iris/infer"
        clients = self.clients[i]
        try:
            k = 0
            while not self.stopping.is_set():
                caller = FORBIDDEN_CALLER if k % MALLORY_EVERY == MALLORY_EVERY - 1 else "shop"
                k += 1
                self._record(i, caller, url, clients[caller])
                self.stopping.wait(PACE_S)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            for c in clients.values():
                c.close()

    def _record(self, i: int, caller: str, url: str, client: httpx.Client) -> None:
        phase = self.phase
        try:
            r = client.post(url, json=self.body)
        except httpx.HTTPError as exc:  # recorded: the assertions say no request may end so
            answer = Answer(i, caller, phase, self.phase, 0, None, repr(exc), None, None, None)
        else:
            try:
                doc = r.json()
            except ValueError:
                doc = {}
            header = r.headers.get("ztgate-receipt")
            rid, _ = receipt_from_header(header)
            if r.status_code == 200:
                rid = doc.get("parameters", {}).get("ztgate.receipt_id")
            answer = Answer(
                i,
                caller,
                phase,
                self.phase,
                r.status_code,
                doc.get("type") if r.status_code != 200 else None,
                r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items()),
                rid,
                header,
                r.headers.get("retry-after"),
            )
        with self.lock:
            self.answers.append(answer)

    def count(self, phase: str, replica: int, caller: str = "shop") -> int:
        with self.lock:
            return sum(
                1
                for a in self.answers
                if a.steady and a.phase == phase and a.replica == replica and a.caller == caller
            )

    def enough(self, phase: str, replica: int) -> bool:
        assert not self.errors, f"a client loop died: {self.errors!r}"
        return (
            self.count(phase, replica) >= PER_PHASE
            and self.count(phase, replica, FORBIDDEN_CALLER) >= 1
        )

    def wait(self, phase: str) -> None:
        """Until every replica's loop has PER_PHASE of shop's and one of mallory's answers
        sent and answered within `phase`."""
        for i in range(len(self.cluster.replicas)):
            wait_for(partial(self.enough, phase, i), f"answers in phase {phase!r} on {i}")

    def snapshot(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=HANG_GUARD_S)
        assert not any(t.is_alive() for t in self.threads), "a client loop hangs"
        assert not self.errors, f"a client loop died: {self.errors!r}"


def wait_for(cond: Callable[[], object], what: str, guard_s: float = HANG_GUARD_S) -> float:
    """Poll `cond` until true; seconds it took. A hang guard, not a timed assertion."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > guard_s:
            raise AssertionError(f"gave up after {guard_s:.0f}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


# --- readiness, as an orchestrator (admin) and as a client (API) ask it ------------------
def readiness(
    replica: Replica, prober: httpx.Client
) -> tuple[tuple[int, int, int], httpx.Response]:
    """(admin /readyz, admin /v2/health/ready, API /v2/health/ready), and the API answer."""
    admin = f"http://127.0.0.1:{replica.admin_port}"
    readyz = httpx.get(f"{admin}/readyz", timeout=30).status_code
    v2 = httpx.get(f"{admin}/v2/health/ready", timeout=30).status_code
    api = prober.get(f"{replica.base}/v2/health/ready")
    return (readyz, v2, api.status_code), api


def gauge(replica: Replica, name: str) -> float:
    """`name` on the replica's admin port; a replica of several workers shows one sample
    per worker (label `worker`), and they must all say the same."""
    text = httpx.get(f"http://127.0.0.1:{replica.admin_port}/metrics", timeout=30).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    ]
    assert len(values) == replica.workers, f"{name} in {replica.name}'s /metrics: {values}"
    assert len(set(values)) == 1, f"{replica.name}'s workers disagree on {name}: {values}"
    return values[0]


def says(replica: Replica, prober: httpx.Client, status: int) -> bool:
    return readiness(replica, prober)[0] == (status,) * 3


def all_say(cluster: ProductionCluster, prober: httpx.Client, status: int) -> bool:
    return all(says(r, prober, status) for r in cluster.replicas)


def assert_agree(
    cluster: ProductionCluster, prober: httpx.Client, status: int, samples: int = 3
) -> list[httpx.Response]:
    """Every replica, asked `samples` times on every endpoint, says `status`; the gauges
    behind them agree. Returns the API answers (client-visible text)."""
    seen = []
    for replica in cluster.replicas:
        for _ in range(samples):
            codes, api = readiness(replica, prober)
            assert codes == (status,) * 3, (replica.name, codes, api.text)
            seen.append(api)
        up = 1.0 if status == 200 else 0.0
        assert gauge(replica, "ztgate_ready") == up, replica.name
        assert gauge(replica, "ztgate_state_store_up") == up, replica.name
    return seen


def restore(cluster: ProductionCluster) -> None:
    """Redis running and both replicas ready: the state the next scenario expects."""
    if not cluster.redis.running():
        cluster.redis.start()
    with cluster.client("audra", timeout=30) as prober:
        wait_for(lambda: all_say(cluster, prober, 200), "both replicas ready after the restore")


# --- what a client must never see --------------------------------------------------------
def leaks(text: str, redis: RedisServer) -> list[str]:
    """What in `text` gives the store away: its name, address, URL or ACL credentials.
    (The ACL user is called `ztgate`, like the product, so it is looked for only next to
    its password.)"""
    found = []
    if "redis" in text.lower():
        found.append("the word redis")
    if re.search(rf":{redis.port}(?!\d)", text) or f"127.0.0.1 {redis.port}" in text:
        found.append(f"port {redis.port}")
    for secret in (redis.password, redis.url, f"{redis.user}:{redis.password}"):
        if secret in text:
            found.append("a credential or the store URL")
    return found


# --- receipts ------------------------------------------------------------------------------
def read_receipts(
    cluster: ProductionCluster, answers: list[Answer]
) -> dict[tuple[int, str], dict[str, Any]]:
    """Every receipt the answers name, read as the auditor from the replica that answered
    (a 307 to the other replica, or a 404, is recorded as such)."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    with cluster.client("audra", timeout=30) as audra:
        for a in answers:
            if a.receipt_id is None or (a.replica, a.receipt_id) in out:
                continue
            base = cluster.replicas[a.replica].base
            r = audra.get(f"{base}/v2/receipts/{a.receipt_id}")
            out[(a.replica, a.receipt_id)] = (
                r.json() if r.status_code == 200 else {"status": r.status_code, "text": r.text}
            )
    return out


def exported_denials(
    cluster: ProductionCluster, replica: Replica, since: dt.datetime, work: Path
) -> Counter[tuple[str, str]]:
    """(caller, problem type) -> refusals the replica's log records since `since`, from an
    operator's `ztgate audit export` of its receipts dir: a run's first receipt counts one,
    its closing receipt (`follows`) the `count` it folded."""
    out = work / f"export-{replica.name}-{time.monotonic_ns()}"
    done = cluster.cli("audit", "export", "--log-dir", str(replica.receipts_dir), str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    counts: Counter[tuple[str, str]] = Counter()
    for f in out.glob("logs/*/receipts/*.json"):
        body = json.loads(f.read_text())["receipt"]
        when = dt.datetime.fromisoformat(body["time"].replace("Z", "+00:00"))
        if body["kind"] != "denial" or when < since or not body.get("client"):
            continue
        caller = body["client"]["spiffe_id"].rsplit("/", 1)[-1]
        denial = body["denial"]
        n = 1 if denial.get("follows") is None else int(denial["count"])
        counts[(caller, denial["problem_type"])] += n
    return counts


def refusals_seen(answers: list[Answer], replica: int) -> Counter[tuple[str, str]]:
    return Counter(
        (a.caller, a.type or "") for a in answers if a.replica == replica and a.status != 200
    )


def figures(cluster: ProductionCluster, answers: list[Answer], times: dict[str, float]) -> None:
    say("\n[redis outage] requests by replica, phase (sent/answered), caller, status:")
    by = Counter(
        (
            cluster.replicas[a.replica].name,
            a.phase if a.steady else f"{a.phase}->{a.ended}",
            a.caller,
            a.status,
            (a.type or "").removeprefix(PROBLEM_BASE),
        )
        for a in answers
    )
    for (name, phase, caller, status, kind), n in sorted(by.items()):
        say(f"  {name} {phase:<18} {caller:<8} {status} {kind or '-':<18} {n}")
    say("  times (s): " + ", ".join(f"{k}={v:.1f}" for k, v in times.items()))


def test_redis_killed_under_load_fails_closed_and_recovers_on_both_replicas(
    production_cluster: ProductionCluster, tmp_path: Path
) -> None:
    cluster = production_cluster
    redis = cluster.redis
    pids = [r.service.pid for r in cluster.replicas]
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    times: dict[str, float] = {}
    probes: list[httpx.Response] = []
    load = Load(cluster)
    try:
        with cluster.client("audra", timeout=30) as prober, load:
            # Positive control first: the cluster is ready and the loop gets its answers.
            probes += assert_agree(cluster, prober, 200)
            load.wait("before")

            # Sent while the kill is under way: counted, not phase-checked.
            load.phase = "killing"
            t_kill = time.monotonic()
            redis.kill()  # SIGKILL to its process group: no goodbye to any client
            assert not redis.running()
            load.phase = "during"
            times["to_not_ready"] = wait_for(
                lambda: all_say(cluster, prober, 503), "both replicas to say not ready"
            )
            probes += assert_agree(cluster, prober, 503)
            load.wait("during")
            probes += assert_agree(cluster, prober, 503)  # still: nothing came back by itself

            # From here on a request may meet either server: counted, not phase-checked.
            load.phase = "restored"
            times["outage"] = time.monotonic() - t_kill
            assert not list(redis.dir.glob("*.rdb")) and not list(redis.dir.glob("appendonly*"))
            times["redis_start"] = redis.start()
            t_up = time.monotonic()
            for replica in cluster.replicas:
                wait_for(partial(says, replica, prober, 200), f"{replica.name} ready again")
                times[f"{replica.name}_ready_after_restart"] = time.monotonic() - t_up
            times["both_ready_after_restart"] = time.monotonic() - t_up
            probes += assert_agree(cluster, prober, 200)
            load.phase = "after"
            load.wait("after")
    finally:
        figures(cluster, load.snapshot(), times)  # what happened, even when it went wrong
        restore(cluster)
    answers = load.snapshot()
    assert [r.service.pid for r in cluster.replicas] == pids, "a replica was restarted"
    assert all(r.service.running() for r in cluster.replicas)

    # -- what the clients saw ------------------------------------------------------------
    for a in answers:
        assert a.type != NO_HEALTHY_NODE, a.text
        assert not leaks(a.text, redis), (leaks(a.text, redis), a.text)
        allowed = {200, 503} if a.caller == "shop" else {403, 503}
        assert a.status in allowed, (a.caller, a.status, a.text)
        if a.status == 503:
            assert a.type == STATE_UNAVAILABLE, a.text
            assert a.retry_after is not None and a.retry_after.isdigit(), a.text
            assert int(a.retry_after) > 0, a.text
    for p in probes:
        text = p.text + "\n" + "\n".join(f"{k}: {v}" for k, v in p.headers.items())
        assert not leaks(text, redis), text
        if p.status_code == 503:
            assert p.json()["type"] == STATE_UNAVAILABLE, p.text

    def statuses(phase: str, replica: int, caller: str) -> set[int]:
        return {
            a.status
            for a in answers
            if a.steady and a.phase == phase and a.replica == replica and a.caller == caller
        }

    for i in range(len(cluster.replicas)):
        # The positive control: before the kill, only answers (and mallory's 403s).
        assert statuses("before", i, "shop") == {200}
        assert statuses("before", i, FORBIDDEN_CALLER) == {403}
        assert statuses("during", i, "shop") == statuses("during", i, FORBIDDEN_CALLER) == {503}
        assert statuses("after", i, "shop") == {200}
        assert statuses("after", i, FORBIDDEN_CALLER) == {403}

    # -- receipts: every 200's answer, every refusal's denial, in that replica's log -----
    got = read_receipts(cluster, answers)
    for a in answers:
        assert a.receipt_id is not None and a.header is not None, a.text
        assert receipt_from_header(a.header)[0] == a.receipt_id, (a.header, a.receipt_id)
        doc = got[(a.replica, a.receipt_id)]
        assert "receipt" in doc, (cluster.replicas[a.replica].name, a.receipt_id, doc)
        receipt = doc["receipt"]
        assert receipt["id"] == a.receipt_id
        assert receipt["client"]["spiffe_id"].endswith(f"/client/{a.caller}"), receipt
        if a.status == 200:
            assert receipt["kind"] == "answer", receipt
        else:
            assert receipt["kind"] == "denial", receipt
            assert receipt["denial"]["problem_type"] == a.type, receipt
        assert not leaks(json.dumps(doc), redis), doc

    # Nothing refused goes uncounted: once the coalesced runs have closed, each replica's
    # log records exactly the refusals each caller saw from it, by problem type.
    seen = [refusals_seen(answers, i) for i in range(len(cluster.replicas))]
    recorded: list[Counter[tuple[str, str]]] = []
    t0 = time.monotonic()
    for i, replica in enumerate(cluster.replicas):
        while True:
            counts = exported_denials(cluster, replica, since, tmp_path)
            mine = Counter({k: n for k, n in counts.items() if k[0] in ("shop", FORBIDDEN_CALLER)})
            if all(mine[k] >= n for k, n in seen[i].items()):
                break
            assert time.monotonic() - t0 < COALESCE_GUARD_S, (replica.name, mine, seen[i])
            time.sleep(3.0)
        recorded.append(mine)
    times["denials_recorded"] = time.monotonic() - t0
    for i, replica in enumerate(cluster.replicas):
        say(f"  {replica.name}: refusals seen / in its log: " + ", ".join(
            f"{caller} {kind.removeprefix(PROBLEM_BASE)} {n}/{recorded[i][(caller, kind)]}"
            for (caller, kind), n in sorted(seen[i].items())
        ))  # fmt: skip
        assert recorded[i] == seen[i], (replica.name, recorded[i], seen[i])
    assert any(k[1] == STATE_UNAVAILABLE for s in seen for k in s), "the outage was receipted"


@pytest.fixture(autouse=True)
def _cluster_ready(production_cluster: ProductionCluster) -> Iterator[None]:
    """Start from (and leave) a cluster whose Redis runs and whose replicas are ready."""
    restore(production_cluster)
    yield
    restore(production_cluster)
