"""Receipts: canonical JSON, commitments, signatures, the log (group commit, durability,
frozen logs), checkpoints, witnesses, endpoints, denial coalescing."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
import rfc8785
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipeline.context import Incoming, body_of, request_id_of
from gateway.pki import PKI, load_signing_key, signing_key_id
from gateway.protocol.codec import decode_request, encode_request
from gateway.protocol.tensors import InferRequest, Tensor, canonical_bytes
from gateway.receipts.canonical import b64, canonical_json, json_safe, unb64
from gateway.receipts.checkpointer import Checkpointer, WitnessClient
from gateway.receipts.commit import commit_tensor, new_salt
from gateway.receipts.http import log_routes
from gateway.receipts.issue import (
    DenialCoalescer,
    Issued,
    derive,
    issue,
    summary,
    verify_summary,
)
from gateway.receipts.log import LogEntry, LogFrozen, ReceiptLog
from gateway.receipts.marker import HeadMarker
from gateway.receipts.merkle import leaf_hash, verify_consistency, verify_inclusion
from gateway.receipts.model import (
    ClientRef,
    Denial,
    FormatError,
    ModelRef,
    PolicyRef,
    Receipt,
    SignedReceipt,
    TensorRef,
    VerificationRef,
)
from gateway.receipts.note import Checkpoint, Cosigner, NoteKey, SignedNote
from gateway.receipts.signing import KeySet, Signer
from gateway.receipts.verify import TrustedLogKey, TrustPolicy
from gateway.receipts.witness import (
    TrustedLog,
    Witness,
    add_checkpoint_body,
    witness_app,
)

ORIGIN = "ztgate.local/site-a/receipts"
WITNESS = "witness.example/w1"
EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


# ============================================================================ a test world


@dataclass
class World:
    """A log with a witness (over in-process ASGI), keys, and the matching trust policy."""

    dir: Path
    log_key: ed25519.Ed25519PrivateKey
    receipt_key: ed25519.Ed25519PrivateKey
    witness_key: ed25519.Ed25519PrivateKey
    log: ReceiptLog
    witness: Witness
    signer: Signer
    keyset: KeySet
    checkpointer: Checkpointer
    issued: list[Issued] = field(default_factory=list)

    async def checkpoint(self) -> SignedNote:
        """Sign the head and have the witness cosign it (what the gateway's loop does)."""
        return await self.checkpointer.tick()

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def trust(self) -> TrustPolicy:
        return TrustPolicy(
            self.keyset,
            [TrustedLogKey("ztgate.local/", self.log_key.public_key())],
            {WITNESS: self.witness.key},
        )

    def write_trust(self, path: Path) -> Path:
        path.write_text(json.dumps(self.trust().to_dict(), indent=1))
        return path

    async def receipt(self, **kw: object) -> Issued:
        fields: dict[str, object] = {
            "client": ClientRef("spiffe://ztgate.local/client/alice", "1f2e3d", "CN=client CA"),
            "model": ModelRef("iris", "1", "ab" * 32),
            "inputs": [_tensor([[5.1, 3.5, 1.4, 0.2]])],
            "outputs": [Tensor("label", "INT64", (1,), np.array([0], "<i8"))],
            "policy": PolicyRef("sha256:" + "00" * 32, "decision-1"),
            "verification": VerificationRef("none", "unverified"),
            "nodes": ["spiffe://ztgate.local/node/n1"],
            "request_id": "req-1",
        }
        fields.update(kw)
        issued = await issue(self.log, self.signer, **fields)  # type: ignore[arg-type]
        self.issued.append(issued)
        return issued


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")  # type: ignore[arg-type]


def _tensor(rows: list[list[float]], name: str = "input") -> Tensor:
    data = np.array(rows, "<f4")
    return Tensor(name, "FP32", data.shape, data)


async def make_world(tmp: Path, *, witness_http: bool = True) -> World:
    log_key = ed25519.Ed25519PrivateKey.generate()
    receipt_key = ed25519.Ed25519PrivateKey.generate()
    witness_key = ed25519.Ed25519PrivateKey.generate()
    rl = ReceiptLog.open(tmp / "logs", log_key, ORIGIN)
    witness = Witness(
        WITNESS, witness_key, [TrustedLog("ztgate.local/", log_key.public_key())], tmp / "w.json"
    )
    witnesses = []
    if witness_http:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=witness_app(witness)))
        witnesses.append(WitnessClient(witness.key, "http://witness", http))
    keyset = KeySet()
    keyset.add(receipt_key.public_key(), EPOCH)
    keyset.save(tmp / "logs" / "keys.json")
    world = World(
        tmp,
        log_key,
        receipt_key,
        witness_key,
        rl,
        witness,
        Signer(receipt_key),
        keyset,
        Checkpointer(lambda: world.log, witnesses),
    )
    return world


@pytest_asyncio.fixture(loop_scope="function")
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    if not w.log._closed:
        await w.log.close()


# ============================================================================ canonical JSON


def test_jcs_vectors() -> None:
    """Fixed bytes: key order, no whitespace, escapes, big integers as strings."""
    vectors: list[tuple[object, bytes]] = [
        ({"b": 1, "a": [True, None, "x"]}, b'{"a":[true,null,"x"],"b":1}'),
        ({"n": 2**53 - 1, "big": 2**53, "neg": -(2**64)},
         b'{"big":"9007199254740992","n":9007199254740991,"neg":"-18446744073709551616"}'),
        ({"s": "\u00e9\u20ac\n\t\"\\\x01\x7f"},
         '{"s":"\u00e9\u20ac\\n\\t\\"\\\\\\u0001\x7f"}'.encode()),
        ({"\u00e9": 1, "z": 2, "a": {"y": [], "x": {}}},
         '{"a":{"x":{},"y":[]},"z":2,"\u00e9":1}'.encode()),
        ({"f": 1.5, "e": 1e21}, b'{"e":1e+21,"f":1.5}'),
    ]  # fmt: skip
    for value, expected in vectors:
        assert canonical_json(value) == expected, value
        assert canonical_json(value) == rfc8785.dumps(json_safe(value))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


