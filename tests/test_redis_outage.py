"""Redis killed under load and restored, as a client sees it (issue 13, item 8).

Real processes throughout: a redis-server this module starts (and SIGKILLs, and restarts
on the same port), a gateway over mTLS, three Triton nodes. A client loops inferences
while the store goes away and comes back. What must hold:

* while Redis is down every request is refused with `state-unavailable` (503,
  Retry-After), never `no-healthy-node` (the nodes are fine), and no client-visible text
  (body, headers) nor any receipt names Redis, its host:port or its error;
* the admin `/readyz` and the API's `/v2/health/ready` agree: not ready during the outage,
  ready after it; `ztgate_state_store_up` and `ztgate_ready` say the same;
* every 200 has its answer receipt in the log, and every refusal a denial receipt
  (coalesced runs counted), as docs/compliance.md promises;
* once Redis is back the same gateway serves again, without a restart.

The control runs the very same loop with Redis left alone: only 200s.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gateway.pki import PKI
from gateway.ports import free_port
from gateway.protocol.problems import PROBLEM_BASE
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import SignedReceipt
from tests.conftest import TritonCluster
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway
from tests.redis_fixture import redis_executable
from tests.test_gateway import IRIS, infer_body, node_table

STATE_UNAVAILABLE = PROBLEM_BASE + "state-unavailable"
NO_HEALTHY_NODE = PROBLEM_BASE + "no-healthy-node"
# Hang guards only: each waits for something that happens in well under a second on an
# idle machine; they are generous because test machines are small and shared.
HANG_GUARD_S = 60.0
PER_PHASE = 20  # requests that must complete in each phase
PACE_S = 0.02  # between requests, so a fast refusal loop does not starve the gateway


# --- a redis-server that can be killed and brought back on the same port ----------------
@dataclass
class Redis:
    """Plain TCP, or (with `pki`) production-style: TLS only and one ACL user, as
    `tests.gateway_harness.tls_redis`, but restartable with the same port and secrets."""

    exe: str
    workdir: Path
    pki: PKI | None = None
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.pki is None:
            return f"redis://127.0.0.1:{self.port}/0"
        return (
            f"rediss://ztgate:{self.password}@127.0.0.1:{self.port}/0"
            f"?ssl_ca_certs={self.pki.root_ca}"
        )

    def _args(self) -> list[str]:
        if self.pki is None:
            return ["--port", str(self.port)]
        cert, key = self.workdir / "tls.crt", self.workdir / "tls.key"
        if not cert.exists():
            self.pki.issue("gateway-server", "redis", out=(cert, key))
        return [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-auth-clients", "no",
            "--user", "default", "off",
            "--user", "ztgate", "on", f">{self.password}", "~*", "&*", "+@all",
        ]  # fmt: skip

    def pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                raw.settimeout(0.5)
                if self.pki is None:
                    raw.sendall(b"PING\r\n")
                    return raw.recv(64).startswith(b"+PONG")
                ctx = ssl.create_default_context(cafile=str(self.pki.root_ca))
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(f"AUTH ztgate {self.password}\r\n".encode())
                    return tls.recv(64).startswith(b"+OK")
        except OSError:
            return False

    def start(self) -> None:
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    *self._args(),
                    "--bind", "127.0.0.1",
                    # No persistence: a restarted server has forgotten everything, the
                    # harder case for recovery (buckets, nonces, log directory all gone).
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(self.pings, "redis-server to answer")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no goodbye to any client
        self.proc.wait(timeout=HANG_GUARD_S)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def redis_server(workdir: Path, pki: PKI | None) -> Iterator[Redis]:
    exe = redis_executable()
    workdir.mkdir(parents=True, exist_ok=True)
    server = Redis(exe, workdir, pki)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def wait_for(cond: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + HANG_GUARD_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


# --- the client loop ----------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    phase: str  # the phase when the request was sent
    ended: str  # the phase when its answer came back
    status: int
    type: str | None  # problem type, for errors
    text: str  # body and headers, everything a client sees
    receipt_id: str | None  # 200: the answer's receipt id
    summary: str | None  # the ztgate-receipt header
    retry_after: str | None


class Load:
    """One client in a thread, sending inferences back to back until stopped."""

    def __init__(self, pki: PKI, gw: RunningGateway) -> None:
        issued = pki.ensure("client", "demo")
        self.client = httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=30)
        self.url = f"{gw.base}/v2/models/iris/infer"
        self.phase = "before"
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            phase = self.phase
            r = self.client.post(
                self.url, json=infer_body(IRIS), headers={"ztgate-nonce": uuid.uuid4().hex}
            )
            problem = r.json() if r.status_code != 200 else {}
            params = r.json().get("parameters", {}) if r.status_code == 200 else {}
            text = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
            answer = Answer(
                phase,
                self.phase,
                r.status_code,
                problem.get("type"),
                text,
                params.get("ztgate.receipt_id"),
                r.headers.get("ztgate-receipt"),
                r.headers.get("retry-after"),
            )
            with self.lock:
                self.answers.append(answer)
            time.sleep(PACE_S)

    def count(self, phase: str) -> int:
        """Requests sent and answered entirely within `phase`."""
        with self.lock:
            return sum(1 for a in self.answers if a.phase == a.ended == phase)

    def wait(self, phase: str, n: int = PER_PHASE) -> None:
        wait_for(lambda: self.count(phase) >= n, f"{n} answers in phase {phase!r}")

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=HANG_GUARD_S)
        self.client.close()


def readiness(pki: PKI, gw: RunningGateway) -> tuple[int, int, httpx.Response]:
    """(admin /readyz, API /v2/health/ready) status codes, and the API response."""
    issued = pki.ensure("client", "prober")
    with httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=30) as c:
        api = c.get(f"{gw.base}/v2/health/ready")
    admin = httpx.get(f"{gw.admin_base}/readyz", timeout=30)
    return admin.status_code, api.status_code, api


def gauge(gw: RunningGateway, name: str) -> float:
    text = httpx.get(f"{gw.admin_base}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def assert_agree(pki: PKI, gw: RunningGateway, status: int, samples: int = 5) -> None:
    for _ in range(samples):
        admin, api, _ = readiness(pki, gw)
        assert (admin, api) == (status, status)
    ready = 1.0 if status == 200 else 0.0
    assert gauge(gw, "ztgate_ready") == ready
    assert gauge(gw, "ztgate_state_store_up") == ready


def figures(title: str, answers: list[Answer]) -> None:
    by = Counter((a.phase, a.status, (a.type or "").removeprefix(PROBLEM_BASE)) for a in answers)
    print(f"\n{title}: {len(answers)} requests")
    for (phase, status, kind), n in sorted(by.items()):
        print(f"  {phase:<10} {status} {kind or 'ok':<20} {n}")


def receipts(paths: list[Path]) -> dict[str, SignedReceipt]:
    out: dict[str, SignedReceipt] = {}
    for path in paths:
        reader = ReceiptLog.open_readonly(path)
        try:
            for stored in reader.bodies():
                out[stored.receipt_id] = SignedReceipt.from_bytes(stored.body)
        finally:
            asyncio.run(reader.close())
    return out


@pytest.fixture(scope="module")
def registry_dir(triton_repository: Path) -> Path:
    return triton_repository.parent / "registry"


def run_load(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
    outage: bool,
    tls: bool = True,
) -> tuple[list[Answer], dict[str, SignedReceipt], Redis]:
    with redis_server(tmp_path / "redis", pki if tls else None) as redis:
        cfg = gateway_config(
            pki,
            registry_dir,
            tmp_path / "gw",
            node_table(triton_cluster),
            state={"redis_url": redis.url},
        )
        with running_gateway(cfg) as gw, Load(pki, gw) as load:
            assert gw.gw.receipts is not None
            log_paths = [rl.path for rl in gw.gw.receipts.logs()]
            assert_agree(pki, gw, 200)
            load.wait("before")

            if outage:
                redis.kill()
            load.phase = "during"
            load.wait("during")
            if outage:
                # The first refused request already marks the replica not ready; from
                # then on both endpoints must say so, every time they are asked.
                wait_for(lambda: readiness(pki, gw)[:2] == (503, 503), "not ready")
                assert_agree(pki, gw, 503)
                api = readiness(pki, gw)[2]
                assert api.json()["type"] == STATE_UNAVAILABLE
            # Before the restart: what is sent from now on may meet either server.
            load.phase = "restored"
            if outage:
                redis.start()  # same port, empty: nothing survived
            wait_for(lambda: readiness(pki, gw)[:2] == (200, 200), "ready again")
            assert_agree(pki, gw, 200)
            load.phase = "after"
            load.wait("after")
        answers = list(load.answers)
    # The gateway has stopped: its coalesced denial runs are flushed into the log.
    return answers, receipts(log_paths), redis


def check_receipts(answers: list[Answer], log: dict[str, SignedReceipt], redis: Redis) -> None:
    # Nothing accepted is lost: every 200 carries a receipt, and the log holds it.
    for a in answers:
        if a.status == 200:
            assert a.receipt_id is not None and a.summary is not None
            stored = log.get(a.receipt_id)
            assert stored is not None, f"answer receipt {a.receipt_id} missing from the log"
            assert stored.receipt.kind == "answer"
    # Every refusal got a denial receipt (its header names it) that is in the log; the
    # coalesced runs in the log add up to exactly the refusals this client saw.
    refused = [a for a in answers if a.status != 200]
    for a in refused:
        assert a.summary is not None, f"refusal without a receipt: {a.text}"
        rid = a.summary.split()[1]
        denial = log[rid].receipt.denial
        assert denial is not None and denial.problem_type == a.type
    receipted = sum(
        1 if r.receipt.denial.follows is None else r.receipt.denial.count
        for r in log.values()
        if r.receipt.kind == "denial"
        and r.receipt.denial is not None
        and r.receipt.client is not None
        and r.receipt.client.spiffe_id.endswith("/client/demo")
    )
    assert receipted == len(refused)
    # No receipt says where Redis lives or what it said.
    for r in log.values():
        text = r.to_bytes().decode()
        assert "redis" not in text.lower() and f":{redis.port}" not in text
        assert redis.password not in text


# Production-style (TLS, ACL user: the password must not leak either) and plain TCP, whose
# errors name the host:port in the clear.
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_redis_outage_fails_closed_with_its_own_problem_type_and_recovers(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path, tls: bool
) -> None:
    answers, log, redis = run_load(
        pki, triton_cluster, registry_dir, tmp_path, outage=True, tls=tls
    )
    figures(f"redis ({'tls' if tls else 'plain'}) killed and restored", answers)
    by_phase = Counter(a.phase for a in answers if a.phase == a.ended)

    for a in answers:
        # Never the nodes' problem type for a store fault, never Redis in client text.
        assert a.type != NO_HEALTHY_NODE, a.text
        assert "redis" not in a.text.lower(), a.text
        assert f":{redis.port}" not in a.text and redis.password not in a.text, a.text
        assert a.status in (200, 503), a.text
        if a.status == 503:
            assert a.type == STATE_UNAVAILABLE, a.text
            assert a.retry_after is not None and int(a.retry_after) > 0
    # Before the kill everything was answered; sent and answered while Redis was dead,
    # everything was refused; sent once both readiness endpoints said ready, answered.
    assert {a.status for a in answers if a.phase == a.ended == "before"} == {200}
    assert {a.status for a in answers if a.phase == a.ended == "during"} == {503}
    assert {a.status for a in answers if a.phase == a.ended == "after"} == {200}
    assert by_phase["before"] >= PER_PHASE and by_phase["during"] >= PER_PHASE
    assert by_phase["after"] >= PER_PHASE
    check_receipts(answers, log, redis)


def test_the_same_loop_without_an_outage_gets_only_200s(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    answers, log, redis = run_load(pki, triton_cluster, registry_dir, tmp_path, outage=False)
    figures("control, redis left alone", answers)
    assert {a.status for a in answers} == {200}
    assert len(answers) >= 3 * PER_PHASE
    check_receipts(answers, log, redis)
