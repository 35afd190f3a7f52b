"""Launch and supervise a tritonserver (from the nvidia-pytriton wheel) behind gRPC mTLS.

The node trusts only its site's gateway CA (``--grpc-root-cert``), so only the gateway can
call it over the network. HTTP carries no TLS in tritonserver, so it is bound to loopback
and used for nothing but local health and probe requests.

Failure modes this module exists for (all seen with tritonserver 2.51):

* The python-backend stub cannot start (wrong ``LD_LIBRARY_PATH``, a model that hangs in
  ``initialize``): tritonserver sits in "loading" forever. Hence a start-up deadline after
  which the server and its stubs are killed and :class:`NodeStartError` carries the log tail.
* A stub dies (OOM killer, SIGKILL): the server and the model still say "ready" while every
  inference fails, and the stub is never restarted. Hence :class:`NodeSupervisor` checks the
  stubs and runs a probe inference, and restarts the whole tritonserver (~2 s) on failure.
* The python backend's shared-memory regions outlive a killed server; every stop removes
  ``/dev/shm/<prefix>*`` (the prefix is unique per node and per launching process).
* The launcher dies without stopping its nodes (SIGKILL, OOM killer, a crash): nothing would
  ever stop them. Hence every child is started by :func:`spawn_tied`, in the launcher's
  process group and with ``PR_SET_PDEATHSIG`` = SIGKILL. The stubs follow their server: each
  watches that its server is alive and exits once it is gone ("Non-graceful termination
  detected"), within about a second (tests/system/test_shutdown.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import queue
import signal
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psutil

from gateway.files import atomic_write
from gateway.node.repository import SCORE_SUFFIX

log = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")  # noqa: S108 - POSIX shm lives here; we only unlink our prefix
_PY_TAG = f"{sys.version_info.major}.{sys.version_info.minor}"
# One HTTP health poll must never eat a large part of a start-up deadline.
_POLL_TIMEOUT_S = 0.5
_POLL_INTERVAL_S = 0.1


class NodeStartError(RuntimeError):
    """tritonserver did not become ready in time, or exited; the message has the log tail."""


class TritonNotInstalled(RuntimeError):
    """The nvidia-pytriton wheel (the ``node`` extra) is not installed."""


# --------------------------------------------------------------------------- installation


def _pytriton_dir() -> Path:
    # find_spec, not import: importing pytriton pulls in far more than the file layout.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled("tritonserver needs the node extra: pip install ztgate[node]")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _wheel_libs() -> Path:
    # auditwheel puts the bundled shared libraries next to the package, not inside it.
    return _pytriton_dir().parent / "nvidia_pytriton.libs"


def triton_home(dest: Path) -> Path:
    """Lay out ``bin/tritonserver`` and ``backends/python`` (with the stub) under ``dest``.

    The wheel keeps the stub for each Python version apart from the backend, but the backend
    looks for it in its own directory. Files already present are not copied again, so many
    nodes can share one home.
    """
    src = _pytriton_dir() / "tritonserver"
    stub = src / "python_backend_stubs" / _PY_TAG / STUB_NAME
    if not stub.is_file():
        raise TritonNotInstalled(f"the pytriton wheel has no python backend stub for {_PY_TAG}")
    copies = [
        (src / "bin" / "tritonserver", dest / "bin" / "tritonserver"),
        (
            src / "backends" / "python" / "libtriton_python.so",
            dest / "backends" / "python" / "libtriton_python.so",
        ),
        (
            src / "backends" / "python" / "triton_python_backend_utils.py",
            dest / "backends" / "python" / "triton_python_backend_utils.py",
        ),
        (stub, dest / "backends" / "python" / STUB_NAME),
    ]
    for source, target in copies:
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        # Write then rename: two nodes laying out the same home must not see half a binary.
        atomic_write(target, source.read_bytes(), stat.S_IMODE(source.stat().st_mode))
    return dest


def triton_env(
    *, with_libdir: bool = True, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment tritonserver and its python stubs need.

    The stub links against libpython (LIBDIR) and imports onnxruntime, so this venv's
    ``bin`` goes first on PATH: the stub runs whichever ``python3`` it finds there.
    """
    env = dict(os.environ if base is None else base)
    libs = [str(_wheel_libs())]
    if with_libdir:
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            libs.append(str(libdir))
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *([old] if old else [])])
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