async def test_receipt_encoding_is_rfc8785(world: World) -> None:
    """The receipt's fast encoder and the envelope concatenation equal `rfc8785` exactly."""
    issued = await world.receipt(
        nodes=["spiffe://ztgate.local/node/n\u00e9\u20ac", 'quote"and\\back\nslash'],
        denial=Denial("urn:x", "\x01 control", count=3),
    )
    r = issued.receipt
    assert r.to_canonical() == rfc8785.dumps(json_safe(r.to_dict()))
    assert issued.signed.to_bytes() == rfc8785.dumps(json_safe(issued.signed.to_dict()))
    huge = replace(r, inputs=(TensorRef("x", "FP32", (2**60,), "sha256:00"),))
    assert huge.to_canonical() == rfc8785.dumps(json_safe(huge.to_dict()))
    assert b'"shape":["1152921504606846976"]' in huge.to_canonical()


@settings(max_examples=300, deadline=None)
@given(_json)
def test_fast_path_matches_rfc8785(value: object) -> None:
    try:
        expected = rfc8785.dumps(json_safe(value))
    except (rfc8785.CanonicalizationError, UnicodeEncodeError):
        # The strategy has no floats, so the one thing JCS cannot encode is text that is not
        # UTF-8 (a lone surrogate, in a value or a key): the fast path refuses it as well.
        assert _has_surrogate(value), value
        with pytest.raises(UnicodeEncodeError):
            canonical_json(value)
        return
    assert canonical_json(value) == expected


def _has_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False


def test_unencodable_text_is_refused_by_both() -> None:
    """The branch above, pinned down: a lone surrogate as a value and as a key."""
    for value in ("\ud800", {"\udc00": 1}, [{"ok": "\udfff"}]):
        with pytest.raises((rfc8785.CanonicalizationError, UnicodeEncodeError)):
            rfc8785.dumps(json_safe(value))
        with pytest.raises(UnicodeEncodeError):
            canonical_json(value)


def test_strict_base64() -> None:
    assert unb64("AAE=") == b"\x00\x01"
    for bad in ("AAF=", "AAE", " AAE=", "AA\nE=", "AA-E"):
        with pytest.raises(ValueError):
            unb64(bad)


# ============================================================================ commitments


def test_same_tensor_as_json_and_binary_commits_the_same() -> None:
    t = _tensor([[5.1, 3.5, 1.4, 0.2], [6.0, 2.2, 5.0, 1.5]])
    b = Tensor("flag", "BOOL", (3,), np.array([True, False, True]))
    s = Tensor("text", "BYTES", (2,), np.array([b"hi", b"\xff\x00"], dtype=object))
    req = InferRequest("iris", None, None, (t, b, s))
    salt = new_salt()
    commitments = []
    for binary in (True, False):
        if not binary:
            # BYTES with non-UTF-8 cannot travel as JSON; send the others as JSON.
            body, headers = encode_request(InferRequest("iris", None, None, (t, b)), False)
        else:
            body, headers = encode_request(req, True)
        decoded = decode_request(
            body, int(headers["Inference-Header-Content-Length"]) if binary else None, "iris", None
        )
        commitments.append({x.name: commit_tensor(x, salt) for x in decoded.inputs})
    for name in ("input", "flag"):
        assert commitments[0][name] == commitments[1][name]
    assert commitments[0]["input"] == commit_tensor(t, salt)


def test_guessed_input_not_confirmable_without_the_salt() -> None:
    secret = Tensor("answer", "BOOL", (1,), np.array([True]))
    salt = new_salt()
    c = commit_tensor(secret, salt)
    # The whole input space is two values; without the salt neither guess matches.
    for guess in (np.array([True]), np.array([False])):
        g = Tensor("answer", "BOOL", (1,), guess)
        assert all(commit_tensor(g, new_salt()) != c for _ in range(64))
        assert hashlib.sha256(canonical_bytes(g)).hexdigest() not in c
        assert commit_tensor(g, b"\0" * 32) != c
    # With the salt, the client (and only it) can show what it sent.
    assert commit_tensor(Tensor("answer", "BOOL", (1,), np.array([True])), salt) == c
    assert commit_tensor(Tensor("answer", "BOOL", (1,), np.array([False])), salt) != c
    # dtype and shape are bound: same bytes, other type or shape, other commitment.
    u8 = Tensor("answer", "UINT8", (1,), np.array([1], "u1"))
    assert canonical_bytes(u8) == canonical_bytes(secret) and commit_tensor(u8, salt) != c
    with pytest.raises(ValueError):
        commit_tensor(secret, b"short")


# ============================================================================ receipts, signatures


