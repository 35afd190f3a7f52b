"""Mode `zk`: the node computes the answer and an ezkl proof of it; the gateway only verifies.

Per request:

1. The model's zk record (``zk.json``) is looked up by the registry entry's SHA-256, so a
   proof is only ever checked against the artefacts onboarded for exactly these bytes.
2. The request must be one finite row of the circuit's input shape (circuits have a fixed
   batch of 1); anything else is the client's error (400), before any node is called.
3. A node is picked among those the router would use for the model (the signed facts and
   the policy decision) that report ``<name>-zk`` ready themselves (zk/capability.py: the
   node's word only narrows that set), and asked for the ``proof`` output only of model
   ``<name>-zk``.
4. The proof is checked in the verifier pool (zk/verifier.py): structure, the input
   instances equal the gateway's own quantisation of the request, ezkl.verify with the
   registered vk/settings/SRS.
5. The answer is the dequantised output instances of the verified proof, never a tensor the
   node sent alongside it.

A missing, malformed or failing proof is the node's failure. The mode runs in the router's
one attempt loop (``Router.infer``) with the proof check as its per-reply check: a refused
proof is charged to the node like a transport error and the request moves to the next
candidate. Proving takes seconds, so the mode passes its own per-try timeout and keeps
proving time out of the latency EWMA that plain requests are balanced by.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gateway.config import NodeConfig
from gateway.job import Job, Outcome
from gateway.protocol.problems import (
    Forbidden,
    Internal,
    InvalidTensor,
    NoHealthyNode,
    UpstreamFailed,
)
from gateway.protocol.tensors import RequestedOutput, Tensor
from gateway.registry import TensorSpec
from gateway.routing.node_client import NodeError
from gateway.routing.router import Call
from gateway.telemetry import PROCESS_METRICS, timed
from zk.capability import ProverCapability
from zk.record import VerifierArtefacts
from zk.verifier import ZkResult, ZkVerifierPool

if TYPE_CHECKING:
    from gateway.routing.router import Router

log = logging.getLogger(__name__)

PROOF_OUTPUT = "proof"


class ZkVerification:
    mode = "zk"

    def __init__(
        self,
        artefacts: Mapping[str, VerifierArtefacts],
        pool: ZkVerifierPool,
        *,
        prove_timeout_s: float = 120.0,
        max_attempts: int = 3,
        node_filter: Callable[[NodeConfig], bool] | None = None,
        capability: ProverCapability | None = None,
    ) -> None:
        """``artefacts`` maps a registered model's SHA-256 to its verifier artefacts."""
        self.artefacts = dict(artefacts)
        self.pool = pool
        self.capability = capability or ProverCapability()
        self.prove_timeout_s = prove_timeout_s
        self.max_attempts = max_attempts
        self.node_filter = node_filter
        for digest, found in self.artefacts.items():
            if found.record.model_sha256 != digest:
                raise ValueError(f"zk artefacts for {found.record.name} are keyed by {digest}")

    @classmethod
    def from_dirs(
        cls,
        dirs: Iterable[Path | str],
        pool: ZkVerifierPool,
        seal_into: Path | None = None,
        **kw: Any,
    ) -> ZkVerification:
        """From onboarding output directories: each is copied into a private read-only
        directory (under ``seal_into``, else the system's temp dir), the copy hash-checked
        once against its zk.json, and only the copy used from then on."""
        found = [VerifierArtefacts.from_dir(Path(d)).seal(seal_into) for d in dirs]
        return cls({a.record.model_sha256: a for a in found}, pool, **kw)

    async def run(self, job: Job, router: Router) -> Outcome:
        entry = job.entry
        artefacts = self.artefacts.get(entry.sha256)
        if artefacts is None:
            raise Forbidden(f"model {entry.name!r} v{entry.version} has no zk artefacts here")
        record = artefacts.record
        row = self._request_row(job.inputs, artefacts)
        zk_name = record.zk_model_name
        extra = self.node_filter

        def admitted(node: NodeConfig) -> bool:
            # What the signed facts and the decision allow for this request: only these
            # nodes are asked whether they can prove, so a claim can never widen it.
            return job.allowed(node) and node.serves(entry.name) and (extra is None or extra(node))

        capable = await self.capability.ready(
            router.nodes.values(), zk_name, record.version, admitted
        )
        if not capable:
            raise NoHealthyNode(
                f"no node that policy allows for {entry.name!r} reports its prover "
                f"({zk_name}) ready",
                retry_after=1,
            )

        def provers(node: NodeConfig) -> bool:
            return node.name in capable and admitted(node)

        async def proven(outputs: list[Tensor]) -> ZkResult:
            return await self._check(outputs, row, artefacts)

        try:
            routed = await router.infer(
                job,
                only=provers,
                call=Call(zk_name, entry.version, (PROOF_OUTPUT,)),
                check=proven,
                per_try_timeout_s=self.prove_timeout_s,
                max_attempts=self.max_attempts,
                learn_latency=False,
            )
        except NoHealthyNode as exc:
            raise NoHealthyNode(
                f"no healthy zk-capable node may serve {entry.name!r} now", retry_after=1
            ) from exc
        except UpstreamFailed as exc:
            raise UpstreamFailed(
                f"no zk-capable node returned a valid proof: {exc.detail}"
            ) from exc
        result: ZkResult = routed.checked
        if record.dev_srs:
            log.warning(
                "DEV-ONLY: zk proof for %s verified under a locally generated SRS; "
                "whoever generated it could forge proofs",
                entry.name,
            )
        return Outcome(
            outputs=self._outputs(entry.outputs, job.outputs, artefacts, result),
            nodes=(routed.node.name,),
            mode=self.mode,
            status="verified",
            attempts=routed.attempts,
            evidence={
                **record.evidence(),
                "proof_sha256": result.proof_sha256,
                "instances_sha256": result.instances_sha256,
                "proof": result.canonical_proof.decode("ascii"),
                # Kept beside the log (not in the receipt) so audit bundles can carry
                # what an auditor needs to re-verify the proof offline.
                # name -> (path, sha256): hashed when the artefacts were loaded, not per answer.
                "verification_material": artefacts.material(),
            },
        )

    async def _check(
        self,
        outputs: list[Tensor],
        row: npt.NDArray[np.float32],
        artefacts: VerifierArtefacts,
    ) -> ZkResult:
        """The verified result; NodeError when the node's reply is refused (it is at fault).
        An unavailable verifier is the gateway's fault: Internal, and no node is charged."""
        proofs = [t for t in outputs if t.name == PROOF_OUTPUT]
        if len(outputs) != 1 or len(proofs) != 1 or proofs[0].datatype != "BYTES":
            raise NodeError("reply", f"reply is not one BYTES {PROOF_OUTPUT!r} tensor")
        if proofs[0].data.size != 1 or not isinstance(proofs[0].data.reshape(-1)[0], bytes):
            raise NodeError("reply", f"{PROOF_OUTPUT!r} must hold exactly one element")
        proof = proofs[0].data.reshape(-1)[0]
        with timed("zk_proof_verify", PROCESS_METRICS.proof_seconds):
            result = await self.pool.verify(proof, row, artefacts)
        if result.success:
            return result
        if not result.node_at_fault:
            raise Internal(f"zk verifier unavailable: {result.detail}")
        raise NodeError("reply", f"{result.reason}: {result.detail}")

    @staticmethod
    def _request_row(
        inputs: tuple[Tensor, ...], artefacts: VerifierArtefacts
    ) -> npt.NDArray[np.float32]:
        spec = artefacts.record.inputs[0]
        if len(inputs) != 1 or inputs[0].name != spec.name:
            raise InvalidTensor(f"zk mode takes exactly one input {spec.name!r}")
        data = inputs[0].data
        if tuple(data.shape) != spec.shape:
            raise InvalidTensor(
                f"zk mode proves one row at a time: input {spec.name!r} must have shape "
                f"{list(spec.shape)}, got {list(inputs[0].shape)}"
            )
        if data.dtype.kind != "f" or not np.isfinite(data).all():
            raise InvalidTensor("zk mode takes finite floating-point inputs only")
        return np.ascontiguousarray(data, dtype=np.float32)

    @staticmethod
    def _outputs(
        specs: tuple[TensorSpec, ...],
        requested: tuple[RequestedOutput, ...],
        artefacts: VerifierArtefacts,
        result: ZkResult,
    ) -> tuple[Tensor, ...]:
        proven = {t.name: v for t, v in zip(artefacts.record.outputs, result.outputs, strict=True)}
        want = {r.name for r in requested} or {s.name for s in specs}
        tensors = []
        for spec in specs:
            if spec.name not in want:
                continue
            if spec.name not in proven:
                raise Internal(f"zk record proves no output {spec.name!r}")
            arr = np.asarray(proven[spec.name], dtype=np.float32)
            tensors.append(Tensor(spec.name, "FP32", tuple(arr.shape), arr))
        return tuple(tensors)
