"""Receipts as an auditor's library: JSON extension values, and an offline verifier that
imports no web framework, log writer or PKI code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.receipts.canonical import canonical_json
from gateway.receipts.model import FormatError, Receipt, SignedReceipt
from gateway.receipts.signing import Verdict
from tests.test_receipts import World, make_world

# What an auditor's interpreter must not load to verify a bundle.
FORBIDDEN = (
    "starlette",
    "uvicorn",
    "httpx",
    "sqlite3",
    "redis",
    "grpc",
    "tritonclient",
    "cedarpy",
    "prometheus_client",
    "gateway.pki",
    "gateway.app",
    "gateway.receipts.log",
    "gateway.receipts.export",
    "gateway.receipts.service",
    "gateway.receipts.witness",
)

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    return set(json.loads(out))


def forbidden_in(modules: set[str]) -> set[str]:
    return {m for m in modules for f in FORBIDDEN if m == f or m.startswith(f + ".")}


def test_the_offline_verifier_imports_no_web_framework_log_writer_or_pki() -> None:
    assert forbidden_in(loaded_by("gateway.receipts.verify")) == set()
    # Control: the same probe sees them where they are used (the gateway's app).
    assert {"starlette", "gateway.receipts.log"} <= forbidden_in(loaded_by("gateway.app"))


async def test_extension_values_are_json_values_signed_as_such(tmp_path: Path) -> None:
    world: World = await make_world(tmp_path, witness_http=False)
    try:
        issued = await world.receipt(
            extensions={"providers": ("prov-a", "prov-b"), "dev_srs": False, "logrows": 11}
        )
    finally:
        await world.log.close()
    signed = issued.signed
    doc = json.loads(signed.receipt.to_canonical())
    assert doc["ext"] == {"providers": ["prov-a", "prov-b"], "dev_srs": False, "logrows": 11}
    # The fast path (plain json.dumps) is exactly RFC 8785 for these values too.
    assert signed.receipt.to_canonical() == canonical_json(doc)
    again = SignedReceipt.from_bytes(signed.to_bytes())
    assert again.receipt.extensions == signed.receipt.extensions
    assert world.keyset.verify(again) == Verdict.success()
    # Control: the same receipt with a string where the list was no longer verifies.
    forged = json.loads(signed.to_bytes())
    forged["receipt"]["ext"]["providers"] = "['prov-a', 'prov-b']"
    relabelled = SignedReceipt.from_bytes(canonical_json(forged))
    assert world.keyset.verify(relabelled).code == "bad-signature"


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("sha256:ab", True),
        (["prov-a", "prov-b"], True),
        (True, True),
        (11, True),
        (2**53, False),  # not an interoperable JSON integer
        (1.5, False),
        ({"nested": "x"}, False),
        ([1, 2], False),
        (None, False),
    ],
)
def test_extension_values_outside_the_format_are_refused(value: object, accepted: bool) -> None:
    base = {
        "v": 1,
        "id": "aaaaaaaaaaaaaaaa.0.0123456789abcdef",
        "log": {"id": "aaaaaaaaaaaaaaaa", "index": 0},
        "time": "2026-01-01T00:00:00.000Z",
        "kind": "denial",
        "key_id": "00" * 8,
        "client": None,
        "model": None,
        "inputs": [],
        "outputs": [],
        "policy": None,
        "verification": None,
        "nodes": [],
        "denial": None,
        "request_id": None,
        "ext": {"k": value},
    }
    if accepted:
        assert Receipt.from_dict(base).to_dict()["ext"] == {"k": value}
    else:
        with pytest.raises(FormatError, match="ext values"):
            Receipt.from_dict(base)


async def test_erasure_leaves_no_copy_in_the_data_dir_and_files_are_private(
    tmp_path: Path,
) -> None:
    """Scans every byte of the log's directory, WAL included, for the erased receipt's
    client identity and its evidence; the same scan before erasure is the control."""
    from gateway.receipts.model import ClientRef
    from gateway.receipts.service import ReceiptService

    world: World = await make_world(tmp_path, witness_http=False)
    secret_client = "spiffe://ztgate.local/client/erase-me-7f3a"
    instance_values = b"[[0.123456789, 9.87654321]]"
    kept_client = "spiffe://ztgate.local/client/keep-me-1c2d"
    try:
        gone = await world.receipt(client=ClientRef(secret_client, "01", "CN=client CA"))
        kept = await world.receipt(client=ClientRef(kept_client, "02", "CN=client CA"))
        service = ReceiptService.__new__(ReceiptService)
        service.log = world.log  # only save_evidence is used: it needs the log's path
        for issued in (gone, kept):
            service.save_evidence(
                issued.receipt.receipt_id,
                {"proof.json": b'{"instances": ' + instance_values + b"}"},
            )
        await world.log.flush()
        log_dir = world.log.path

        def found(needle: bytes) -> list[str]:
            return [p.name for p in log_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]

        assert found(secret_client.encode()), "control: the scan finds the body before erasure"
        assert found(instance_values)
        assert await world.log.erase([gone.receipt.receipt_id], "gdpr-art-17") == 1
        assert found(secret_client.encode()) == []
        assert not list((log_dir / "evidence").glob(f"{gone.receipt.receipt_id}.*"))
        # Control: the receipt that was not erased keeps its body and evidence.
        assert found(kept_client.encode())
        assert (log_dir / "evidence" / f"{kept.receipt.receipt_id}.proof.json").is_file()
        assert world.log.erased() == {gone.receipt.index: "gdpr-art-17"}
        # Private: the log's directories 0700, its files 0600.
        for p in [log_dir, *log_dir.rglob("*")]:
            mode = p.stat().st_mode & 0o777
            assert mode == (0o700 if p.is_dir() else 0o600), (p.name, oct(mode))
    finally:
        await world.log.close()


def test_a_receipt_id_with_a_trailing_newline_is_refused() -> None:
    from gateway.receipts.model import parse_receipt_id

    rid = "aaaaaaaaaaaaaaaa.7.0123456789abcdef"
    assert parse_receipt_id(rid) == ("aaaaaaaaaaaaaaaa", 7)  # control
    with pytest.raises(FormatError):
        parse_receipt_id(rid + "\n")