async def test_receipt_round_trip_signature_and_summary(world: World) -> None:
    issued = await world.receipt()
    r = issued.receipt
    assert r.log_id == world.log.log_id and r.receipt_id.startswith(f"{r.log_id}.{r.index}.")
    assert r.key_id == signing_key_id(world.receipt_key.public_key())
    raw = issued.signed.to_bytes()
    back = SignedReceipt.from_bytes(raw)
    assert back == issued.signed and world.keyset.verify(back)
    # the log holds only the hash; the body sits beside it
    assert world.log.entry(r.index) == LogEntry("receipt", hashlib.sha256(raw).digest())
    body = world.log.body(r.receipt_id)
    assert body is not None and body.body == raw
    # the compact summary carries the receipt's own signature
    line = summary(issued.signed)
    assert line.startswith("ztgate-receipt/v1 ") and len(line) < 300
    assert verify_summary(line, world.keyset, r)
    other = KeySet()
    other.add(ed25519.Ed25519PrivateKey.generate().public_key(), EPOCH)
    assert verify_summary(line, other).code == "unknown-key"
    # another receipt id (its last hex digit changed) under the same signature
    other_id = r.receipt_id[:-1] + ("1" if r.receipt_id.endswith("0") else "0")
    assert other_id != r.receipt_id
    assert verify_summary(line.replace(r.receipt_id, other_id), world.keyset).code == (
        "bad-signature"
    )
    # non-canonical or altered bytes never parse as the same receipt
    with pytest.raises(FormatError):
        SignedReceipt.from_bytes(json.dumps(json.loads(raw), indent=1).encode())
    tampered = raw.replace(b'"iris"', b'"irjs"')
    assert not world.keyset.verify(SignedReceipt.from_bytes(tampered))


async def test_receipt_keys_from_the_pki(pki: PKI, tmp_path: Path) -> None:
    key = load_signing_key(pki.key_path("receipt-signing"))
    log_key = load_signing_key(pki.key_path("log-checkpoint"))
    assert signing_key_id(key.public_key()) != signing_key_id(log_key.public_key())
    rl = ReceiptLog.open(tmp_path / "logs", log_key, ORIGIN)
    try:
        issued = await issue(rl, Signer(key), kind="denial", denial=Denial("forbidden", "no"))
        assert issued.salt is None and issued.receipt.kind == "denial"
        note = await rl.checkpoint()
        assert NoteKey(rl.origin, log_key.public_key()).verify(note) is True
    finally:
        await rl.close()


def test_key_set_windows_and_rotation() -> None:
    old, new = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    ks = KeySet()
    ks.add(old.public_key(), EPOCH)
    rotation = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    ks.rotate(new.public_key(), rotation)
    back = KeySet.from_json(ks.to_json())
    old_id, new_id = signing_key_id(old.public_key()), signing_key_id(new.public_key())
    assert back.window(old_id, rotation - dt.timedelta(days=1))
    assert back.window(old_id, rotation + dt.timedelta(seconds=1)).code == "key-outside-window"
    assert back.window(new_id, rotation + dt.timedelta(days=300))
    assert not back.window(new_id, rotation - dt.timedelta(days=1))
    assert back.window("0" * 16, rotation).code == "unknown-key"


# ============================================================================ the log


async def test_group_commit_one_fsync_for_many(world: World) -> None:
    results = await asyncio.gather(*(world.receipt() for _ in range(500)))
    indexes = sorted(i.receipt.index for i in results)
    assert indexes == list(range(1, 501))  # leaf 0 is the log's log_start entry
    assert world.log.size == 501
    assert world.log.stats.batches < 50, world.log.stats  # batched, not one fsync each
    # every index holds the receipt that names it
    for i in results[:20]:
        entry = world.log.entry(i.receipt.index)
        assert entry.sha256 == hashlib.sha256(i.signed.to_bytes()).digest()


async def test_bounded_queue_applies_backpressure(tmp_path: Path) -> None:
    rl = ReceiptLog.open(tmp_path / "logs", ed25519.Ed25519PrivateKey.generate(), ORIGIN)
    rl.max_queue = 8
    try:
        entries = [LogEntry("policy_load", hashlib.sha256(bytes([i])).digest()) for i in range(40)]
        indexes = await asyncio.gather(*(rl.append(e) for e in entries))
        assert sorted(indexes) == list(range(1, 41)) and rl.stats.largest_batch <= 8
    finally:
        await rl.close()


async def test_typed_entries_hold_only_hashes(tmp_path: Path) -> None:
    rl = ReceiptLog.open(tmp_path / "logs", ed25519.Ed25519PrivateKey.generate(), ORIGIN)
    try:
        h = hashlib.sha256(b"x").digest()
        for t in ("policy_load", "revocation", "node_quarantine", "node_release"):
            await rl.append(LogEntry(t, h))
        await rl.append(LogEntry("late_evidence", h, ref="abc"))
        kinds = [e.type for _, e in rl.entries()]
        assert kinds == [
            "log_start",
            "policy_load",
            "revocation",
            "node_quarantine",
            "node_release",
            "late_evidence",
        ]
        data = LogEntry("late_evidence", h, ref="abc").leaf_data()
        assert json.loads(data) == {"type": "late_evidence", "sha256": h.hex(), "ref": "abc"}
        with pytest.raises(ValueError):
            LogEntry("receipt", h, ref="abc")
        with pytest.raises(ValueError):
            LogEntry("bogus", h)
    finally:
        await rl.close()


