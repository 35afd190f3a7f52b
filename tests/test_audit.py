"""Audit bundles and offline verification: `ztgate audit export` and `ztgate verify`.

The tamper corpus flips every byte of a receipt, a signature, a proof path, a checkpoint
and a cosignature, and each time verification (with `--require-witness`) fails with a
specific reason. Keys come only from the trust file; a bundle re-signed end to end with
fresh keys fails. Everything here runs with sockets disabled.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.cli import main
from gateway.pki import signing_key_id
from gateway.protocol.tensors import Tensor
from gateway.receipts.bundle import BundleReader
from gateway.receipts.canonical import b64
from gateway.receipts.checkpointer import Checkpointer, WitnessClient
from gateway.receipts.export import export_bundle
from gateway.receipts.issue import issue
from gateway.receipts.log import LogEntry, ReceiptLog
from gateway.receipts.merkle import MerkleTree
from gateway.receipts.model import Denial, Receipt, SignedReceipt, make_receipt_id
from gateway.receipts.note import Checkpoint, NoteKey, SignedNote
from gateway.receipts.signing import KeySet, PublishedKey, Signer, format_time, signed_message
from gateway.receipts.verify import (
    PROOF_VERIFIERS,
    TrustPolicy,
    register_proof_verifier,
    verify_bundle,
)
from gateway.receipts.witness import witness_app
from tests.test_receipts import EPOCH, ORIGIN, WITNESS, World, make_world

# =========================================================================== fixtures


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Verification is offline: any network socket fails the test. (Unix socket pairs
    stay: the event loop wakes itself up with one.) Threads that were running before the
    test (a session fixture's node supervisors, say) are not the test's and keep theirs."""
    real, real_connect = socket.socket, socket.create_connection
    background = set(threading.enumerate()) - {threading.current_thread()}

    def offline() -> bool:
        return threading.current_thread() not in background

    class NoNetwork(real):  # type: ignore[misc,valid-type]
        def __init__(self, family: int = -1, *args: object, **kwargs: object) -> None:
            if (
                offline()
                and family in (socket.AF_INET, socket.AF_INET6, -1)
                and not kwargs.get("fileno")
            ):
                raise AssertionError("tried to use the network")
            super().__init__(family, *args, **kwargs)

    def refuse(*a: Any, **k: Any) -> socket.socket:
        if offline():
            raise AssertionError("tried to use the network")
        return real_connect(*a, **k)

    monkeypatch.setattr(socket, "socket", NoNetwork)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def test_the_network_guard_refuses_the_test_and_its_threads() -> None:
    with pytest.raises(AssertionError, match="tried to use the network"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(AssertionError, match="tried to use the network"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    caught: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except AssertionError as exc:
            caught.append(exc)

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert [str(e) for e in caught] == ["tried to use the network"]
    a, b = socket.socketpair()  # what the event loop needs still works
    a.close()
    b.close()


@pytest_asyncio.fixture(loop_scope="function")
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Three receipts in checkpoint 1, two more (one erased later) in checkpoint 2,
    and one pending; the witness cosigns every checkpoint (in-process, no sockets)."""
    w = await make_world(tmp_path)
    for _ in range(3):
        await w.receipt()
    await w.checkpoint()
    await w.log.append(LogEntry("policy_load", b"\x01" * 32))
    for _ in range(2):
        await w.receipt()
    await w.checkpoint()
    yield w
    if not w.log._closed:
        await w.log.close()


def _bundle(w: World, out: Path) -> Path:
    export_bundle(w.log_dir, out)
    return out


# =========================================================================== happy path


async def test_export_and_verify_valid_bundle(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust = world.write_trust(tmp_path / "trust.json")
    out = tmp_path / "bundle"
    assert main(["audit", "export", "--log-dir", str(world.log_dir), str(out)]) == 0
    assert "5 receipt(s)" in capsys.readouterr().out
    for name in ("manifest.json", "keys/receipt-keys.json", "keys/log-keys.json",
                 "keys/witness-keys.json"):  # fmt: skip
        assert (out / name).is_file(), name
    rc = main(["verify", str(out), "--trust", str(trust), "--require-witness", WITNESS, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    assert report["status"] == "valid"
    assert [f for f in report["findings"] if f["status"] != "valid"] == []
    assert report["counts"]["valid"] == len(report["findings"]) > 5  # receipts and more
    receipts = [f for f in report["findings"] if f["subject"].startswith("receipt ")]
    assert len(receipts) == 5 and all(f["status"] == "valid" for f in receipts)
    assert {f["details"]["checkpoint_size"] for f in receipts} == {4, 7}  # leaf 0: log_start
    # the same as a .tar, and the human summary
    tar = tmp_path / "bundle.tar"
    assert main(["audit", "export", "--log-dir", str(world.log_dir), str(tar)]) == 0
    assert tarfile.is_tarfile(tar)
    capsys.readouterr()
    assert main(["verify", str(tar), "--trust", str(trust), "--require-witness", WITNESS]) == 0
    assert capsys.readouterr().out.startswith("status: VALID")


async def test_since_filters_receipts(world: World, tmp_path: Path) -> None:
    """`since` cuts at a receipt's creation time: the receipts from then on, no earlier one."""
    created = {b.receipt_id: b.created for b in world.log.bodies()}
    ids = [i.receipt.receipt_id for i in world.issued]
    cut = created[ids[3]]
    since = dt.datetime.fromtimestamp(math.floor(cut * 1e6) / 1e6, dt.UTC)  # <= cut, to the µs
    assert created[ids[2]] < since.timestamp() <= cut  # the fixture's receipts are apart
    s = export_bundle(world.log_dir, tmp_path / "b", since)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["since"] == since.isoformat()
    exported = [r["id"] for log in manifest["logs"] for r in log["receipts"]]
    assert s.receipts == 2 and exported == ids[3:]
    assert sorted(
        p.stem for p in (tmp_path / "b").rglob("*.json") if p.parent.name == "receipts"
    ) == sorted(ids[3:])
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert export_bundle(world.log_dir, tmp_path / "none", future).receipts == 0
    assert export_bundle(world.log_dir, tmp_path / "all").receipts == 5  # no since: all


async def test_pending_receipt_exits_3(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pending = await world.receipt()
    trust = world.write_trust(tmp_path / "trust.json")
    out = _bundle(world, tmp_path / "bundle")
    assert main(["verify", str(out), "--trust", str(trust), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    mine = [f for f in report["findings"] if pending.receipt.receipt_id in f["subject"]]
    assert mine[0]["status"] == "pending" and mine[0]["code"] == "not-in-checkpoint"
    # a single receipt file: pending without a proof, valid with its tlog-proof beside it
    single = tmp_path / "r.json"
    single.write_bytes(pending.signed.to_bytes())
    assert main(["verify", str(single), "--trust", str(trust)]) == 3
    await world.checkpoint()
    proof = world.log.proof(pending.receipt.index)
    assert proof is not None
    single.with_suffix(".tlog-proof").write_text(proof)
    capsys.readouterr()
    assert main(["verify", str(single), "--trust", str(trust), "--require-witness", WITNESS]) == 0


async def test_erased_bodies_keep_the_bundle_verifiable(world: World, tmp_path: Path) -> None:
    victim = world.issued[3].receipt
    assert main(["audit", "erase", "--log-dir", str(world.log_dir), victim.receipt_id]) == 0
    await world.checkpoint()  # the writing log appends the queued erasure leaf
    assert [e.type for _, e in world.log.entries(world.log.size - 1)] == ["erasure"]
    report = verify_bundle(BundleReader(_bundle(world, tmp_path / "b")), world.trust(), [WITNESS])
    assert report.status == "valid"
    erased = [f for f in report.findings if f.status == "erased"]
    assert len(erased) == 1 and f"index {victim.index}" in erased[0].subject
    assert not any(victim.receipt_id in f.subject for f in report.findings)


async def test_client_salts_checked_against_commitments(world: World, tmp_path: Path) -> None:
    issued = world.issued[0]
    assert issued.salt is not None
    record = {
        "salt": b64(issued.salt),
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                    "data": [5.1, 3.5, 1.4, 0.2]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [0]}],
    }  # fmt: skip
    salts = tmp_path / "salts.json"
    salts.write_text(json.dumps({issued.receipt.receipt_id: record}))
    trust = world.write_trust(tmp_path / "trust.json")
    out = _bundle(world, tmp_path / "b")
    assert main(["verify", str(out), "--trust", str(trust), "--salts", str(salts)]) == 0
    # a client claiming another input, or the right input with another salt: invalid
    record["inputs"][0]["data"] = [5.1, 3.5, 1.4, 0.3]  # type: ignore[index]
    salts.write_text(json.dumps({issued.receipt.receipt_id: record}))
    report = verify_bundle(
        BundleReader(out), world.trust(), salts={issued.receipt.receipt_id: record}
    )
    assert report.status == "invalid"
    assert [f.code for f in report.findings if f.status == "invalid"] == ["commitment-mismatch"]
    assert main(["verify", str(out), "--trust", str(trust), "--salts", str(salts)]) == 1


# =========================================================================== tamper corpus


def _flip_all(
    reader: BundleReader,
    name: str,
    start: int,
    end: int,
    trust: TrustPolicy,
    allowed: set[str],
) -> set[str]:
    original = reader._files[name]
    codes: set[str] = set()
    assert 0 <= start < end <= len(original), (name, start, end)
    for i in range(start, end):
        data = bytearray(original)
        data[i] ^= 0x01
        reader._files[name] = bytes(data)
        report = verify_bundle(reader, trust, [WITNESS])
        bad = [f for f in report.findings if f.status == "invalid"]
        assert report.status == "invalid" and bad, f"flip at {name}[{i}] went unnoticed"
        for f in bad:
            assert f.code in allowed and f.reason, (name, i, f)
            codes.add(f.code)
    reader._files[name] = original
    assert verify_bundle(reader, trust, [WITNESS]).status == "valid"
    return codes


async def test_tamper_corpus_every_byte(world: World, tmp_path: Path) -> None:
    reader = BundleReader(_bundle(world, tmp_path / "bundle"))
    trust = world.trust()
    assert verify_bundle(reader, trust, [WITNESS]).status == "valid"
    base = f"logs/{world.log.log_id}"
    rid = world.issued[4].receipt.receipt_id
    receipt = f"{base}/receipts/{rid}.json"
    raw = reader._files[receipt]
    sig_at = raw.index(b'"sig":"') + len('"sig":"')
    # 1. the receipt body (every byte before the signature)
    # (the log's leaf for it is then unaccounted for: missing-entry as well)
    codes = _flip_all(reader, receipt, 0, sig_at, trust, {"malformed-receipt", "bad-signature",
                      "unknown-key", "misfiled", "inclusion-proof", "missing-entry"})  # fmt: skip
    assert "bad-signature" in codes and "malformed-receipt" in codes
    # 2. the signature
    codes = _flip_all(reader, receipt, sig_at, len(raw), trust,
                      {"malformed-receipt", "bad-signature", "missing-entry"})  # fmt: skip
    assert "bad-signature" in codes
    # 3. the proof path of its tlog-proof
    proof_name = f"{base}/receipts/{rid}.tlog-proof"
    proof = reader._files[proof_name]
    path_start = proof.index(b"\n", proof.index(b"index ")) + 1
    path_end = proof.index(b"\n\n")
    codes = _flip_all(reader, proof_name, path_start, path_end, trust,
                      {"malformed-proof", "inclusion-proof"})  # fmt: skip
    assert "inclusion-proof" in codes
    # ... and the index line and the header
    _flip_all(reader, proof_name, 0, path_start, trust, {"malformed-proof", "index-mismatch",
              "inclusion-proof"})  # fmt: skip
    # 4. a checkpoint (text and log signature) and 5. its cosignature
    cp_name = f"{base}/checkpoints/7.checkpoint"
    cp = reader._files[cp_name]
    cosig_at = cp.index(("\u2014 " + WITNESS).encode())
    cp_codes = {"malformed-checkpoint", "bad-checkpoint-signature", "untrusted-log", "misfiled",
                "checkpoint-not-in-chain", "missing-cosignature", "bad-cosignature",
                "inconsistent-checkpoints", "missing-consistency", "inclusion-proof",
                "inventory-mismatch"}  # fmt: skip
    codes = _flip_all(reader, cp_name, 0, cosig_at, trust, cp_codes)
    assert "bad-checkpoint-signature" in codes
    codes = _flip_all(reader, cp_name, cosig_at, len(cp), trust, cp_codes)
    # a flipped signature byte is a bad cosignature; a flipped name or key id, none at all
    # (and the proofs that embed the checkpoint as shipped no longer match it)
    assert "bad-cosignature" in codes
    assert codes & {"missing-cosignature", "checkpoint-not-in-chain"}
    # the checkpoint embedded in the proof is held to the same
    embedded = proof.index(b"\n\n") + 2
    codes = _flip_all(reader, proof_name, embedded, len(proof), trust, cp_codes)
    assert {"bad-cosignature", "bad-checkpoint-signature"} <= codes
    # 6. a consistency proof between checkpoints
    cons = f"{base}/consistency/4-7.proof"
    codes = _flip_all(reader, cons, 0, len(reader._files[cons]), trust,
                      {"malformed-proof", "inconsistent-checkpoints"})  # fmt: skip
    assert "inconsistent-checkpoints" in codes


async def test_bundle_resigned_with_fresh_keys_fails(world: World, tmp_path: Path) -> None:
    """An attacker with none of the real keys rebuilds the whole log: same origins, same
    receipt contents, fresh receipt, log and witness keys (and publishes those in the
    bundle). The auditor's trust file rejects it."""
    forger = await make_world(tmp_path / "forger")
    for issued in world.issued:
        r = issued.receipt
        await issue(
            forger.log, forger.signer, client=r.client, model=r.model, policy=r.policy,
            verification=r.verification, nodes=r.nodes, request_id=r.request_id,
        )  # fmt: skip
    await forger.checkpoint()
    forged = _bundle(forger, tmp_path / "forged")
    assert verify_bundle(BundleReader(forged), forger.trust(), [WITNESS]).status == "valid"
    report = verify_bundle(BundleReader(forged), world.trust(), [WITNESS])
    assert report.status == "invalid"
    codes = {f.code for f in report.findings if f.status == "invalid"}
    assert codes <= {"unknown-key", "bad-checkpoint-signature", "missing-cosignature",
                     "inventory-mismatch"}  # fmt: skip
    assert "unknown-key" in codes and "bad-checkpoint-signature" in codes
    trust = world.write_trust(tmp_path / "trust.json")
    assert main(["verify", str(forged), "--trust", str(trust)]) == 1
    await forger.log.close()


async def test_truncated_or_reordered_log_detected(world: World, tmp_path: Path) -> None:
    """The log key signs a rewritten history (leaves reordered, or truncated and
    regrown); its checkpoint is inconsistent with the earlier signed one."""
    out = _bundle(world, tmp_path / "b")
    # Positive control: the bundle as exported, before anyone rewrites it, is valid.
    assert verify_bundle(BundleReader(out), world.trust(), [WITNESS]).status == "valid"
    base = out / "logs" / world.log.log_id
    leaves = [world.log.tree.leaf(i) for i in range(world.log.size)]
    nk = NoteKey(world.log.origin, world.log_key.public_key())
    from gateway.receipts.note import Cosigner

    colluding_witness = Cosigner(WITNESS, world.witness_key)
    for rewritten in ([leaves[2], leaves[1], leaves[0], *leaves[3:]],
                      [*leaves[:2], *leaves[3:], leaves[2]]):  # fmt: skip
        tree = MerkleTree(rewritten)
        cp = Checkpoint(world.log.origin, 7, tree.root(), int(dt.datetime.now(dt.UTC).timestamp()))
        note = SignedNote(cp.text(), (nk.sign(world.log_key, cp.text()),))
        note = note.with_signatures([colluding_witness.cosign(cp.text(), cp.time or 0)])
        (base / "checkpoints" / "7.checkpoint").write_text(note.render())
        (base / "consistency" / "4-7.proof").write_text(
            "".join(b64(h) + "\n" for h in tree.consistency_proof(4, 7))
        )
        report = verify_bundle(BundleReader(out), world.trust(), [WITNESS])
        codes = {f.code for f in report.findings if f.status == "invalid"}
        assert "inconsistent-checkpoints" in codes, codes


async def test_backdated_receipt_with_retired_key_fails(world: World, tmp_path: Path) -> None:
    """The receipt key is retired; someone holding it signs a receipt dated
    before the retirement. In no checkpoint: invalid. Logged now: its checkpoint is from
    after the window: invalid. The receipt's own timestamp is never trusted."""
    old = world.receipt_key
    new = ed25519.Ed25519PrivateKey.generate()
    # retired after the fixture's checkpoints; the log's clock then moves past it
    retired = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    world.keyset.rotate(new.public_key(), retired)
    world.log.clock = lambda: time.time() + 120
    world.witness.clock = lambda: time.time() + 120
    world.signer = Signer(new)
    backdated_time = "2021-01-01T00:00:00.000Z"
    rogue = Signer(old)

    index = world.log.size
    r = Receipt(
        receipt_id=make_receipt_id(world.log.log_id, index, "00" * 8),
        log_id=world.log.log_id, index=index, time=backdated_time, kind="denial",
        key_id=rogue.key_id, denial=Denial("urn:x", "backdated"),
    )  # fmt: skip
    signed = rogue.sign(r)
    assert world.keyset.verify(signed)  # the signature itself is fine
    trust_path = world.write_trust(tmp_path / "trust.json")
    single = tmp_path / "backdated.json"
    single.write_bytes(signed.to_bytes())
    later = (retired + dt.timedelta(minutes=5)).isoformat()
    assert main(["verify", str(single), "--trust", str(trust_path), "--now", later]) == 1
    # before the retirement it would merely be pending
    assert main(["verify", str(single), "--trust", str(trust_path)]) == 3
    # now it gets appended (after the retirement) and checkpointed
    import hashlib

    await world.log.append(
        LogEntry("receipt", hashlib.sha256(signed.to_bytes()).digest()),
        (r.receipt_id, signed.to_bytes()),
    )
    await world.receipt()  # a fresh receipt with the new key
    await world.checkpoint()
    report = verify_bundle(BundleReader(_bundle(world, tmp_path / "b")), world.trust(), [WITNESS])
    mine = [f for f in report.findings if r.receipt_id in f.subject]
    assert mine[0].status == "invalid" and mine[0].code == "key-outside-window"
    fresh = [f for f in report.findings if world.issued[-1].receipt.receipt_id in f.subject]
    assert fresh[0].status == "valid"
    # older receipts signed with the old key inside its window are still valid
    first = [f for f in report.findings if world.issued[0].receipt.receipt_id in f.subject]
    assert first[0].status == "valid"


async def test_witness_required_but_absent(tmp_path: Path) -> None:
    w = await make_world(tmp_path, witness_http=False)
    await w.receipt()
    await w.checkpoint()
    out = _bundle(w, tmp_path / "b")
    assert verify_bundle(BundleReader(out), w.trust()).status == "valid"
    report = verify_bundle(BundleReader(out), w.trust(), [WITNESS])
    assert {f.code for f in report.findings if f.status == "invalid"} == {"missing-cosignature"}
    await w.log.close()


# =========================================================================== CLI usage


async def test_cli_exit_codes_on_garbage(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust = world.write_trust(tmp_path / "trust.json")
    out = _bundle(world, tmp_path / "b")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\xffnot a bundle" * 10)
    assert main(["verify", str(garbage), "--trust", str(trust)]) == 2
    assert main(["verify", str(tmp_path / "missing"), "--trust", str(trust)]) == 2
    assert main(["verify", str(out), "--trust", str(garbage)]) == 2
    assert main(["verify", str(out), "--trust", str(trust), "--require-witness", "nobody"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["verify", str(empty), "--trust", str(trust)]) == 2
    bad_manifest = tmp_path / "bad"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text("{nope")
    assert main(["verify", str(bad_manifest), "--trust", str(trust)]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(out)])  # no --trust
    assert exc.value.code == 2
    # a file that is not a receipt at all is a usage error (exit 2), not INVALID nor a crash
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"{\x00")
    assert main(["verify", str(junk), "--trust", str(trust)]) == 2
    assert main(["audit", "export", "--log-dir", str(empty), str(tmp_path / "x")]) == 2
    assert main(["audit", "export", "--log-dir", str(world.log_dir), "--since", "yesterday",
                 str(tmp_path / "x")]) == 2  # fmt: skip
    assert main(["audit", "erase", "--log-dir", str(world.log_dir), "not-an-id"]) == 2
    capsys.readouterr()


async def test_audit_trust_template(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "trust", "--log-dir", str(world.log_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    trust = TrustPolicy.from_dict(doc)
    assert WITNESS in trust.witnesses
    published = trust.receipt_keys.get(signing_key_id(world.receipt_key.public_key()))
    assert published is not None
    assert published.public_key.public_bytes_raw() == (
        world.receipt_key.public_key().public_bytes_raw()
    )
    report = verify_bundle(BundleReader(_bundle(world, tmp_path / "b")), trust, [WITNESS])
    assert report.status == "valid"


async def _second_replica(a: World, tmp: Path, published: dt.datetime) -> World:
    """Replica b of a's deployment: its own log and receipts dir, the deployment's log key,
    receipt key and witness (in-process), and the receipt key published by b at
    `published`, when b first loaded it."""
    rl = ReceiptLog.open(tmp / "logs", a.log_key, ORIGIN)
    keys = KeySet([PublishedKey(signing_key_id(a.receipt_key.public_key()),
                                a.receipt_key.public_key(), published)])  # fmt: skip
    keys.save(tmp / "logs" / "keys.json")
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=witness_app(a.witness)))
    witness = WitnessClient(a.witness.key, "http://witness", http)
    b = World(tmp, a.log_key, a.receipt_key, a.witness_key, rl, a.witness, a.signer, keys,
              Checkpointer(lambda: b.log, [witness]))  # fmt: skip
    return b


async def test_one_bundle_and_trust_file_cover_every_replica(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two replicas, two receipts dirs: `--log-dir A --log-dir B` gives one trust file
    naming both logs and one bundle that verifies with it; either dir alone is missing a
    log; the same log under two dirs is refused."""
    a = world
    # b first loaded the shared receipt key after a's checkpoints were signed: its keys.json
    # alone would put a's receipts outside the key's window.
    published = dt.datetime.fromtimestamp(math.ceil(time.time()) + 60, dt.UTC)
    b = await _second_replica(a, tmp_path / "b", published)
    try:
        b.log.clock = lambda: published.timestamp() + 5
        b.witness.clock = lambda: published.timestamp() + 5
        for _ in range(2):
            await b.receipt()
        await b.checkpoint()
        dirs = ["--log-dir", str(b.log_dir), "--log-dir", str(a.log_dir)]

        assert main(["audit", "trust", *dirs]) == 0
        doc = json.loads(capsys.readouterr().out)
        [log_key] = doc["log_keys"]
        assert sorted(log_key["origins"]) == sorted([a.log.origin, b.log.origin])
        [receipt_key] = doc["receipt_keys"]["keys"]
        assert receipt_key["valid_from"] == format_time(EPOCH)  # a's, the earliest
        trust = tmp_path / "trust.json"
        trust.write_text(json.dumps(doc))

        both = tmp_path / "both"
        assert main(["audit", "export", *dirs, str(both)]) == 0
        assert "2 log(s), 7 receipt(s)" in capsys.readouterr().out
        rc = main(["verify", str(both), "--trust", str(trust), "--require-witness", WITNESS,
                   "--json"])  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert rc == 0, report
        receipts = [f for f in report["findings"] if f["subject"].startswith("receipt ")]
        assert len(receipts) == 7 and {f["status"] for f in receipts} == {"valid"}

        # Control: one replica's dir, the two-log trust file: the other log is missing.
        for only in (a, b):
            one = tmp_path / f"only-{only.log.log_id}"
            assert main(["audit", "export", "--log-dir", str(only.log_dir), str(one)]) == 0
            capsys.readouterr()
            rc = main(["verify", str(one), "--trust", str(trust), "--json"])
            report = json.loads(capsys.readouterr().out)
            missing = [f for f in report["findings"] if f["code"] == "missing-log"]
            assert rc == 1 and [f["status"] for f in missing] == ["invalid"], report
            other = b if only is a else a
            assert other.log.origin in missing[0]["subject"] + missing[0]["reason"]

        # Control for the key merge: b's published window alone fails a's receipts.
        b_only = json.loads(json.dumps(doc))
        b_only["receipt_keys"] = json.loads(KeySet.load(b.log_dir / "keys.json").to_json())
        (tmp_path / "b-keys.json").write_text(json.dumps(b_only))
        rc = main(["verify", str(both), "--trust", str(tmp_path / "b-keys.json"), "--json"])
        report = json.loads(capsys.readouterr().out)
        outside = {f["subject"] for f in report["findings"] if f["code"] == "key-outside-window"}
        assert rc == 1 and outside == {f"receipt {i.receipt.receipt_id}" for i in a.issued}

        # The same log twice (a dir given twice, or a copy of a log): refused, by name.
        copy = tmp_path / "copy"
        shutil.copytree(a.log_dir / a.log.log_id, copy / a.log.log_id)
        for twice in ([a.log_dir, a.log_dir], [a.log_dir, copy]):
            argv = [x for d in twice for x in ("--log-dir", str(d))]
            assert main(["audit", "export", *argv, str(tmp_path / "dup")]) == 2
            assert main(["audit", "trust", *argv]) == 2
            err = capsys.readouterr().err
            assert f"log {a.log.log_id} is under more than one --log-dir" in err, err
        assert not (tmp_path / "dup").exists()
    finally:
        await b.log.close()


# =========================================================================== zk hook


async def test_proof_verifier_extension_point(world: World, tmp_path: Path) -> None:
    from gateway.receipts.model import VerificationRef
    from gateway.receipts.signing import Verdict

    zk = await world.receipt(
        verification=VerificationRef("zk", "proof-valid", "aa" * 32, "bb" * 32),
        inputs=[Tensor("input", "FP32", (1, 4), np.zeros((1, 4), "<f4"))],
    )
    await world.checkpoint()
    out = _bundle(world, tmp_path / "b")
    evidence = out / "logs" / world.log.log_id / "evidence"
    evidence.mkdir()
    (evidence / f"{zk.receipt.receipt_id}.proof").write_bytes(b"proof bytes")
    seen: list[tuple[str, list[str]]] = []

    def check(receipt: Receipt, files: object) -> Verdict:
        assert isinstance(files, dict)
        seen.append((receipt.receipt_id, sorted(files)))
        return Verdict.failure("zk-proof-invalid", "re-verification failed")

    register_proof_verifier("zk", check)
    try:
        report = verify_bundle(BundleReader(out), world.trust(), [WITNESS])
    finally:
        PROOF_VERIFIERS.pop("zk")
    assert seen == [(zk.receipt.receipt_id, [f"{zk.receipt.receipt_id}.proof"])]
    assert [f.code for f in report.findings if f.status == "invalid"] == ["zk-proof-invalid"]
    report = verify_bundle(BundleReader(out), world.trust(), [WITNESS])
    mine = next(f for f in report.findings if zk.receipt.receipt_id in f.subject)
    assert mine.status == "valid" and mine.details["proof_reverified"] is False


def test_signature_covers_id_and_digest() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    r = Receipt(
        receipt_id=make_receipt_id("a" * 16, 0, "0" * 16), log_id="a" * 16, index=0,
        time="2026-01-01T00:00:00.000Z", kind="denial", key_id=signing_key_id(key.public_key()),
    )  # fmt: skip
    signed = Signer(key).sign(r)
    key.public_key().verify(signed.signature, signed_message(r))
    ks = KeySet([PublishedKey(r.key_id, key.public_key(), EPOCH)])
    assert ks.verify(signed)
    moved = replace(r, receipt_id=make_receipt_id("a" * 16, 0, "1" * 16))
    assert not ks.verify(SignedReceipt(moved, signed.signature))
