"""Gateway side: check that a node's proof is for this request, this model, and sound.

:func:`verify_proof` returns a :class:`ZkResult` value rather than raising, in the manner of
sigstore-python's ``VerificationResult``: either success, with the outputs read from the
proof, or a failure whose ``reason`` is one of

* ``malformed``       the reply is not an ezkl proof this gateway can read;
* ``wrong_model``     the instances do not have this circuit's layout (another model);
* ``input_mismatch``  a proof for a *different input* than the request's (ezkl.verify alone
                      accepts such a proof: only this comparison catches it);
* ``bad_proof``       ezkl.verify rejects it under the registered vk/settings/SRS: forged,
                      corrupted, altered outputs, or made with other weights or another vk;
* ``artefacts``       the gateway's own vk/settings/SRS do not match the zk record: an
                      operator problem, never the node's fault.

Only ``instances`` and ``proof`` are read from the node's JSON. ezkl.verify ignores
``hex_proof`` and ``pretty_public_inputs``, so a node could put anything there; the proof is
re-serialised with just those two fields before it is verified, and that canonical form is
what ``proof_sha256`` names and what an auditor re-verifies.

ezkl work runs in :class:`ZkVerifierPool` (spawned worker processes), never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.workers import init_worker
from zk.record import VerifierArtefacts, ZkError, ZkRecord, sha256_file
from zk.tuning import softmax

log = logging.getLogger(__name__)

# BN254 scalar field modulus: every instance must be a canonical element below it.
FIELD_MODULUS = 0x30644E72E131A029B85045B68181585D2833E84879B9709143E1F593F0000001
MAX_PROOF_BYTES = 4 * 1024 * 1024

REASONS = ("malformed", "wrong_model", "input_mismatch", "bad_proof", "artefacts", "internal")


@dataclass(frozen=True)
class ZkResult:
    """The outcome of checking one proof. Truthy on success."""

    success: bool
    reason: str | None = None  # one of REASONS when not success
    detail: str = ""
    outputs: tuple[npt.NDArray[np.float32], ...] = ()
    proof_sha256: str = ""
    instances_sha256: str = ""
    canonical_proof: bytes = field(default=b"", repr=False)

    def __bool__(self) -> bool:
        return self.success

    @classmethod
    def failure(cls, reason: str, detail: str, **kw: Any) -> ZkResult:
        assert reason in REASONS
        return cls(False, reason, detail, **kw)

    @property
    def node_at_fault(self) -> bool:
        return not self.success and self.reason not in ("artefacts", "internal")


def quantise(ezkl: Any, values: npt.NDArray[Any], scale: int) -> list[str]:
    """The request input as ezkl field elements (64 hex digits, little-endian)."""
    in_type = ezkl.PyInputType.F32
    return [ezkl.float_to_felt(float(v), scale, in_type) for v in np.asarray(values).reshape(-1)]


def _canonical_felt(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) != 64:
        return None
    try:
        as_int = int.from_bytes(bytes.fromhex(value), "little")
    except ValueError:
        return None
    return value.lower() if as_int < FIELD_MODULUS else None


def _parse(proof_json: bytes, record: ZkRecord) -> tuple[list[str], list[int]] | ZkResult:
    if len(proof_json) > MAX_PROOF_BYTES:
        return ZkResult.failure("malformed", f"proof larger than {MAX_PROOF_BYTES} bytes")
    try:
        raw = json.loads(proof_json)
    except (ValueError, UnicodeDecodeError) as exc:
        return ZkResult.failure("malformed", f"proof is not JSON: {exc}")
    if not isinstance(raw, dict):
        return ZkResult.failure("malformed", "proof is not a JSON object")
    instances, proof = raw.get("instances"), raw.get("proof")
    if not isinstance(proof, list) or not proof:
        return ZkResult.failure("malformed", "proof has no 'proof' byte list")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in proof):
        return ZkResult.failure("malformed", "'proof' must be a list of bytes")
    if not isinstance(instances, list) or not all(isinstance(col, list) for col in instances):
        return ZkResult.failure("malformed", "'instances' must be a list of lists")
    if len(instances) != 1 or len(instances[0]) != record.instance_count:
        got = [len(col) for col in instances]
        return ZkResult.failure(
            "wrong_model",
            f"proof has instance columns {got}; model {record.name} v{record.version} has "
            f"[{record.instance_count}] (inputs then outputs): a proof for another circuit",
        )
    felts = [_canonical_felt(v) for v in instances[0]]
    if any(f is None for f in felts):
        return ZkResult.failure("malformed", "instances must be canonical 32-byte field elements")
    return [f for f in felts if f is not None], proof


_ezkl_module: Any = None


def _ezkl() -> Any:
    global _ezkl_module
    if _ezkl_module is None:
        import ezkl

        _ezkl_module = ezkl
    return _ezkl_module


_hash_cache: dict[tuple[str, int, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = sha256_file(path)
    return _hash_cache[key]


def verify_proof(
    proof_json: bytes,
    request_input: npt.NDArray[Any],
    record: ZkRecord,
    vk_path: Path | str,
    settings_path: Path | str,
    srs_path: Path | str,
    sealed: bool = False,
) -> ZkResult:
    """Check ``proof_json`` against this request and the registered model (see module doc).

    ``sealed``: the files are a private read-only copy hashed when it was made
    (`VerifierArtefacts.seal`), so they are not hashed again here."""
    vk, settings, srs = Path(vk_path), Path(settings_path), Path(srs_path)
    for label, path, want in (
        ()
        if sealed
        else (
            ("vk", vk, record.vk_sha256),
            ("settings", settings, record.settings_sha256),
            ("srs", srs, record.srs_sha256),
        )
    ):
        try:
            got = _cached_sha256(path)
        except OSError as exc:
            return ZkResult.failure("artefacts", f"cannot read {label} {path}: {exc}")
        if got != want:
            return ZkResult.failure("artefacts", f"{label} {path} is not the registered one")
    parsed = _parse(proof_json, record)
    if isinstance(parsed, ZkResult):
        return parsed
    felts, proof_bytes = parsed
    canonical = json.dumps(
        {"instances": [felts], "proof": proof_bytes}, separators=(",", ":")
    ).encode()
    hashes = {
        "proof_sha256": hashlib.sha256(canonical).hexdigest(),
        "instances_sha256": hashlib.sha256(
            json.dumps([felts], separators=(",", ":")).encode()
        ).hexdigest(),
    }
    ezkl = _ezkl()
    x = np.asarray(request_input)
    spec = record.inputs[0]
    if x.size != spec.size:
        return ZkResult.failure("input_mismatch", f"request input has {x.size} values", **hashes)
    try:
        expected = quantise(ezkl, x, spec.scale)
    except (OSError, RuntimeError, ValueError) as exc:  # ezkl raises OSError for inf
        return ZkResult.failure("input_mismatch", f"request input cannot be quantised: {exc}")
    if felts[: spec.size] != expected:
        differing = sum(1 for a, b in zip(felts, expected, strict=False) if a != b)
        return ZkResult.failure(
            "input_mismatch",
            f"the proof is for a different input ({differing} of {spec.size} values differ "
            "from this request's quantised input): the node answered another question",
            **hashes,
        )
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        fh.write(canonical)
        fh.flush()
        try:
            ok = ezkl.verify(fh.name, str(settings), str(vk), str(srs))
        except RuntimeError as exc:  # ezkl raises on a bad proof rather than returning False
            ok, why = False, str(exc)
        else:
            why = "ezkl.verify returned False"
    if not ok:
        return ZkResult.failure(
            "bad_proof",
            f"proof does not verify under the registered vk/settings/SRS ({why[:200]}): "
            "forged, corrupted, altered outputs, or made for other weights",
            **hashes,
        )
    outputs = dequantise_outputs(ezkl, felts, record)
    return ZkResult(True, outputs=tuple(outputs), canonical_proof=canonical, **hashes)


def dequantise_outputs(
    ezkl: Any, felts: Sequence[Any], record: ZkRecord
) -> list[npt.NDArray[np.float32]]:
    """The answer a verified proof states: its output instances dequantised, then whatever
    the record says the gateway applies (a softmax the circuit leaves out, zk/tuning.py)."""
    outputs = []
    offset = sum(t.size for t in record.inputs)
    for t in record.outputs:
        values = [ezkl.felt_to_float(f, t.scale) for f in felts[offset : offset + t.size]]
        offset += t.size
        arr = np.asarray(values, dtype=np.float64).reshape(t.shape)
        if record.postprocess.get(t.name) == "softmax":
            arr = softmax(arr)
        outputs.append(np.asarray(arr, dtype=np.float32))
    return outputs


# --------------------------------------------------------------------------- worker pool


def _worker_init(cache_dir: str, parent: int) -> None:
    init_worker(parent)
    os.environ["EZKL_REPO_PATH"] = cache_dir
    _ezkl()


def _warm() -> bool:
    return True


class ZkVerifierPool:
    """Bounded pool of spawned processes running :func:`verify_proof`.

    At most ``max_pending`` verifications are queued or running; further callers wait.
    A worker that dies (OOM, a crash in native code) breaks the pool: it is rebuilt and that
    one verification reported as a failure of the gateway, not the node.
    """

    def __init__(self, workers: int = 1, max_pending: int = 8, cache_dir: Path | None = None):
        self.workers = workers
        self.cache_dir = str(cache_dir or Path(tempfile.gettempdir()) / "ztgate-ezkl")
        self._sem = asyncio.Semaphore(max_pending)
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(self.cache_dir, os.getpid()),
        )

    async def warm(self) -> None:
        """Start the workers now (first spawn + ezkl import is ~1 s) instead of on a request."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, _warm) for _ in range(self.workers))
        )

    async def verify(
        self, proof_json: bytes, request_input: npt.NDArray[Any], artefacts: VerifierArtefacts
    ) -> ZkResult:
        async with self._sem:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    self._pool,
                    verify_proof,
                    proof_json,
                    np.asarray(request_input),
                    artefacts.record,
                    artefacts.vk,
                    artefacts.settings,
                    artefacts.srs,
                    artefacts.sealed,
                )
            except BrokenProcessPool as exc:
                log.error("zk verifier worker died; rebuilding the pool")
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                return ZkResult.failure("internal", f"verifier worker died: {exc}")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


__all__ = [
    "REASONS",
    "ZkError",
    "ZkResult",
    "ZkVerifierPool",
    "dequantise_outputs",
    "quantise",
    "verify_proof",
]