# --------------------------------------------------------------------------- tied children

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: between fork and exec the child must not load libraries.
_prctl = _load_prctl()


def _die_with(parent: int) -> Callable[[], None] | None:
    """A preexec_fn: SIGKILL this child when its parent dies, however the parent dies."""
    prctl = _prctl
    if prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)
        # The parent may have died between fork and prctl: then no signal would ever come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


_Job = tuple[concurrent.futures.Future[subprocess.Popen[Any]], list[str], dict[str, Any]]


class _Spawner:
    """Forks every tied child from one daemon thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process.
    Nodes are started from short-lived threads (LocalCluster starts them in parallel, one
    thread each): forked there, each node would be killed as soon as its starter returned.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def forget(self) -> None:
        # A forked child has no spawner thread, only the record of one: it would wait
        # on the queue forever. It gets its own on first use.
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = None

    def popen(self, cmd: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="spawner", daemon=True)
                self._thread.start()
        done: concurrent.futures.Future[subprocess.Popen[Any]] = concurrent.futures.Future()
        self._jobs.put((done, cmd, kwargs))
        try:
            return done.result()
        except BaseException:
            # Interrupted (a signal turned into KeyboardInterrupt) while the spawner forks:
            # nobody will hold that child, so it is killed as soon as it exists.
            done.add_done_callback(_kill_unclaimed)
            raise

    def _serve(self) -> None:
        while True:
            done, cmd, kwargs = self._jobs.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(subprocess.Popen(cmd, preexec_fn=_die_with(os.getpid()), **kwargs))
            except BaseException as exc:  # handed to the caller, who raises it
                done.set_exception(exc)


def _kill_unclaimed(done: concurrent.futures.Future[subprocess.Popen[Any]]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    proc = done.result()
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


_spawner = _Spawner()
os.register_at_fork(after_in_child=_spawner.forget)


def spawn_tied(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(cmd, **kwargs)`` for a child that must never outlive this process.

    The child stays in our process group, so whoever signals or inspects the group (a
    terminal's Ctrl-C, systemd, a test) reaches it; and on Linux it gets SIGKILL when this
    process dies, even by SIGKILL, when nothing of ours runs to stop it (PR_SET_PDEATHSIG).
    """
    for own in ("start_new_session", "process_group", "preexec_fn"):
        if own in kwargs:
            raise TypeError(f"spawn_tied sets {own} itself")
    return _spawner.popen(list(cmd), kwargs)


# --------------------------------------------------------------------------- one process


@dataclass(frozen=True)
class NodeSpec:
    """One node: where it listens, what it serves, and the certificates it uses."""

    name: str
    region: str
    provider: str
    grpc_port: int
    http_port: int
    repository: Path
    cert: Path
    key: Path
    client_ca: Path  # the site's gateway CA bundle: the only callers the node accepts
    workdir: Path
    labels: Mapping[str, str] = field(default_factory=dict)
    grpc_host: str = "127.0.0.1"

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"


_GONE = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


def _start_time(pid: int) -> float | None:
    """When ``pid`` started: a recycled pid has another start time. None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):  # ValueError: pid < 0
        return None


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.status() not in _GONE
    except psutil.Error:
        return False


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie stub is as dead as a missing one)."""
    try:
        return _live(psutil.Process(pid))
    except (psutil.Error, ValueError):
        return False


def children(pid: int, cmdline_contains: str | None = None) -> list[int]:
    """Live direct children of ``pid``, optionally only those whose cmdline has a substring."""
    try:
        kids = psutil.Process(pid).children()
    except (psutil.Error, ValueError):
        return []
    found = []
    for kid in kids:
        if not _live(kid):
            continue
        if cmdline_contains is not None:
            try:
                cmd = " ".join(kid.cmdline())
            except psutil.Error:
                continue
            if cmdline_contains not in cmd:
                continue
        found.append(kid.pid)
    return sorted(found)


