"""The jobs API: submit a request the sync routes take, then poll for its answer.

    POST /v2/models/{name}[/versions/{v}]/jobs            body: a KServe v2 infer request
    POST /v2/models/{name}[/versions/{v}]/generate/jobs   body: a generate request
    GET  /v2/jobs/{id}                                    status, and the answer when done
    GET  /v2/jobs/{id}/result                             the answer, byte for byte

Submit needs an `Idempotency-Key`: a client retrying over a flapping link gets the same
job back, never a second one. No callback URLs: the gateway never calls out for a client.
A job is visible only to the identity that submitted it; to anyone else it does not exist
(404, as for an unknown id, so ids are no oracle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.generate.ask import parse
from gateway.generate.session import is_generative
from gateway.jobs.model import Conflict, Full, JobRow, NewJob
from gateway.jobs.seal import seal, seal_result, verify
from gateway.pipeline.context import Incoming, body_of
from gateway.pipeline.decode import read_body
from gateway.protocol.problems import (
    BadRequest,
    IdempotencyConflict,
    Internal,
    NotFound,
    RateLimited,
    StateUnavailable,
)

if TYPE_CHECKING:
    from gateway.jobs import JobService

__all__ = ["JobRoutes", "job_routes"]

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

KEY_HEADER = "idempotency-key"
# What a key may be: what a client library generates (UUIDs, ULIDs, base64url), bounded.
_KEY = re.compile(r"[A-Za-z0-9._:~+/=-]{1,128}")
_JOB_ID = re.compile(r"[0-9a-f]{32}")
# The request headers the sync routes read that a job keeps; the rest are dropped: the
# deadline and nonce headers speak of the submit, not the run.
CARRIED = ("content-type", "inference-header-content-length")
RETRY_AFTER_FULL_S = 5


def job_view(row: JobRow) -> dict[str, Any]:
    """What a poll answers. The finished answer is the sync route's, with its receipt."""
    view: dict[str, Any] = {
        "id": row.id,
        "status": row.state,
        "model": row.model,
        "created": row.created,
        "updated": row.updated,
        "attempts": row.attempts,
        "node_executions": row.executions,
    }
    if row.state in ("done", "failed") and row.result is not None:
        view["http_status"] = row.status
        view["result"] = f"/v2/jobs/{row.id}/result"
        view["receipt_id"] = row.receipt_id
        if "ztgate-receipt" in row.result_headers:
            view["receipt"] = row.result_headers["ztgate-receipt"]
        if "inference-header-content-length" not in row.result_headers and row.result_headers.get(
            "content-type", ""
        ).startswith(("application/json", "application/problem+json")):
            view["response"] = json.loads(row.result)
    return view