async def test_checkpoints_proofs_and_pending(world: World) -> None:
    start = time.time()
    signed_at = [start + 0.25, start + 7.75]  # what the log's clock says at each checkpoint
    first = [await world.receipt() for _ in range(5)]
    assert world.log.proof(first[0].receipt.index) is None  # pending: no checkpoint yet
    world.log.clock = lambda: signed_at[0]
    cp1 = await world.checkpoint()
    later = [await world.receipt() for _ in range(6)]
    assert world.log.proof(later[0].receipt.index) is None
    world.log.clock = lambda: signed_at[1]
    cp2 = await world.checkpoint()
    c1, c2 = Checkpoint.parse_text(cp1.text), Checkpoint.parse_text(cp2.text)
    assert (c1.size, c2.size) == (6, 12) and c1.origin == world.log.origin
    assert (c1.time, c2.time) == (int(signed_at[0]), int(signed_at[1]))  # the log's clock
    # both checkpoints are signed by the log and cosigned by the witness
    for note in (cp1, cp2):
        assert NoteKey(world.log.origin, world.log_key.public_key()).verify(note) is True
        assert world.witness.key.verify(note)[0] == "valid"
    assert verify_consistency(6, 12, c1.root, c2.root, world.log.consistency(6, 12))
    # a receipt's proof is against the latest of the equally cosigned checkpoints that
    # include it (test_served_proof_outlives_an_uncosigned_checkpoint says why)
    proof = world.log.proof(first[2].receipt.index)
    assert proof is not None and proof.startswith("c2sp.org/tlog-proof@v1\nindex 3\n")
    assert proof.endswith(cp2.render())
    leaf = leaf_hash(LogEntry("receipt", first[2].signed.digest()).leaf_data())
    assert verify_inclusion(3, 6, leaf, world.log.inclusion(3, 6), c1.root)
    assert verify_inclusion(3, 12, leaf, world.log.inclusion(3, 12), c2.root)
    # an unchanged head is not re-signed
    assert (await world.checkpoint()).text == cp2.text


