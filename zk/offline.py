"""Re-verifying a zk receipt's proof offline, from an audit bundle alone.

Registered with `ztgate verify` (`gateway.receipts.verify.register_proof_verifier`). The
bundle carries, beside the receipt, the proof the gateway verified and the verification
material (zk record, vk, settings, SRS). This checks that the material is what the receipt
names (its hashes), that the proof is the one the receipt names, and runs the same check
the gateway ran: the proof verifies under that vk, and its public inputs are the inputs it
claims (the inputs are public instances, so the proof itself carries them).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gateway.receipts.model import Receipt
from gateway.receipts.signing import Verdict
from zk.record import ZkError, ZkRecord
from zk.verifier import _ezkl, _parse, verify_proof

MATERIAL = ("proof.json", "zk.json", "vk", "settings.json", "srs")


def verify_zk_evidence(
    receipt: Receipt, evidence: Mapping[str, bytes], *, allow_dev_srs: bool = False
) -> Verdict:
    """`allow_dev_srs` accepts proofs under a locally generated SRS: for a dev cluster
    only, since whoever generated that SRS can forge any proof."""
    rid = receipt.receipt_id
    files = {name: evidence.get(f"{rid}.{name}") for name in MATERIAL}
    missing = [name for name, data in files.items() if not data]
    if missing:
        return Verdict.failure("zk-evidence-missing", f"bundle lacks {', '.join(missing)}")
    got = {name: data for name, data in files.items() if data is not None}
    ext = receipt.extensions
    verification = receipt.verification
    if verification is None or verification.proof_sha256 is None:
        return Verdict.failure("zk-evidence-mismatch", "the receipt names no proof")
    if hashlib.sha256(got["proof.json"]).hexdigest() != verification.proof_sha256:
        return Verdict.failure("zk-evidence-mismatch", "the proof is not the one the receipt names")
    for name, key in (
        ("vk", "vk_sha256"),
        ("settings.json", "settings_sha256"),
        ("srs", "srs_sha256"),
    ):
        if ext.get(key) != hashlib.sha256(got[name]).hexdigest():
            return Verdict.failure("zk-evidence-mismatch", f"{name} is not what the receipt names")
    try:
        record = ZkRecord.from_json(json.loads(got["zk.json"]))
    except (ValueError, ZkError) as exc:
        return Verdict.failure("zk-evidence-mismatch", f"bad zk record: {exc}")
    if receipt.model is not None and record.model_sha256 != receipt.model.sha256:
        return Verdict.failure("zk-evidence-mismatch", "the zk record is for another model")
    terms = ext.get("postprocess", ())
    if not isinstance(terms, tuple) or list(terms) != record.postprocess_terms():
        return Verdict.failure(
            "zk-evidence-mismatch",
            "the zk record's postprocess is not the one the receipt names",
        )
    if record.dev_srs and not allow_dev_srs:
        return Verdict.failure(
            "dev-srs",
            "the proof was made under a locally generated (development) SRS; whoever "
            "generated it could forge any proof, so it proves nothing. Production models "
            "are onboarded with a public ceremony SRS (--allow-dev-srs accepts it for a "
            "dev cluster)",
        )
    parsed = _parse(got["proof.json"], record)
    if not isinstance(parsed, tuple):
        return Verdict.failure("zk-proof-invalid", f"{parsed.reason}: {parsed.detail}")
    felts, _ = parsed
    ezkl = _ezkl()
    spec = record.inputs[0]
    # Public inputs: the proof carries the quantised input itself; its exact float value
    # quantises back to the same field elements, which verify_proof then checks.
    x = np.asarray(
        [ezkl.felt_to_float(f, spec.scale) for f in felts[: spec.size]], dtype=np.float32
    ).reshape(spec.shape)
    with tempfile.TemporaryDirectory(prefix="ztgate-zk-verify-") as tmp:
        paths = {}
        for name in ("vk", "settings.json", "srs"):
            paths[name] = Path(tmp) / name
            paths[name].write_bytes(got[name])
        result = verify_proof(
            got["proof.json"], x, record, paths["vk"], paths["settings.json"], paths["srs"]
        )
    if not result:
        return Verdict.failure("zk-proof-invalid", f"{result.reason}: {result.detail}")
    return Verdict.success()