class JobRoutes:
    def __init__(self, service: JobService) -> None:
        self.service = service

    async def submit(self, request: Request, generate: bool) -> Response:
        service, gw = self.service, self.service.gw
        params = request.path_params
        name, version = params["name"], params.get("version")
        caller = request.state.caller
        # As the sync route does: an unknown model 404, no permit for this caller 403.
        entry = gw.catalog.entry(name, version)
        gw.pipeline.pre_policy(caller, entry)  # a caller with no permit fills no queue
        key = request.headers.get(KEY_HEADER)
        if key is None or not _KEY.fullmatch(key):
            raise BadRequest(
                "a job needs an Idempotency-Key header: 1-128 characters of "
                "A-Z a-z 0-9 . _ : ~ + / = -"
            )
        limits = gw.cfg.limits
        most = limits.max_json_bytes if generate else limits.max_body_bytes
        body = await read_body(request.headers, request.stream(), most)
        headers = {k: v for k in CARRIED if (v := request.headers.get(k)) is not None}
        # A request the sync route would refuse gets its 400 now, not a failed job later.
        if generate:
            ask = parse(
                "triton", body, model=name, default_max_tokens=gw.cfg.generate.default_max_tokens
            )
            if not is_generative(entry):
                raise BadRequest(f"{entry.name!r} is not a generative model: submit to /jobs")
            if ask.stream:
                raise BadRequest("a job's answer is whole: leave parameters.stream unset")
        else:
            came = Incoming(request.scope, Headers(headers), body_of(body), name, version)
            await gw.pipeline.decode(came, caller, entry)
        # Registered names only: this becomes the path the job runs on.
        route = f"/v2/models/{entry.name}" + (f"/versions/{entry.version}" if version else "")
        route += "/generate" if generate else "/infer"
        digest = hashlib.sha256()
        for part in (route.encode(), headers.get("inference-header-content-length", "").encode()):
            digest.update(part + b"\0")
        digest.update(body)
        tls = request.scope.get("extensions", {}).get("tls") or {}
        cert = tls.get("client_cert_chain", [None])[0]
        if not isinstance(cert, str):  # the identity stage saw one: this is a bug
            raise RuntimeError("no client certificate in an authenticated request")
        store = service.store
        if store is None:
            raise StateUnavailable("the job store is not open yet", retry_after=1)
        new_id, owner, created = secrets.token_hex(16), caller.identity.spiffe_id, time.time()
        try:
            mac = seal(
                service.key,
                job_id=new_id,
                owner=owner,
                route=route,
                model=entry.name,
                created=created,
                cert=cert,
                headers=headers,
                body=body,
            )
            job = NewJob(
                id=new_id,
                owner=owner,
                key=key,
                digest=digest.hexdigest(),
                route=route,
                model=entry.name,
                created=created,
                cert=cert,
                headers=headers,
                body=body,
                mac=mac,
            )
            cfg = service.cfg
            sub = await store.submit(job, cfg.max_open_per_identity, cfg.max_open)
        except Conflict as exc:
            raise IdempotencyConflict(
                "this Idempotency-Key was used for a different request",
                extra={"job_id": str(exc)},
            ) from exc
        except Full as exc:
            cap = (
                f"at most {service.cfg.max_open_per_identity} open jobs per client"
                if exc.scope == "identity"
                else "this gateway holds as many open jobs as it may"
            )
            raise RateLimited(cap, retry_after=RETRY_AFTER_FULL_S) from exc
        if sub.created:
            service.metrics.submitted.inc()
            if service.runner is not None:
                service.runner.wake.set()
        row = await store.get(sub.id)
        if row is None:  # erased between the two calls
            raise NotFound("no such job")
        location = f"/v2/jobs/{sub.id}"
        return JSONResponse(
            job_view(row),
            status_code=202 if sub.created else 200,
            headers={"location": location},
        )

    async def _mine(self, request: Request) -> JobRow:
        job_id = request.path_params["job_id"]
        store = self.service.store
        row = None
        if store is not None and _JOB_ID.fullmatch(job_id):
            row = await store.get(job_id)
        if row is None or row.owner != request.state.identity.spiffe_id:
            raise NotFound("no such job")  # the same for another client's job
        if row.state in ("done", "failed") and not self._answer_sealed(row):
            # Not the answer this gateway recorded for this job (swapped in, or turned
            # into a failure, by someone who can write the store): never shown.
            log.error("job %s: its stored answer does not verify against the job key", row.id)
            raise Internal("a job's stored answer does not verify")
        return row

    def _answer_sealed(self, row: JobRow) -> bool:
        if row.result is None or row.status is None:
            return False
        expected = seal_result(
            self.service.key,
            job_id=row.id,
            state=row.state,
            status=row.status,
            headers=row.result_headers,
            result=row.result,
            receipt_id=row.receipt_id,
        )
        return verify(expected, row.mac)

    async def status(self, request: Request) -> Response:
        return JSONResponse(job_view(await self._mine(request)))

    async def result(self, request: Request) -> Response:
        row = await self._mine(request)
        if row.state not in ("done", "failed") or row.result is None or row.status is None:
            raise NotFound("this job has no answer yet")
        return Response(row.result, status_code=row.status, headers=row.result_headers)


def job_routes(service: JobService) -> list[tuple[str, Handler, list[str], str]]:
    """(path, handler, methods, name) rows for the app to put behind identity and admission."""
    r = JobRoutes(service)

    async def infer_job(request: Request) -> Response:
        return await r.submit(request, generate=False)

    async def generate_job(request: Request) -> Response:
        return await r.submit(request, generate=True)

    rows: list[tuple[str, Handler, list[str], str]] = []
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        rows.append((base + "/jobs", infer_job, ["POST"], "job_submit"))
        rows.append((base + "/generate/jobs", generate_job, ["POST"], "job_submit"))
    rows.append(("/v2/jobs/{job_id}", r.status, ["GET"], "job_status"))
    rows.append(("/v2/jobs/{job_id}/result", r.result, ["GET"], "job_result"))
    return rows
