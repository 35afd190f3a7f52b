"""`ztgate serve` with `listen.workers` > 1: one replica served by several processes.

The supervisor binds the listening sockets once (the API, the admin listener, the forward
listener if configured; for the API and forward listeners one socket per worker in one
SO_REUSEPORT group, see `bind`), then forks the workers; each runs the whole gateway
(`gateway.runtime.serve`) on its inherited sockets. The admin port is the supervisor's
own: each worker serves its admin app on a private unix socket, and the supervisor answers
probes and scrapes for the whole replica from them (gateway/admin_relay.py). Every check
runs in every worker, and every worker answers only once its receipt is durable in its own
log (fsync before the answer, as for one process).

What the workers share and what each keeps (docs/sizing.md):
- state: Redis if `state.redis_url` is set, else one SQLite file under the data dir
  (gateway/state/sqlite.py) that all of them see: one rate-limit bucket, one nonce set, one
  ejection record, one revocation set per replica;
- receipts: a log per worker, `<receipts dir>/w<i>/`, each with its own log id, witnessed
  like a replica's single log; every worker serves reads of all of them (the log id is in
  the receipt id) and `ztgate audit export` exports all of them;
- jobs: with Redis, every worker runs jobs (as replicas do); without, the jobs database is
  shared and worker 0 alone runs them (a restart requeues only its own interrupted runs);
- revocations: each worker keeps its own grow-only copy on disk (worker 0's is the
  replica's `revoked.jsonl`, which `ztgate pki revoke --data-dir` writes offline), and
  merges the others' into it at start (`merge_revocations`);
- policy: a bundle pushed to one worker is kept in the shared data dir, and the others
  load it from there (`gateway.runtime.follow_pushes`).

The supervisor restarts a worker that dies, at most `MAX_RESTARTS` in `RESTART_WINDOW_S`
(past that it stops the replica: a crash loop needs an operator, not a faster loop). It
forwards SIGTERM and SIGINT (graceful drain) to every worker and SIGHUP (reload the policy
now) to every serving one (one still starting loads the newest policy once it serves), and
exits non-zero when a worker cannot start.

Forks stay safe while the supervisor serves the admin port: it has one thread, and its
asyncio loop runs in slices between which it reaps, restarts and forks, so a fork never
happens inside a coroutine nor beside another thread; the child closes the admin
connections it inherited (`Supervisor.spawn`) and never runs that loop. Restarting with a
fresh exec would be cleaner still but would re-import the gateway per restart and pass
every socket and the whole parsed config through exec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import uvicorn

from gateway.admin_relay import AdminRelay, RunDir, connection_fds
from gateway.config import Config, ConfigError, Logging

log = logging.getLogger(__name__)

MAX_RESTARTS = 5  # worker restarts allowed in RESTART_WINDOW_S, all workers together
RESTART_WINDOW_S = 60.0
START_TIMEOUT_S = 300.0  # a worker builds the whole gateway (registry hashes, zk keys)
STOP_MARGIN_S = 5.0  # past the drain time, a worker that has not exited is killed
EXIT_NOT_STARTED = 3  # a worker's exit status when it could not start (no restart)


@dataclass(frozen=True)
class Worker:
    """What a worker process knows of its place in the replica."""

    index: int
    count: int
    sockets: Mapping[str, socket.socket] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"w{self.index}"

    def receipts_dir(self, base: Path) -> Path:
        return base / self.name

    def siblings(self, base: Path) -> list[Path]:
        """Where the logs this worker reads but does not write are: the other workers'
        directories, and `base` itself, which holds the logs of the replica from before it
        ran several workers (one process writes them there)."""
        return [base, *(base / f"w{i}" for i in range(self.count) if i != self.index)]

    @property
    def revocations_file(self) -> str:
        # Worker 0 keeps the replica's file, the one `ztgate pki revoke --data-dir` writes
        # offline; every worker merges all of them at start (`merge_revocations`).
        return "revoked.jsonl" if self.index == 0 else f"revoked-{self.name}.jsonl"

    @property
    def runs_jobs(self) -> bool:
        return self.index == 0

    def decision_log(self, setting: Logging) -> Logging:
        """A decision-log file per worker (`<file>.w<i>`): one rotating file has one writer."""
        path = setting.decisions_file
        if path is None:
            return setting
        return replace(setting, decisions=f"file:{path.with_name(f'{path.name}.{self.name}')}")


def refusals(cfg: Config) -> list[str]:
    """What `listen.workers` > 1 cannot serve, each with its fix."""
    out = []
    if cfg.listen.grpc_port is not None and not _free(cfg.listen.host, cfg.listen.grpc_port):
        # The workers' gRPC fronts bind it with SO_REUSEPORT (grpc.aio binds its own
        # port), which would share it with whoever holds it now: refuse instead.
        out.append(
            f"listen.grpc_port: port {cfg.listen.grpc_port} is in use by another process; "
            "stop it or choose another port"
        )
    if cfg.uplink.core_url is not None:
        out.append(
            "uplink.core_url: an edge's pulls from its core (CRL, bundle, model files) would "
            "run once per worker into the same files; run an edge with listen.workers = 1"
        )
    if not cfg.mpc.dealer_listen.endswith(":0"):
        out.append(
            f"mpc.dealer_listen: port {cfg.mpc.dealer_listen.rpartition(':')[2]} can be bound "
            "by one worker only; use port 0 (each worker's dealer takes its own)"
        )
    return out


def _free(host: str, port: int) -> bool:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as `serve --check` does
        try:
            s.bind(addr)
        except OSError:
            return False
    return True


def bind(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on one address, one per worker, in one SO_REUSEPORT group.

    The kernel spreads new connections over the group by a hash of their addresses: an
    even share per worker whatever the scheduler does, where one shared socket goes to
    whichever worker wakes first (the busiest, often). The supervisor holds every socket
    for good, so connections that arrive while a worker restarts wait in its backlog."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    out = []
    for _ in range(count):
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if count > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(2048)
        out.append(sock)
    return out


def bind_all(cfg: Config, workers: int, run: RunDir) -> dict[str, list[socket.socket]]:
    """The workers' sockets: the API (and forward) listeners', and each worker's private
    admin socket (the admin port itself is the supervisor's)."""
    out = {
        "api": bind(cfg.listen.host, cfg.listen.port, workers),
        "admin": [run.bind(i) for i in range(workers)],
    }
    f = cfg.forward
    if f.port is not None and f.ca is not None:
        out["forward"] = bind(f.host, f.port, workers)
    return out


def merge_revocations(data_dir: Path, into: str) -> int:
    """Copy into `data_dir/into` every entry of the replica's other revocation files; the
    number copied. Called at every start, with one process or several, before the process
    reads its own file: an offline `ztgate pki revoke --data-dir` (which writes
    `revoked.jsonl`) reaches every worker before it serves, and a revocation a worker took
    (in `revoked-w<i>.jsonl`) survives a move back to one process, even when the replica
    stopped before worker 0 synced it. The others' files are read without their locks (a
    worker may be appending to one): a torn last line is skipped, and the store's sync
    brings that entry."""
    from gateway.state.durable import FileRevocations, parse_entry

    found: list[tuple[str, str]] = []
    for other in sorted(data_dir.glob("revoked*.jsonl")):
        if other.name == into:
            continue
        try:
            lines = other.read_bytes().split(b"\n")
        except OSError as exc:
            raise ConfigError(f"revocations: cannot read {other}: {exc}") from exc
        for entry in filter(None, map(parse_entry, lines)):
            found.append((entry[0], entry[1].lower()))
    if not found:
        return 0
    own = FileRevocations(data_dir / into)
    try:
        before = own.version
        for entry in found:
            own.add(*entry)  # idempotent, fsynced
        return own.version - before
    finally:
        own.close()


def _prepare_shared(cfg: Config) -> None:
    """Files the workers would otherwise race to create: the jobs seal key, and the
    shared SQLite files (the state store, the jobs database)."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.state.redis_url:
        from gateway.jobs.seal import load_key
        from gateway.jobs.store import JOBS_FILE, SyncJobStore
        from gateway.state.sqlite import STATE_FILE, prepare

        load_key(cfg.jobs.key_file or cfg.data_dir / "jobs.key")
        prepare(cfg.data_dir / STATE_FILE)
        SyncJobStore(cfg.data_dir / JOBS_FILE, lock=False).close()


def _worker_main(cfg: Config, worker: Worker, ready_fd: int, supervisor: int) -> int:
    """The forked child: the whole gateway on the inherited sockets."""
    from gateway import runtime
    from gateway.workers import init_worker

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # Until `runtime.serve` installs its reload handler, a SIGHUP (whose default kills)
    # is ignored: the policy watch's first pass loads what it asked for.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Exit if the supervisor is gone (SIGKILL, OOM): nobody else would stop this worker.
    # Its pid as taken before the fork: were it gone by now, getppid() would name the
    # reaper, and the watch would wait for that one to go instead.
    init_worker(supervisor)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # init_worker ignores it; the drain needs it

    def started() -> None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"1")
            os.close(ready_fd)

    try:
        runtime.run(cfg, worker=worker, started=started)
    except ConfigError as exc:
        print(f"ztgate: worker {worker.index}: {exc}", file=sys.stderr)
        return EXIT_NOT_STARTED
    return 0


@dataclass
class _Child:
    index: int
    pid: int
    ready_fd: int  # read end; one byte arrives when the worker listens
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.count = cfg.listen.workers
        self.sockets: dict[str, list[socket.socket]] = {}
        self.children: dict[int, _Child] = {}  # by pid
        self.restarts: list[float] = []
        self.stopping = False
        self.exit_code = 0
        self._signals: list[int] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the admin port's, run in slices
        self.relay: AdminRelay | None = None
        self.admin: uvicorn.Server | None = None
        self._admin_task: asyncio.Task[None] | None = None
        self.admin_socket: socket.socket | None = None
        self.run_dir: RunDir | None = None

    # -- processes ------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        read_fd, write_fd = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_fd)
                for child in self.children.values():
                    os.close(child.ready_fd)
                self._leave_admin()
                mine = {k: v[index % len(v)] for k, v in self.sockets.items()}
                worker = Worker(index, self.count, mine)
                code = _worker_main(self.cfg, worker, write_fd, supervisor)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        self.children[pid] = _Child(index, pid, read_fd)
        log.info("worker %d started (pid %d)", index, pid)

    def _leave_admin(self) -> None:
        """In a forked worker: close the admin port and the connections the supervisor
        was serving on it, or a client would not see them close while this worker lives.
        The objects behind them stay referenced (by `self`, on this process's stack until
        it exits), so nothing closes those descriptor numbers again once reused."""
        fds = [] if self.admin is None else connection_fds(self.admin)
        if self.admin_socket is not None:
            fds.append(self.admin_socket.fileno())
        if self.run_dir is not None:
            fds.append(self.run_dir.fd)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def alive(self) -> int:
        return len(self.children)

    def serving(self, index: int) -> bool:
        return any(c.index == index and c.ready for c in self.children.values())

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            os.close(child.ready_fd)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info("worker %d exited (%d)", child.index, code)
                continue
            self._lost(child, code)

    def _lost(self, child: _Child, code: int) -> None:
        if not child.ready or code == EXIT_NOT_STARTED:
            log.error(
                "worker %d could not start (exit %d): stopping the replica", child.index, code
            )
            self.exit_code = 1
            self.stop()
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S]
        if len(self.restarts) >= MAX_RESTARTS:
            log.error(
                "worker %d died (exit %d), %d restarts in %.0fs already: stopping the replica",
                child.index,
                code,
                len(self.restarts),
                RESTART_WINDOW_S,
            )
            self.exit_code = 1
            self.stop()
            return
        self.restarts.append(now)
        if self.relay is not None:
            self.relay.restarts.inc()
        log.error("worker %d died (exit %d): restarting it", child.index, code)
        self.spawn(child.index)

    def _check_ready(self, timeout_s: float) -> None:
        waiting = {c.ready_fd: c for c in self.children.values() if not c.ready}
        if not waiting:
            time.sleep(timeout_s)
            return
        try:
            readable, _, _ = select.select(list(waiting), [], [], timeout_s)
        except InterruptedError:
            return
        for fd in readable:
            child = waiting[fd]
            if os.read(fd, 1):
                child.ready = True
                log.info("worker %d serving", child.index)
        now = time.monotonic()
        for child in waiting.values():
            if not child.ready and now - child.started_at > START_TIMEOUT_S:
                log.error("worker %d not serving after %.0fs", child.index, START_TIMEOUT_S)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)

    def signal_all(self, sig: int, *, ready_only: bool = False) -> None:
        for pid, child in list(self.children.items()):
            if ready_only and not child.ready:
                continue  # still starting: it loads the newest policy once it serves
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.signal_all(signal.SIGTERM)

    # -- main loop ------------------------------------------------------------------
    def _on_signal(self, sig: int, _frame: object) -> None:
        self._signals.append(sig)  # handled in the loop, outside the handler

    def _start_admin(self) -> None:
        """The admin port, served by this process for the replica (gateway/admin_relay.py)."""
        assert self.run_dir is not None
        listen = self.cfg.listen
        self.admin_socket = bind(listen.admin_host, listen.admin_port, 1)[0]
        addresses = [self.run_dir.address(i) for i in range(self.count)]
        self.relay = AdminRelay(addresses, self.alive, self.serving)
        self.admin = self.relay.server(listen.graceful_shutdown_s)
        self.loop = asyncio.new_event_loop()  # never the running loop at a fork
        self._admin_task = self.loop.create_task(self.admin.serve([self.admin_socket]))

    def _wait(self, timeout_s: float) -> None:
        """Serve the admin port for `timeout_s`, then see which workers started."""
        if self.loop is None:
            self._check_ready(timeout_s)
            return
        self.loop.run_until_complete(asyncio.sleep(timeout_s))
        self._check_ready(0)

    def _stop_admin(self) -> None:
        if self.loop is None or self.admin is None or self._admin_task is None:
            return
        self.admin.should_exit = True
        with contextlib.suppress(Exception):
            wait = asyncio.wait_for(self._admin_task, self.cfg.listen.graceful_shutdown_s + 1)
            self.loop.run_until_complete(wait)
        self.loop.close()

    def run(self) -> int:
        self.run_dir = RunDir(self.cfg.data_dir)
        self.sockets = bind_all(self.cfg, self.count, self.run_dir)
        _prepare_shared(self.cfg)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        try:
            self._start_admin()
            for i in range(self.count):
                self.spawn(i)
            deadline: float | None = None
            while self.children:
                self._wait(0.2)
                while self._signals:
                    got = self._signals.pop(0)
                    if got in (signal.SIGTERM, signal.SIGINT):
                        log.warning("signal %d: draining every worker", got)
                        self.stop()
                    elif got == signal.SIGHUP:
                        log.warning("SIGHUP: every worker reloads its policy")
                        self.signal_all(signal.SIGHUP, ready_only=True)
                self._reap()
                if self.stopping and deadline is None:
                    deadline = time.monotonic() + self.cfg.listen.graceful_shutdown_s
                    deadline += STOP_MARGIN_S
                if deadline is not None and time.monotonic() > deadline:
                    self.signal_all(signal.SIGKILL)
        finally:
            self.signal_all(signal.SIGKILL)
            self._stop_admin()
            for socks in self.sockets.values():
                for sock in socks:
                    sock.close()
            if self.admin_socket is not None:
                self.admin_socket.close()
            self.run_dir.close()  # the sockets' files stay: the next run unlinks them
        return self.exit_code


def run(cfg: Config) -> int:
    """Serve `cfg` with `cfg.listen.workers` processes; the supervisor's exit status."""
    refused = refusals(cfg)
    if refused:
        raise ConfigError("; ".join(refused))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="ztgate supervisor: %(message)s")
    return Supervisor(cfg).run()
