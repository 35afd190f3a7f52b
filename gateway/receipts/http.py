"""Read endpoints of the receipt logs, as a Starlette `Router` the gateway mounts.

    GET /log                                      this replica's logs, with their keys
    GET /log/{log_id}/checkpoint                  latest signed checkpoint (text/plain)
    GET /log/{log_id}/inclusion?receipt=ID        C2SP tlog-proof for the receipt
                                                  (202 JSON {"status": "pending"} if no
                                                  checkpoint includes it yet)
    GET /log/{log_id}/consistency?first=A&second=B   base64 proof lines (text/plain)

Answers contain hashes, signatures and sizes only, never receipt bodies; who may read
them is the mounting app's decision (the gateway mounts them behind mTLS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, Router

from gateway.protocol.problems import BadRequest, NotFound, problem_response
from gateway.receipts.canonical import b64
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import FormatError, parse_receipt_id
from gateway.receipts.note import Checkpoint

__all__ = ["log_routes"]


def _problem(status: int, detail: str) -> Response:
    """The gateway's own problem types, so log endpoints answer like every other route."""
    return problem_response(NotFound(detail) if status == 404 else BadRequest(detail))


def log_routes(logs: Callable[[], Sequence[ReceiptLog]] | ReceiptLog) -> Router:
    """Routes over the replica's logs: the active one, and any frozen predecessors.

    `logs` is the active `ReceiptLog`, or a callable returning every log to serve.
    """

    def all_logs() -> Sequence[ReceiptLog]:
        return [logs] if isinstance(logs, ReceiptLog) else logs()

    def find(log_id: str) -> ReceiptLog | None:
        return next((rl for rl in all_logs() if rl.log_id == log_id), None)

    async def index(_request: Request) -> Response:
        return JSONResponse({"logs": [rl.describe() for rl in all_logs()]})

    async def checkpoint(request: Request) -> Response:
        rl = find(request.path_params["log_id"])
        if rl is None:
            return _problem(404, "unknown log")
        note = rl.latest_checkpoint()
        if note is None:
            return _problem(404, "no checkpoint yet")
        return PlainTextResponse(note.render())

    async def inclusion(request: Request) -> Response:
        rl = find(request.path_params["log_id"])
        if rl is None:
            return _problem(404, "unknown log")
        rid = request.query_params.get("receipt", "")
        try:
            log_id, index = parse_receipt_id(rid)
        except FormatError:
            return _problem(400, "malformed receipt id")
        if log_id != rl.log_id or index >= rl.size:
            return _problem(404, "no such receipt in this log")
        body = rl.body(rid)
        erased = rl.erased_at(index) is not None
        if body is None and not erased:
            return _problem(404, "no such receipt in this log")
        proof = rl.proof(index)
        if proof is None:
            return JSONResponse({"status": "pending", "index": index}, status_code=202)
        return PlainTextResponse(proof)

    async def consistency(request: Request) -> Response:
        rl = find(request.path_params["log_id"])
        if rl is None:
            return _problem(404, "unknown log")
        q = request.query_params
        first, second = q.get("first", ""), q.get("second", "")
        # ASCII digits only ("²".isdigit() is true), and short enough for int().
        if not all(v.isascii() and v.isdigit() and len(v) <= 18 for v in (first, second)):
            return _problem(400, "first and second must be tree sizes")
        a, b = int(first), int(second)
        last = rl.latest_checkpoint()
        top = Checkpoint.parse_text(last.text).size if last else 0
        if not a <= b <= top:
            return _problem(400, f"sizes must satisfy first <= second <= {top}")
        return PlainTextResponse("".join(f"{b64(h)}\n" for h in rl.consistency(a, b)))

    return Router(
        routes=[
            Route("/log", index, methods=["GET"]),
            Route("/log/{log_id}/checkpoint", checkpoint, methods=["GET"]),
            Route("/log/{log_id}/inclusion", inclusion, methods=["GET"]),
            Route("/log/{log_id}/consistency", consistency, methods=["GET"]),
        ]
    )