def test_killed_right_after_append_loses_no_receipt(tmp_path: Path) -> None:
    """A child appends and prints each receipt id the moment append returns; it is
    SIGKILLed right after the 200th; every printed id is in the reopened log."""
    child = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from gateway.receipts.issue import issue
        from gateway.receipts.log import ReceiptLog
        from gateway.receipts.model import Denial
        from gateway.receipts.signing import Signer

        async def main():
            key = ed25519.Ed25519PrivateKey.generate()
            rl = ReceiptLog.open(Path({str(tmp_path / "logs")!r}), key, "o")
            signer = Signer(ed25519.Ed25519PrivateKey.generate())
            async def one():
                while True:
                    r = await issue(rl, signer, kind="denial", denial=Denial("t", "r"))
                    sys.stdout.write(r.receipt.receipt_id + "\\n")
                    sys.stdout.flush()
            await asyncio.gather(*(one() for _ in range(32)))
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    assert proc.stdout is not None
    returned: list[str] = []
    while len(returned) < 200:
        line = proc.stdout.readline()
        assert line, "child died"
        returned.append(line.decode().strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    returned += [line.decode().strip() for line in proc.stdout.read().splitlines()]
    path = next((tmp_path / "logs").glob("*/log.db")).parent
    rl = ReceiptLog.open_readonly(path)
    try:
        assert not rl.frozen
        for rid in returned:
            body = rl.body(rid)
            assert body is not None, f"receipt {rid} was returned but is not in the log"
            assert rl.entry(body.index).sha256 == hashlib.sha256(body.body).digest()
    finally:
        rl.close_sync()


# Why ReceiptLog freezes a log (gateway/receipts/log.py, _check_integrity), word for word.
RESTORED_FILE = (
    "the database file is not the one this log was created in (restored or copied from a backup)"
)


def behind_marker(marker_size: int, log_size: int) -> str:
    return (
        f"behind its head marker (marker says size {marker_size}, log has {log_size}): "
        "restored from a backup"
    )


async def assert_continues(
    logs: Path, key: ed25519.Ed25519PrivateKey, log_id: str, size: int
) -> None:
    """The unedited control: reopened as it was left, the same log continues, not frozen."""
    rl = ReceiptLog.open(logs, key, ORIGIN)
    try:
        assert (rl.log_id, rl.size, rl.frozen_reason) == (log_id, size, None)
        assert not (logs / log_id / "FROZEN").exists()
        assert ReceiptLog.all_logs(logs) == [logs / log_id]
    finally:
        await rl.close()


async def assert_frozen_and_replaced(
    logs: Path, key: ed25519.Ed25519PrivateKey, old_id: str, reason: str
) -> None:
    """Reopened after the tampering: a fresh, empty log; the old one frozen for `reason`."""
    rl = ReceiptLog.open(logs, key, ORIGIN)
    try:
        assert rl.log_id != old_id and rl.size == 1 and not rl.frozen  # its log_start
        assert (logs / old_id / "FROZEN").read_text() == reason + "\n"
        old = ReceiptLog.open_readonly(logs / old_id)
        try:
            assert old.frozen_reason == reason
            # the successor's first leaf commits to the frozen log's last checkpoint
            origin, size, root = old.head()
            assert size > 0 and rl.entry(0) == LogEntry(
                "log_start", hashlib.sha256(rl.record(0) or b"").digest()
            )
            assert json.loads(rl.record(0) or b"") == {
                "predecessor": {"origin": origin, "size": size, "root": b64(root)}
            }
            with pytest.raises(LogFrozen, match="is frozen: "):
                await old.append(LogEntry("revocation", hashlib.sha256(b"x").digest()))
        finally:
            old.close_sync()
    finally:
        await rl.close()


async def test_restored_backup_is_frozen_and_a_new_log_starts(tmp_path: Path) -> None:
    """A file-level restore makes new files, so new inodes: the birth-inode check freezes the
    log on its own (the backup holds the head marker of its day too, so that one agrees)."""
    key = ed25519.Ed25519PrivateKey.generate()
    logs, marker = tmp_path / "logs", tmp_path / "logs.head"
    rl = ReceiptLog.open(logs, key, ORIGIN)
    for i in range(3):
        await rl.append(LogEntry("revocation", hashlib.sha256(bytes([i])).digest()))
    await rl.checkpoint()
    old_id = rl.log_id
    await rl.close()
    backup = tmp_path / "backup"
    shutil.copytree(logs, backup / "logs")
    shutil.copy(marker, backup / "logs.head")
    # the live log moves on ...
    rl = ReceiptLog.open(logs, key, ORIGIN)
    assert rl.log_id == old_id and not rl.frozen
    await rl.append(LogEntry("revocation", hashlib.sha256(b"later").digest()))
    await rl.close()
    await assert_continues(logs, key, old_id, 5)  # control: no restore, the same log
    # ... then log and marker are restored from the backup. Copied while the live files
    # still exist, so the file system cannot hand the restored database the old inode number.
    shutil.copytree(backup / "logs", tmp_path / "restored")
    old_inode = (logs / old_id / "log.db").stat().st_ino
    assert (tmp_path / "restored" / old_id / "log.db").stat().st_ino != old_inode
    shutil.rmtree(logs)
    (tmp_path / "restored").rename(logs)
    shutil.copy(backup / "logs.head", marker)
    head = HeadMarker(marker).read()
    assert head is not None and (head.log_id, head.size) == (old_id, 4)  # agrees with the log
    await assert_frozen_and_replaced(logs, key, old_id, RESTORED_FILE)


async def test_block_level_restore_caught_by_the_head_marker(tmp_path: Path) -> None:
    """A volume snapshot keeps inode numbers; the head marker outside the dir catches it."""
    key = ed25519.Ed25519PrivateKey.generate()
    logs = tmp_path / "logs"
    rl = ReceiptLog.open(logs, key, ORIGIN)
    await rl.append(LogEntry("revocation", hashlib.sha256(b"a").digest()))
    await rl.checkpoint()
    await rl.close()
    db = next(logs.glob("*/log.db"))
    snapshot = {p: p.read_bytes() for p in db.parent.iterdir() if p.is_file()}
    rl = ReceiptLog.open(logs, key, ORIGIN)
    old_id = rl.log_id
    await rl.append(LogEntry("revocation", hashlib.sha256(b"b").digest()))
    await rl.checkpoint()
    await rl.close()
    head = HeadMarker(tmp_path / "logs.head").read()
    assert head is not None and (head.log_id, head.size) == (old_id, 3)
    await assert_continues(logs, key, old_id, 3)  # control: no restore, the same log
    inodes = {p: p.stat().st_ino for p in snapshot}
    for p in list(db.parent.iterdir()):  # restore in place: same inodes
        if p in snapshot:
            p.write_bytes(snapshot[p])  # truncates and rewrites the same inode
        else:
            p.unlink()
    assert {p: p.stat().st_ino for p in snapshot} == inodes  # invisible to the inode check
    await assert_frozen_and_replaced(logs, key, old_id, behind_marker(3, 2))


async def test_edited_database_is_refused(tmp_path: Path) -> None:
    import sqlite3

    key = ed25519.Ed25519PrivateKey.generate()
    rl = ReceiptLog.open(tmp_path / "logs", key, ORIGIN)
    for i in range(4):
        await rl.append(LogEntry("revocation", hashlib.sha256(bytes([i])).digest()))
    await rl.checkpoint()
    old_id = rl.log_id
    await rl.close()
    await assert_continues(tmp_path / "logs", key, old_id, 5)  # control: unedited
    db = sqlite3.connect(tmp_path / "logs" / old_id / "log.db")
    forged = LogEntry("revocation", hashlib.sha256(b"forged").digest()).leaf_data()
    db.execute("UPDATE leaves SET data = ? WHERE idx = 1", (forged,))
    db.commit()
    db.close()
    reason = "leaves do not reproduce the last checkpoint (size 5): truncated or edited"
    await assert_frozen_and_replaced(tmp_path / "logs", key, old_id, reason)


async def test_erasure_keeps_the_log_verifiable(world: World) -> None:
    issued = [await world.receipt() for _ in range(4)]
    await world.checkpoint()
    target = issued[1].receipt
    assert await world.log.erase([target.receipt_id], "erasure-request") == 1
    assert world.log.body(target.receipt_id) is None
    assert world.log.erased() == {target.index: "erasure-request"}
    # the leaf and its proof are unchanged
    proof = world.log.proof(target.index)
    assert proof is not None and f"index {target.index}" in proof
    # the erasure itself is logged, by the next checkpoint, as a leaf naming the index
    size = world.log.size
    cp = Checkpoint.parse_text((await world.checkpoint()).text)
    assert cp.size == world.log.size == size + 1
    erasure = world.log.entry(size)
    record = world.log.record(size)
    assert erasure.type == "erasure" and record is not None
    assert erasure.sha256 == hashlib.sha256(record).digest()
    assert json.loads(record) == {
        "origin": world.log.origin,
        "indices": [target.index],
        "reason": "erasure-request",
    }
    assert world.log.queued_erasures() == []
    assert await world.log.expire(older_than_s=3600) == 0
    assert await world.log.expire(older_than_s=-1) == 3


# ============================================================================ witness


async def test_witness_cosigns_and_refuses_a_forked_log(world: World) -> None:
    for _ in range(6):
        await world.receipt()
    note = await world.checkpoint()
    assert world.witness.latest(world.log.origin)[0] == 7  # log_start and 6 receipts
    assert world.witness.key.verify(note)[0] == "valid"
    # A fork: same origin and log key, history rewritten (two leaves swapped), grown to 9.
    from gateway.receipts.merkle import MerkleTree

    leaves = [world.log.tree.leaf(i) for i in range(7)]
    leaves[1], leaves[2] = leaves[2], leaves[1]
    fork = MerkleTree([*leaves, leaf_hash(b"x"), leaf_hash(b"y")])
    cp = Checkpoint(world.log.origin, 9, fork.root(), 1)
    nk = NoteKey(world.log.origin, world.log_key.public_key())
    forged = SignedNote(cp.text(), (nk.sign(world.log_key, cp.text()),))
    status, body, _ = await world.witness.add_checkpoint(
        add_checkpoint_body(7, fork.consistency_proof(7, 9), forged)
    )
    assert status == 422 and "consistency" in body
    # and a truncated one (smaller size) is refused too
    small = Checkpoint(world.log.origin, 4, world.log.tree.root(4), 1)
    status, _, _ = await world.witness.add_checkpoint(
        add_checkpoint_body(
            7, [], SignedNote(small.text(), (nk.sign(world.log_key, small.text()),))
        )
    )
    assert status == 400
    # wrong old size: 409 with the witness's size
    status, body, ctype = await world.witness.add_checkpoint(add_checkpoint_body(3, [], forged))
    assert (status, body, ctype) == (409, "7\n", "text/x.tlog.size")
    # unknown origin 404, untrusted signature 403, garbage 400
    other = Checkpoint("elsewhere.example/log", 1, leaf_hash(b"x"), 1)
    nk2 = NoteKey("elsewhere.example/log", world.log_key.public_key())
    n2 = SignedNote(other.text(), (nk2.sign(world.log_key, other.text()),))
    assert (await world.witness.add_checkpoint(add_checkpoint_body(0, [], n2)))[0] == 404
    rogue = ed25519.Ed25519PrivateKey.generate()
    n3 = SignedNote(cp.text(), (nk.sign(rogue, cp.text()),))
    assert (await world.witness.add_checkpoint(add_checkpoint_body(7, [], n3)))[0] == 403
    assert (await world.witness.add_checkpoint(b"\xff garbage"))[0] == 400
    assert world.witness.latest(world.log.origin)[0] == 7  # never rolled back or forked


async def test_witness_state_survives_restart_and_client_recovers_from_409(world: World) -> None:
    for _ in range(3):
        await world.receipt()
    await world.checkpoint()
    # the log forgets what the witness saw; its client learns it from the 409
    world.log._db.execute("DELETE FROM witnesses")
    for _ in range(2):
        await world.receipt()
    note = await world.checkpoint()
    assert world.witness.key.verify(note)[0] == "valid"
    reborn = Witness(WITNESS, world.witness_key, world.witness.trusted, world.dir / "w.json")
    assert reborn.latest(world.log.origin)[0] == 6


async def test_witness_cli_and_app(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main
    from gateway.cli.witness import load_witness
    from gateway.receipts.canonical import b64
    from gateway.receipts.signing import raw_public

    log_key = ed25519.Ed25519PrivateKey.generate()
    pub = b64(raw_public(log_key.public_key()))
    assert main(["witness", "init", "--dir", str(tmp_path / "w"), "--name", WITNESS,
                 "--trust-log", f"ztgate.local/={pub}"]) == 0  # fmt: skip
    vkey = capsys.readouterr().out.strip()
    assert vkey.startswith(WITNESS + "+")
    assert main(["witness", "init", "--dir", str(tmp_path / "w"), "--name", WITNESS]) == 2
    w = load_witness(tmp_path / "w")
    assert w.key.vkey() == vkey
    rl = ReceiptLog.open(tmp_path / "logs", log_key, ORIGIN)
    try:
        async with _client(witness_app(w)) as client:
            await rl.append(LogEntry("revocation", hashlib.sha256(b"a").digest()))
            note = await rl.checkpoint()
            r = await client.post("/add-checkpoint", content=add_checkpoint_body(0, [], note))
            assert r.status_code == 200 and r.text.startswith("\u2014 " + WITNESS + " ")
            assert (await client.get("/")).text.strip() == vkey
    finally:
        await rl.close()


def test_cosignature_format() -> None:
    """tlog-cosignature/v1: key id (type 0x04) || u64 timestamp || Ed25519 signature."""
    key = ed25519.Ed25519PrivateKey.generate()
    c = Cosigner(WITNESS, key)
    text = Checkpoint("o.example/x", 1, leaf_hash(b"a"), 5).text()
    name, blob = c.cosign(text, 1700000000)
    assert name == WITNESS and len(blob) == 4 + 8 + 64
    assert int.from_bytes(blob[4:12], "big") == 1700000000
    msg = b"cosignature/v1\ntime 1700000000\n" + text.encode()
    key.public_key().verify(blob[12:], msg)
    pub = key.public_key().public_bytes_raw()
    assert blob[:4] == hashlib.sha256(WITNESS.encode() + b"\n\x04" + pub).digest()[:4]


def test_signed_note_key_id_and_format() -> None:
    """signed-note: key id = SHA-256(name || 0x0A || 0x01 || key)[:4]; em-dash lines."""
    key = ed25519.Ed25519PrivateKey.generate()
    nk = NoteKey("example.com/log", key.public_key())
    pub = key.public_key().public_bytes_raw()
    assert nk.key_id == hashlib.sha256(b"example.com/log\n\x01" + pub).digest()[:4]
    text = Checkpoint("example.com/log", 3, leaf_hash(b"a")).text()
    note = SignedNote(text, (nk.sign(key, text),))
    rendered = note.render()
    assert rendered.startswith("example.com/log\n3\n") and "\n\n\u2014 example.com/log " in rendered
    assert SignedNote.parse(rendered) == note and nk.verify(note) is True
    assert NoteKey.from_vkey(nk.vkey()) == nk


# ============================================================================ endpoints


async def test_log_endpoints(world: World) -> None:
    issued = [await world.receipt() for _ in range(3)]
    await world.checkpoint()
    pending = await world.receipt()
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/", app=log_routes(world.log))])
    lid = world.log.log_id
    async with _client(app) as client:
        logs = (await client.get("/log")).json()["logs"]
        assert logs[0]["log_id"] == lid and logs[0]["checkpoint_vkey"].startswith(world.log.origin)
        cp = await client.get(f"/log/{lid}/checkpoint")
        assert cp.status_code == 200 and cp.text.startswith(world.log.origin + "\n4\n")
        r = await client.get(
            f"/log/{lid}/inclusion", params={"receipt": issued[1].receipt.receipt_id}
        )
        assert r.status_code == 200 and r.text.startswith("c2sp.org/tlog-proof@v1\nindex 2\n")
        r = await client.get(
            f"/log/{lid}/inclusion", params={"receipt": pending.receipt.receipt_id}
        )
        assert r.status_code == 202 and r.json()["status"] == "pending"
        assert (
            await client.get(f"/log/{lid}/inclusion", params={"receipt": "nope"})
        ).status_code == 400
        guessed = issued[1].receipt.receipt_id[:-4] + "0000"
        assert (
            await client.get(f"/log/{lid}/inclusion", params={"receipt": guessed})
        ).status_code == 404
        r = await client.get(f"/log/{lid}/consistency", params={"first": 1, "second": 3})
        assert r.status_code == 200 and len(r.text.splitlines()) == len(world.log.consistency(1, 3))
        assert (
            await client.get(f"/log/{lid}/consistency", params={"first": 1, "second": 9})
        ).status_code == 400
        assert (await client.get("/log/unknown/checkpoint")).status_code == 404


async def test_served_proof_outlives_an_uncosigned_checkpoint(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint signed while the witness is down (as when a replica is killed between
    signing and cosigning) is never cosigned: the checkpointer only pushes later heads.
    The proof the API serves must then move to a later, cosigned checkpoint, or a single
    receipt could never pass `ztgate verify --require-witness`."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount

    from gateway.cli import main
    from gateway.ports import free_port

    issued = [await world.receipt() for _ in range(3)]
    # A real witness URL with nothing listening: the push fails, the checkpoint is kept.
    down = WitnessClient(world.witness.key, f"http://127.0.0.1:{free_port()}")
    try:
        alone = await Checkpointer(lambda: world.log, [down]).tick()
    finally:
        await down.aclose()
    assert [name for name, _ in alone.signatures] == [world.log.origin]
    target = issued[1]
    trust = world.write_trust(tmp_path / "trust.json")
    app = Starlette(routes=[Mount("/", app=log_routes(world.log))])

    async def verdicts(tag: str) -> tuple[int, int, int]:
        """`ztgate verify --require-witness` on what a client is served: the body of
        GET /v2/receipts/{id} as the gateway renders it, and the receipt with the proof
        of GET /log/{id}/inclusion beside it; and, without a witness policy, the body."""
        body = target.signed.to_dict()
        body["inclusion_proof"] = world.log.proof(target.receipt.index)  # as read_receipt
        api = tmp_path / f"api-{tag}.json"
        api.write_bytes(JSONResponse(body).body)
        async with _client(app) as c:
            r = await c.get(
                f"/log/{world.log.log_id}/inclusion",
                params={"receipt": target.receipt.receipt_id},
            )
        assert r.status_code == 200
        stored = tmp_path / f"stored-{tag}.json"
        stored.write_bytes(target.signed.to_bytes())
        stored.with_suffix(".tlog-proof").write_text(r.text)
        args = ["--trust", str(trust), "--require-witness", WITNESS]
        rcs = (
            main(["verify", str(api), *args]),
            main(["verify", str(stored), *args]),
            main(["verify", str(api), "--trust", str(trust)]),
        )
        capsys.readouterr()
        return rcs

    # Control: only the uncosigned checkpoint includes it: not witnessed (yet), though
    # the proof is otherwise valid.
    assert await verdicts("before") == (1, 1, 0)
    later = await world.receipt()
    cosigned = await world.checkpoint()
    assert WITNESS in [name for name, _ in cosigned.signatures]
    assert await verdicts("after") == (0, 0, 0)
    proof = world.log.proof(target.receipt.index)
    assert proof is not None and proof.endswith(cosigned.render())
    # A receipt only the cosigned checkpoint includes gets it too.
    assert (world.log.proof(later.receipt.index) or "").endswith(cosigned.render())


# ============================================================================ denials


async def test_identical_denials_are_coalesced(world: World) -> None:
    now = [0.0]

    async def issue_fn(**kw: object) -> Issued:
        return await issue(world.log, world.signer, kind="denial", **kw)  # type: ignore[arg-type]

    co = DenialCoalescer(issue_fn, window_s=10, clock=lambda: now[0])
    client = ClientRef("spiffe://ztgate.local/client/mallory", "99", "CN=client CA")
    model = ModelRef("risk", "1", "cd" * 32)
    denial = Denial("urn:ztgate:forbidden", "model not allowed")
    first, coalesced = await co.deny(client=client, model=model, denial=denial)
    assert not coalesced and first.receipt.denial == denial
    for _ in range(49):
        r, coalesced = await co.deny(client=client, model=model, denial=denial)
        assert coalesced and r is first
    _, coalesced = await co.deny(client=client, model=model, denial=Denial("urn:x", "other"))
    assert not coalesced
    assert world.log.size == 3  # log_start and two denials
    now[0] = 11.0
    await co.deny(client=client, model=model, denial=denial)  # closes the run, starts anew
    await co.flush()
    bodies = [SignedReceipt.from_bytes(b.body).receipt for b in world.log.bodies()]
    counted = [r for r in bodies if r.denial and r.denial.count > 1]
    assert len(counted) == 1 and counted[0].denial is not None
    assert counted[0].denial.count == 49 and counted[0].denial.follows == first.receipt.receipt_id


# ======================================================================= lean per request (#19)


async def test_a_receipt_is_canonicalised_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signing, the log's body and the summary (read twice, as the HTTP front does: a
    parameter and a header) share one RFC 8785 encoding. The real method, counted."""
    calls: list[int] = []
    real = Receipt.to_canonical

    def counted(self: Receipt) -> bytes:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Receipt, "to_canonical", counted)
    issued = await world.receipt()
    lines = {issued.summary, issued.summary}
    assert len(calls) == 1
    monkeypatch.undo()
    # The reused encoding is the RFC 8785 one, and the summary is what a fresh one gives.
    canonical = issued.receipt.to_canonical()
    assert issued.signed.canonical == canonical == rfc8785.dumps(issued.receipt.to_dict())
    fresh = " ".join(
        (
            "ztgate-receipt/v1",
            issued.receipt.receipt_id,
            b64(hashlib.sha256(canonical).digest()),
            issued.receipt.key_id,
            b64(issued.signed.signature),
        )
    )
    assert lines == {fresh} and verify_summary(fresh, world.keyset, issued.receipt)
    body = world.log.body(issued.receipt.receipt_id)
    assert body is not None and body.body == issued.signed.to_bytes()


async def test_salt_and_nonce_from_one_seed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """One 16-byte draw per receipt gives its salt and its id's nonce; a request's receipt
    seed comes from the request's own one draw, and the public request id does not give
    it away (domain-separated hashes of a secret)."""
    seed = os.urandom(16)
    salt, nonce = derive(seed)
    issued = await world.receipt(seed=seed)
    assert issued.salt == salt and len(salt) == 32
    assert issued.receipt.receipt_id.endswith("." + nonce)
    # the salt is not in the receipt, and the commitments are under it
    assert b64(salt) not in issued.signed.to_bytes().decode()
    assert issued.receipt.inputs[0].commitment == commit_tensor(
        _tensor([[5.1, 3.5, 1.4, 0.2]]), salt
    )
    # Another seed, other values; no seed given: one kernel draw, here in `issue`.
    draws: list[int] = []
    real = os.urandom

    def counted(n: int) -> bytes:
        draws.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counted)
    other = await world.receipt()
    monkeypatch.undo()
    assert draws == [16]
    assert other.salt not in (None, salt) and not other.receipt.receipt_id.endswith(nonce)
    # A request: its id and its receipt's seed both come from one secret draw.
    came = Incoming(scope={}, headers={}, body=body_of(b""))
    again = Incoming(scope={}, headers={}, body=body_of(b""))
    assert came.request_id == request_id_of(came.seed) != again.request_id
    assert len(came.request_id) == 32 and came.receipt_seed not in (came.seed, again.receipt_seed)
    assert came.seed.hex() not in came.request_id and came.receipt_seed.hex() != came.request_id
    for s in (came.seed, came.receipt_seed):
        assert derive(s)[1] not in came.request_id


def test_killed_with_a_stale_head_marker_loses_no_receipt(tmp_path: Path) -> None:
    """The marker is written at most every ~50 ms, so after a crash it may lag the log.
    A child appends receipts and is SIGKILLed after the 200th; the marker is then put back
    to a head the log really had earlier (what a lagging marker holds). Reopened for
    writing, the same log continues with every receipt that was returned, and appends.
    The refusal side (a marker ahead of the log) is
    test_block_level_restore_caught_by_the_head_marker."""
    logs, marker = tmp_path / "logs", tmp_path / "logs.head"
    log_key = tmp_path / "log.key"
    log_key.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes_raw()  # the child's and ours
    )
    child = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from gateway.receipts.issue import issue
        from gateway.receipts.log import ReceiptLog
        from gateway.receipts.model import Denial
        from gateway.receipts.signing import Signer

        async def main():
            raw = Path({str(log_key)!r}).read_bytes()
            key = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
            rl = ReceiptLog.open(Path({str(logs)!r}), key, {ORIGIN!r})
            signer = Signer(ed25519.Ed25519PrivateKey.generate())
            async def one():
                while True:
                    r = await issue(rl, signer, kind="denial", denial=Denial("t", "r"))
                    sys.stdout.write(r.receipt.receipt_id + "\\n")
                    sys.stdout.flush()
            await asyncio.gather(*(one() for _ in range(32)))
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    assert proc.stdout is not None
    returned: list[str] = []
    early: bytes | None = None
    while len(returned) < 200:
        line = proc.stdout.readline()
        assert line, "child died"
        returned.append(line.decode().strip())
        if len(returned) == 20:
            early = marker.read_bytes()  # a head the log had by then
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    returned += [line.decode().strip() for line in proc.stdout.read().splitlines()]
    assert early is not None
    marker.write_bytes(early)
    stale = HeadMarker(marker).read()
    assert stale is not None
    key = ed25519.Ed25519PrivateKey.from_private_bytes(log_key.read_bytes())

    async def reopen() -> None:
        rl = ReceiptLog.open(logs, key, ORIGIN)
        try:
            assert rl.frozen_reason is None and rl.log_id == stale.log_id
            assert stale.size < len(returned) <= rl.size - 1  # leaf 0 is the log_start
            for rid in returned:
                body = rl.body(rid)
                assert body is not None, f"receipt {rid} was returned but is not in the log"
                assert rl.entry(body.index).sha256 == hashlib.sha256(body.body).digest()
            await rl.append(LogEntry("revocation", hashlib.sha256(b"after").digest()))
        finally:
            await rl.close()
        head = HeadMarker(marker).read()
        assert head is not None and head.size == rl.size  # caught up at close

    asyncio.run(reopen())
