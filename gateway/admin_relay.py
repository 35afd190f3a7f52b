"""The admin port of a replica served by several processes (gateway/supervisor.py).

Each worker serves its own admin app (`gateway.app.build_admin`) on a private unix socket,
`<data_dir>/run/w<i>.sock` in a 0700 directory; the supervisor alone listens on the admin
port and answers for the whole replica, so a probe or a scrape no longer says whichever
worker took the connection:

- live (`/v2/health/live`, `/healthz`): the supervisor runs and a worker process is alive;
- ready (`/v2/health/ready`, `/readyz`): every worker answers ready on its socket, else
  503 with how many did;
- `/metrics`: every worker's exposition, each sample labelled `worker="<i>"`, and the
  supervisor's own (restarts, workers alive, scrapes that failed).

Every worker is asked at once, each fetch under a timeout and a size cap; a worker that
does not answer in time is skipped (and counted), never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import ConfigError

READY_TIMEOUT_S = 0.5  # under a kubelet probe's default timeout (1 s)
METRICS_TIMEOUT_S = 2.0  # under Prometheus' default scrape timeout (10 s)
MAX_RESPONSE_BYTES = 8 << 20  # one worker's exposition; a few hundred kB in practice
MAX_CONNECTIONS = 32  # probes and scrapes at once, all clients together
RUN_DIR = "run"


class RunDir:
    """`<data_dir>/run`: the workers' admin sockets, reachable by this user only.

    Sockets are bound and reached through the directory's descriptor
    (`/proc/self/fd/<fd>/w<i>.sock`): a unix socket address holds 107 bytes, a data dir's
    path may be longer, and the descriptor pins the directory checked here."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / RUN_DIR
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            raise ConfigError(f"{path}: owned by another user; remove it")
        os.fchmod(fd, 0o700)  # an existing directory may have been left wider
        self.fd = fd

    def address(self, index: int) -> str:
        return f"/proc/self/fd/{self.fd}/w{index}.sock"

    def bind(self, index: int) -> socket.socket:
        """Worker `index`'s admin socket; the supervisor holds it across restarts, so a
        fetch during one waits in the backlog (and times out) rather than failing."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"w{index}.sock", dir_fd=self.fd)  # a previous run's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.address(index))
        sock.listen(64)
        return sock

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


async def fetch(address: str, path: str, timeout_s: float) -> tuple[int, bytes] | None:
    """GET `path` from a worker's admin socket: (status, body), or None when the worker
    does not answer within `timeout_s`, answers more than the cap, or not in HTTP."""
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(address)
            try:
                # HTTP/1.0: the worker closes after its answer, and never chunks it.
                writer.write(f"GET {path} HTTP/1.0\r\nConnection: close\r\n\r\n".encode())
                while chunk := await reader.read(65536):
                    buf += chunk
                    if len(buf) > MAX_RESPONSE_BYTES:
                        return None
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]), body


def merge(expositions: Iterable[tuple[int, list[Metric]]]) -> list[Metric]:
    """The workers' parsed expositions as one: each family once (its first HELP and TYPE),
    each sample labelled with its worker."""
    out: dict[str, Metric] = {}
    for index, families in expositions:
        worker = str(index)
        for family in families:
            into = out.get(family.name)
            if into is None:
                into = out[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            elif into.type != family.type:
                continue  # a worker of another version mid-upgrade: keep the first's type
            into.samples.extend(
                s._replace(labels={**s.labels, "worker": worker}) for s in family.samples
            )
    return list(out.values())


class _Exposition(Collector):
    def __init__(self, *parts: Iterable[Metric]) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part


class AdminRelay:
    """The replica's admin app, served by the supervisor.

    `addresses`: each worker's admin socket, by index; `alive()`: how many worker
    processes exist; `serving(i)`: worker `i` runs and said it listens (one restarting is
    not asked)."""

    def __init__(
        self,
        addresses: list[str],
        alive: Callable[[], int],
        serving: Callable[[int], bool],
    ) -> None:
        self.addresses = addresses
        self.alive = alive
        self.serving = serving
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "ztgate_worker_restarts",
            "Worker processes of this replica restarted after they died",
            registry=self.registry,
        )
        Gauge(
            "ztgate_workers_alive", "Worker processes of this replica alive", registry=self.registry
        ).set_function(lambda: float(self.alive()))
        self.scrape_failures = Counter(
            "ztgate_metrics_scrape_failures",
            "Workers left out of a /metrics answer: not serving, no answer in time, too large",
            ["worker"],
            registry=self.registry,
        )

    async def _ask(self, path: str, timeout_s: float) -> list[tuple[int, bytes] | None]:
        async def one(index: int) -> tuple[int, bytes] | None:
            if not self.serving(index):
                return None
            return await fetch(self.addresses[index], path, timeout_s)

        return await asyncio.gather(*(one(i) for i in range(len(self.addresses))))

    async def live(self, _: Request) -> Response:
        return Response(status_code=200 if self.alive() > 0 else 503)

    async def ready(self, _: Request) -> Response:
        got = await self._ask("/v2/health/ready", READY_TIMEOUT_S)
        ready = sum(1 for g in got if g is not None and g[0] == 200)
        if ready == len(got):
            return Response(status_code=200)
        return JSONResponse({"workers": len(got), "ready": ready}, status_code=503)

    async def metrics(self, _: Request) -> Response:
        got = await self._ask("/metrics", METRICS_TIMEOUT_S)
        parsed = []
        for index, answer in enumerate(got):
            # Parsed on the loop, not in a thread: the supervisor keeps one thread to fork
            # safely, and the size cap bounds the work.
            try:
                if answer is None or answer[0] != 200:
                    raise ValueError("no exposition")
                # Parsed whole first: a malformed one adds nothing half-way.
                parsed.append((index, list(text_string_to_metric_families(answer[1].decode()))))
            except Exception:  # one worker's bad answer must not cost the others' samples
                self.scrape_failures.labels(str(index)).inc()
        exposition = generate_latest(_Exposition(self.registry.collect(), merge(parsed)))
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v2/health/live", self.live),
                Route("/v2/health/ready", self.ready),
                Route("/healthz", self.live),
                Route("/readyz", self.ready),
                Route("/metrics", self.metrics),
            ]
        )

    def server(self, graceful_shutdown_s: int) -> uvicorn.Server:
        config = uvicorn.Config(
            self.app(),
            http="httptools",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            lifespan="off",
            log_config=None,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_graceful_shutdown=graceful_shutdown_s,
        )
        server = uvicorn.Server(config)
        # The supervisor owns the signals (it drains the workers first).
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        return server


def connection_fds(server: uvicorn.Server) -> list[int]:
    """The descriptors of the connections `server` holds now (see `Supervisor.spawn`)."""
    out = []
    for conn in list(server.server_state.connections):
        transport = getattr(conn, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            out.append(sock.fileno())
    return out
