"""The dealer: CrypTen's trusted third party, run by the gateway, never on a node.

It hands each party a PRG seed (so each can generate its own share of every tuple
locally) and answers party 0's requests with party 0's share of each product tuple,
exactly as CrypTen's ``TTPServer`` does, but over mutual TLS with fixed frames (JSON
requests holding only a function name and sizes; int64 tensor replies). It sees the
sizes of the computation and the tuples it made; it never receives a share of any input,
weight or output, and never any opened value.

Started by `mpc.session.MpcSession` as ``python -m mpc.dealer`` with its plan as one JSON
line on stdin; it prints ``{"port": N}`` on stdout and exits when any party disconnects,
when stdin closes (the gateway went away), or on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpc.crypten_shim import configure, crypten_ttp
from mpc.plans import DealerPlan
from mpc.tls import Credentials, IdentityError, TrustStore, peer_identity, server_context
from mpc.wire import WireError, encode_json, encode_tensor, read_frame

log = logging.getLogger("mpc.dealer")

MAX_ELEMENTS = 1 << 24
TTP_FUNCTIONS = ("additive", "square", "binary", "wraps", "B2A")


class Tuples(crypten_ttp.TTPServer):  # type: ignore[misc]
    """CrypTen's TTP arithmetic without its torch.distributed plumbing."""

    def __init__(self, seeds: list[int], record: Path | None = None) -> None:
        # TTPServer.__init__ would call crypten.init() and block on gloo: not called.
        self.generators = [torch.Generator(device="cpu") for _ in seeds]
        for g, s in zip(self.generators, seeds, strict=True):
            g.manual_seed(s)
        self.generators_cuda = [None for _ in seeds]
        self.device = "cpu"
        self._record = record.open("ab") if record is not None else None

    def _get_additive_PRSS(self, size: Any, remove_rank: bool = False) -> torch.Tensor:
        result: torch.Tensor = super()._get_additive_PRSS(size, remove_rank=remove_rank)
        if self._record is not None and not remove_rank:
            # Test aid: the plaintext masks this dealer knows (a, b, r, ...).
            self._record.write(result.numpy().astype("<i8").tobytes())
        return result

    def answer(self, req: dict[str, Any]) -> torch.Tensor:
        f = req.get("f")
        if f not in TTP_FUNCTIONS:
            raise WireError(f"unknown dealer function {f!r}")
        if f == "additive":
            op = req.get("op")
            if op not in ("mul", "matmul"):
                raise WireError(f"unsupported Beaver op {op!r}")
            out: torch.Tensor = self.additive(_size(req["size0"]), _size(req["size1"]), op)
        elif f == "binary":
            out = self.binary(_size(req["size0"]), _size(req["size1"]))
        else:
            out = getattr(self, f)(_size(req["size"]))
        return out

    def close(self) -> None:
        if self._record is not None:
            self._record.close()


def _size(raw: Any) -> torch.Size:
    if not isinstance(raw, list) or len(raw) > 8:
        raise WireError("a size is a list of at most 8 dimensions")
    n = 1
    for d in raw:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise WireError("dimensions are non-negative integers")
        n *= d
    if n > MAX_ELEMENTS:
        raise WireError(f"tuple of {n} elements refused")
    return torch.Size(raw)


async def serve(plan: DealerPlan, stdin_eof: asyncio.Event | None = None) -> int:
    configure()
    torch.set_num_threads(1)
    k = len(plan.parties)
    seeds = [secrets.randbits(63) for _ in range(k)]
    record = None
    if plan.record_dir is not None:
        plan.record_dir.mkdir(parents=True, exist_ok=True)
        record = plan.record_dir / "dealer-masks.bin"
    tuples = Tuples(seeds, record)
    creds = Credentials(plan.cert, plan.key, TrustStore(plan.node_ca))
    links: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    everyone = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            spiffe = peer_identity(
                writer.get_extra_info("ssl_object"), creds.trust, plan.trust_domain, as_server=True
            )
            hello = (await read_frame(reader, time.monotonic() + 5.0)).json()
            rank = hello.get("rank")
            if hello.get("type") != "party" or hello.get("session") != plan.session:
                raise IdentityError(f"{spiffe}: not a party of this session")
            if not isinstance(rank, int) or not 0 <= rank < k or plan.parties[rank] != spiffe:
                raise IdentityError(f"{spiffe} is not rank {rank} of this session")
            if rank in links:
                raise IdentityError(f"rank {rank} is already connected")
        except (
            IdentityError,
            WireError,
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
        ) as exc:
            log.warning("dealer refused a connection: %s", exc)
            with contextlib.suppress(Exception):
                writer.write(encode_json({"type": "rejected", "reason": str(exc)[:200]}))
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.close()
            return
        links[rank] = (reader, writer)
        writer.write(encode_json({"type": "welcome"}))
        writer.write(encode_tensor(np.array(seeds[rank], dtype=np.int64)))
        if len(links) == k:
            everyone.set()

    server = await asyncio.start_server(
        accept, plan.host, plan.port, ssl=server_context(creds), ssl_handshake_timeout=5.0
    )
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    stop = stdin_eof or asyncio.Event()
    try:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        ready: asyncio.Future[Any] = asyncio.ensure_future(everyone.wait())
        done, _ = await asyncio.wait(
            {waiter, ready}, timeout=plan.setup_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            log.warning("dealer: parties did not all connect; exiting")
            return 1
        watchers: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(links[r][0].read(1)) for r in range(1, k)
        ]
        reader0, writer0 = links[0]
        while True:
            req_task: asyncio.Future[Any] = asyncio.ensure_future(read_frame(reader0, None))
            done, _ = await asyncio.wait(
                {req_task, waiter, *watchers}, return_when=asyncio.FIRST_COMPLETED
            )
            if req_task not in done:
                req_task.cancel()
                log.info("dealer: a party left or the gateway stopped; exiting")
                return 0
            req = req_task.result().json()
            if req.get("type") != "tuple":
                raise WireError(f"unexpected dealer request {req.get('type')!r}")
            writer0.write(encode_tensor(tuples.answer(req).numpy()))
    except (asyncio.IncompleteReadError, ConnectionError):
        log.info("dealer: party 0 left; exiting")
        return 0
    except Exception as exc:  # a malformed request ends the session, never hangs it
        log.warning("dealer: %r; exiting", exc)
        return 1
    finally:
        tuples.close()
        for _, w in links.values():
            w.close()
        server.close()


async def _main_async(plan: DealerPlan) -> int:
    loop = asyncio.get_running_loop()
    eof = asyncio.Event()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the gateway closed our stdin or died
        loop.call_soon_threadsafe(eof.set)

    loop.run_in_executor(None, watch_stdin)
    return await serve(plan, eof)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    line = sys.stdin.buffer.readline()
    plan = DealerPlan.from_json(json.loads(line))
    rc = asyncio.run(_main_async(plan))
    os._exit(rc)  # the stdin watcher thread may still block in read()


if __name__ == "__main__":
    sys.exit(main())