def descendants(pid: int) -> list[int]:
    """Live children of ``pid``, their children, and so on."""
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return sorted(found)


def _http_json(url: str, timeout: float, body: Any | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    method = "POST" if data is not None else "GET"
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - our http URL
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - as above
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode(errors="replace")


class TritonProcess:
    """One tritonserver process for a :class:`NodeSpec`. Not thread-safe; see NodeSupervisor."""

    def __init__(
        self,
        spec: NodeSpec,
        home: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` times the start-up deadline (seconds, monotonic); tests inject one."""
        self.spec = spec
        self.clock = clock
        self.home = home if home is not None else spec.workdir / "triton-home"
        self.env_overrides = dict(env or {})
        self.extra_args = tuple(extra_args)
        # The launching pid keeps two test runs (or two gateways) on one host apart.
        self.shm_prefix = f"ztgate_{spec.name}_{os.getpid()}_{spec.grpc_port}_"
        self._proc: subprocess.Popen[bytes] | None = None
        # The server's children (pid -> start time) as of its last start: stop() must still
        # find them if the server died first and they became init's.
        self._kids: dict[int, float] = {}
        self._log: TextIO | None = None
        self.started_at: float | None = None
        self.ready_after_s: float | None = None
        # Told each step of `start` as it begins (`gateway.cli.Progress`: a person waiting
        # at a terminal); the same steps are then logged at DEBUG rather than INFO.
        self.progress: Callable[[str], None] | None = None

    # -- facts ------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.spec.workdir / "triton.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.spec.http_port}"

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ready(self, timeout: float = _POLL_TIMEOUT_S) -> bool:
        if not self.alive():
            return False
        try:
            status, _ = _http_json(f"{self.http_base}/v2/health/ready", timeout)
        except (OSError, ValueError):
            return False
        return status == 200

    def stub_pids(self) -> list[int]:
        """The python-backend stubs (one per model instance) this server spawned."""
        pid = self.pid
        if pid is None or not self.alive():
            return []
        return children(pid, STUB_NAME)

    def shm_segments(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def log_tail(self, lines: int = 30) -> str:
        try:
            with self.log_path.open(errors="replace") as fh:
                return "".join(deque(fh, maxlen=lines))
        except OSError:
            return ""

    def command(self) -> list[str]:
        s = self.spec
        return [
            str(self.home / "bin" / "tritonserver"),
            f"--model-repository={s.repository}",
            f"--backend-directory={self.home / 'backends'}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-timeout-secs=2",
            "--allow-http=true",
            "--http-address=127.0.0.1",
            f"--http-port={s.http_port}",
            f"--grpc-address={s.grpc_host}",
            f"--grpc-port={s.grpc_port}",
            "--allow-metrics=false",
            # Always --flag=value: a bare boolean flag swallows the next argument.
            "--grpc-use-ssl-mutual=true",
            f"--grpc-server-cert={s.cert}",
            f"--grpc-server-key={s.key}",
            f"--grpc-root-cert={s.client_ca}",
            *self.extra_args,
        ]

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, deadline_s: float = 30.0) -> float:
        """Spawn tritonserver and wait until it is ready; returns seconds to ready."""
        if self.alive():
            raise NodeStartError(f"node {self.spec.name} is already running (pid {self.pid})")
        s = self.spec
        # tritonserver's own message for a missing cert is "Socket already in use".
        for label, path in (("cert", s.cert), ("key", s.key), ("client CA", s.client_ca)):
            if not Path(path).is_file():
                raise NodeStartError(f"node {s.name}: {label} file {path} does not exist")
        if not Path(s.repository).is_dir():
            raise NodeStartError(f"node {s.name}: model repository {s.repository} is not a dir")
        step = self.progress
        level = logging.INFO if step is None else logging.DEBUG
        if step is not None:
            step("starting tritonserver")
        triton_home(self.home)
        s.workdir.mkdir(parents=True, exist_ok=True)
        self._clean_shm()
        env = triton_env()
        # Caches (pip, onnxruntime, numba, ...) of the stubs stay inside the node's dir.
        for var in ("HOME", "XDG_CACHE_HOME", "EZKL_REPO_PATH"):
            d = s.workdir / var.lower()
            d.mkdir(exist_ok=True)
            env[var] = str(d)
        env.update(self.env_overrides)
        self._log = self.log_path.open("a")
        self._log.write(f"\n=== ztgate: starting node {s.name} at {time.ctime()} ===\n")
        self._log.flush()
        self.started_at = self.clock()
        self.ready_after_s = None
        self._kids = {}
        self._proc = spawn_tied(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=s.workdir,
        )
        log.log(level, "node %s: tritonserver pid %d starting", s.name, self._proc.pid)
        if step is not None:
            step(f"loading models (tritonserver pid {self._proc.pid})")
        deadline = self.started_at + deadline_s
        while self.clock() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self.stop()
                raise NodeStartError(
                    f"node {s.name}: tritonserver exited with {rc} before ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self.ready(timeout=min(_POLL_TIMEOUT_S, max(0.05, deadline - self.clock()))):
                self.ready_after_s = self.clock() - self.started_at
                self._kids = _identities(descendants(self._proc.pid))
                log.log(level, "node %s ready in %.2fs", s.name, self.ready_after_s)
                return self.ready_after_s
            time.sleep(_POLL_INTERVAL_S)
        self.stop()
        raise NodeStartError(
            f"node {s.name}: not ready within {deadline_s:g}s, killed; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the server, SIGKILL it after ``timeout``, then its leftover children.

        The server shares our process group (see :func:`spawn_tied`), so its children are
        found by parentage, not by group.
        """
        proc, self._proc = self._proc, None
        rc: int | None = None
        if proc is not None:
            # Noted before the server goes: then its children become init's.
            kids = {**self._kids, **_identities(descendants(proc.pid))}
            self._kids = {}
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "node %s: no exit %.1fs after SIGTERM, killing", self.spec.name, timeout
                )
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    rc = proc.wait(timeout=timeout)
            # A stub leaves on its own once its server is gone; one stuck (a model hung in
            # native code) might not, so whatever is left is killed now.
            for pid, started in kids.items():
                if _start_time(pid) == started:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            _wait_gone(kids, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._clean_shm()
        return rc

    def _clean_shm(self) -> None:
        for seg in self.shm_segments():
            with contextlib.suppress(FileNotFoundError):
                seg.unlink()

    def __enter__(self) -> TritonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _identities(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        started = _start_time(pid)
        if started is not None:
            found[pid] = started
    return found


def _wait_gone(kids: Mapping[int, float], timeout: float) -> None:
    # Orphaned stubs are reparented to init (or a subreaper) and reaped there; wait for it
    # so callers can rely on "stop() returned" meaning "nothing of the node is left".
    def left() -> bool:
        return any(_start_time(p) == t and pid_alive(p) for p, t in kids.items())

    end = time.monotonic() + timeout
    while left() and time.monotonic() < end:
        time.sleep(0.05)


# --------------------------------------------------------------------------- supervision


def _probe_tensor(spec: Mapping[str, Any]) -> dict[str, Any]:
    shape = [1 if int(d) < 0 else int(d) for d in spec.get("shape", [])]
    count = 1
    for d in shape:
        count *= d
    datatype = str(spec.get("datatype", "FP32"))
    value: Any = False if datatype == "BOOL" else ("" if datatype == "BYTES" else 0)
    return {"name": spec["name"], "shape": shape, "datatype": datatype, "data": [value] * count}


@dataclass
class RestartEvent:
    at: float  # time.time()
    reason: str
    ok: bool
    ready_after_s: float | None = None


class NodeSupervisor:
    """Keeps one :class:`TritonProcess` serving; restarts it when it dies or stops answering.

    A thread checks every ``interval_s``: process dead; a python stub gone; or the server
    ready while a probe inference (all-zero input, on loopback HTTP) fails. Any of these
    restarts the whole tritonserver. At most ``max_restarts`` within ``restart_window_s``,
    each after an exponential backoff; past that the supervisor gives up (``state ==
    "failed"``) rather than flap forever.
    """

    def __init__(
        self,
        process: TritonProcess,
        *,
        interval_s: float = 2.0,
        start_deadline_s: float = 30.0,
        max_restarts: int = 5,
        restart_window_s: float = 300.0,
        backoff_s: float = 0.5,
        backoff_max_s: float = 15.0,
        probe_timeout_s: float = 5.0,
        probe_model: str | None = None,
    ) -> None:
        self.process = process
        self.interval_s = interval_s
        self.start_deadline_s = start_deadline_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.probe_timeout_s = probe_timeout_s
        self.probe_model = probe_model
        self.restarts = 0
        self.checks = 0
        self.last_reason: str | None = None
        self.history: list[RestartEvent] = []
        self.state = "stopped"  # stopped | running | restarting | failed
        self._stubs: set[int] = set()
        self._probe: tuple[str, str, dict[str, Any]] | None = None  # model, route, body
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.process.spec.name

    def start(self) -> float:
        """Start the node (raises NodeStartError) and the watch thread; returns secs to ready."""
        if self._thread is not None:
            raise RuntimeError(f"supervisor of {self.name} is already running")
        with self._lock:
            took = self.process.start(self.start_deadline_s)
            self._after_start()
            self.state = "running"
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"supervise-{self.name}", daemon=True
        )
        self._thread.start()
        return took

    def halt(self) -> None:
        """No more checks or restarts; the node runs on until :meth:`stop`.

        Safe from a signal handler. For a shutdown: a signal sent to the whole process group
        (Ctrl-C, systemd) reaches tritonserver too, and must not look like a crash.
        """
        self._stop.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            # A restart in flight may take a whole start deadline before it sees the flag.
            thread.join(timeout=self.start_deadline_s + timeout + 1.0)
        with self._lock:
            self.process.stop(timeout)
            self.state = "stopped"

    def wait_healthy(self, timeout: float) -> bool:
        """Block until the node is running and ready (after a restart, say), or timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.state == "failed":
                return False
            if self.state == "running" and self.process.ready():
                return True
            time.sleep(0.1)
        return False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold off checks and restarts (maintenance, or a test observing a failure)."""
        with self._lock:
            yield

    def check(self) -> str | None:
        """One health check; the reason the node needs a restart, or None if it is fine."""
        self.checks += 1
        p = self.process
        if p.pid is None:
            return "tritonserver not running (the last start failed)"
        if not p.alive():
            return f"tritonserver (pid {p.pid}) exited"
        stubs = set(p.stub_pids())
        lost = self._stubs - stubs
        if lost:
            return f"python backend stub(s) {sorted(lost)} gone"
        # "Ready" alone proves nothing: with a dead stub the server still claims it.
        return self.probe()

    def _after_start(self) -> None:
        self._stubs = set(self.process.stub_pids())
        self._probe = None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            self._probe = self._pick_probe()

    def _decoupled(self, name: str) -> bool:
        _, config = _http_json(f"{self.process.http_base}/v2/models/{name}/config", 2.0)
        policy = config.get("model_transaction_policy", {}) if isinstance(config, dict) else {}
        return bool(policy.get("decoupled"))

    def _pick_probe(self) -> tuple[str, str, dict[str, Any]] | None:
        base = self.process.http_base
        name = self.probe_model
        if name is None:
            _, index = _http_json(f"{base}/v2/repository/index", 2.0, body={"ready": True})
            names = sorted(m["name"] for m in index or [] if m.get("state") == "READY")
            # A generative model's scorer (repository.score_model_name) runs the same ONNX
            # file; probing the generative model itself also exercises its streaming code.
            names = [
                n
                for n in names
                if not (n.endswith(SCORE_SUFFIX) and n[: -len(SCORE_SUFFIX)] in names)
            ]
            if not names:
                return None
            # A decoupled (generative) model only if the node has nothing else: its probe
            # runs the model for a token, where a unary one is a single cheap inference.
            name = min(names, key=self._decoupled)
        status, meta = _http_json(f"{base}/v2/models/{name}", 2.0)
        if status != 200:
            return None
        if self._decoupled(name):
            # HTTP /infer refuses decoupled models; Triton's generate extension streams
            # them. One token, greedy: each input a single zero (a valid id, no sampling).
            fields: dict[str, Any] = {spec["name"]: 0 for spec in meta["inputs"]}
            fields.update(max_tokens=1, temperature=0.0, top_p=1.0)
            return name, "generate_stream", fields
        body = {"inputs": [_probe_tensor(spec) for spec in meta["inputs"]]}
        return name, "infer", body

    def probe(self) -> str | None:
        """One all-zero inference on loopback; why it failed, or None if it answered."""
        if self._probe is None:
            return None
        name, route, body = self._probe
        if route == "generate_stream":
            return self._probe_stream(name, body)
        try:
            status, answer = _http_json(
                f"{self.process.http_base}/v2/models/{name}/{route}", self.probe_timeout_s, body
            )
        except (OSError, ValueError) as exc:
            return f"probe inference on {name} failed: {exc}"
        if status != 200:
            detail = answer.get("error") if isinstance(answer, dict) else answer
            return f"probe inference on {name} failed ({status}): {detail}"
        return None

    def _probe_stream(self, name: str, body: dict[str, Any]) -> str | None:
        url = f"{self.process.http_base}/v2/models/{name}/generate_stream"
        req = urllib.request.Request(  # noqa: S310 - our loopback http URL
            url, data=json.dumps(body).encode(), method="POST"
        )
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.probe_timeout_s) as resp:  # noqa: S310
                # One token then the end: a few hundred bytes; the cap bounds a broken node.
                events = resp.read(64 * 1024)
        except (OSError, ValueError) as exc:
            return f"probe stream on {name} failed: {exc}"
        if not events.startswith(b"data:") or b'"error"' in events:
            return f"probe stream on {name} failed: {events[:200]!r}"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._stop.is_set() or self.state == "failed":
                    return
                reason = self.check()
                if reason is None:
                    continue
                if not self._restart(reason):
                    return

    def _restart(self, reason: str) -> bool:
        """Restart after backoff; False once the restart budget is spent."""
        now = time.time()
        recent = [e for e in self.history if now - e.at < self.restart_window_s]
        if len(recent) >= self.max_restarts:
            # Clean up before announcing "failed": a watcher may act on the state at once.
            self.process.stop()
            self.last_reason = reason
            log.error(
                "node %s: %s; %d restarts in %.0fs already, giving up",
                self.name,
                reason,
                len(recent),
                self.restart_window_s,
            )
            self.state = "failed"
            return False
        # Reason and state first: a watcher keyed on the counter then sees all three.
        self.last_reason = reason
        self.state = "restarting"
        self.restarts += 1
        # Backoff grows with recent restarts, so a node that crashes right after every
        # successful start backs off just like one that fails to start.
        delay = min(self.backoff_s * 2 ** len(recent), self.backoff_max_s)
        log.warning("node %s: restart #%d in %.1fs: %s", self.name, self.restarts, delay, reason)
        self.process.stop()
        if self._stop.wait(delay):
            return False
        event = RestartEvent(at=time.time(), reason=reason, ok=False)
        self.history.append(event)
        try:
            event.ready_after_s = self.process.start(self.start_deadline_s)
        except NodeStartError as exc:
            log.error("node %s: restart #%d failed: %s", self.name, self.restarts, exc)
            # Stay in "restarting": the next check sees the process dead and tries again.
            return True
        event.ok = True
        self._after_start()
        self.state = "running"
        log.info("node %s: back after restart #%d", self.name, self.restarts)
        return True

    def __enter__(self) -> NodeSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
