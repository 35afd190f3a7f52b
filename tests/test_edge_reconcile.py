"""An edge site's log reconciled with the core over a link that is really cut (DDIL).

The edge: a receipt log with its checkpointer. The core: a witness with a vault, served
by uvicorn on loopback. Between them the project's TCP fault proxy, so a cut link is a
reset TCP connection and a resumed upload crosses a real socket. Each refusal has its
positive control: the same log, unaltered, reconciled and cosigned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway import ports
from gateway.faultproxy import FaultProxy
from gateway.receipts import checkpointer as checkpointer_module
from gateway.receipts import vault as vault_module
from gateway.receipts.bundle import BundleReader
from gateway.receipts.checkpointer import Checkpointer, WitnessClient
from gateway.receipts.entry import LogEntry
from gateway.receipts.export import export_bundle
from gateway.receipts.issue import Issued
from gateway.receipts.log import ReceiptLog
from gateway.receipts.merkle import MerkleTree, leaf_hash
from gateway.receipts.note import Checkpoint, NoteKey, SignedNote
from gateway.receipts.vault import Upload, Vault, export_vault
from gateway.receipts.verify import TrustedLogKey, TrustPolicy, verify_bundle
from gateway.receipts.witness import Witness, WitnessRefused, witness_app
from tests.test_receipts import World, make_world
from tests.test_zk import zk_dir  # noqa: F401  (a fixture: iris onboarded for zk, dev SRS)


@dataclass
class Site:
    world: World  # the edge: its log, keys, receipts
    core: Witness
    vault: Vault
    proxy: FaultProxy
    client: WitnessClient
    checkpointer: Checkpointer
    url: str  # the core, direct (not through the proxy)
    vault_path: Path

    async def reconcile(self) -> Checkpoint:
        note = await self.checkpointer.tick()
        return Checkpoint.parse_text(note.text)

    def cosigned_by_core(self) -> int:
        return self.world.log.witness_size(self.core.key.name)


@pytest_asyncio.fixture(loop_scope="function")
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    world = await make_world(tmp_path, witness_http=False)
    vault = Vault(tmp_path / "core" / "vault.db")
    core = Witness(
        "core.example/witness",
        world.witness_key,
        world.witness.trusted,
        tmp_path / "core" / "state.json",
        vault=vault,
    )
    port = ports.free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            witness_app(core), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    serving = asyncio.ensure_future(server.serve())
    for _ in range(3000):  # bounded: 30 s
        if server.started:
            break
        await asyncio.sleep(0.01)
    proxy = FaultProxy(("127.0.0.1", port))
    await proxy.start()
    client = WitnessClient(
        core.key,
        f"http://127.0.0.1:{proxy.port}",
        httpx.AsyncClient(timeout=5.0),
        vault=True,
    )
    yield Site(
        world,
        core,
        vault,
        proxy,
        client,
        Checkpointer(lambda: world.log, [client]),
        f"http://127.0.0.1:{port}",
        tmp_path / "core" / "vault.db",
    )
    await client.aclose()
    await proxy.close()
    server.should_exit = True
    await serving
    if not world.log._closed:
        await world.log.close()
    vault.close()


async def _receipts(world: World, n: int) -> None:
    for _ in range(n):
        await world.receipt()


def _vault_matches_log(site: Site, size: int) -> None:
    """What the core holds is the edge's log: each leaf, each receipt body under it."""
    origin = site.world.log.origin
    leaves = site.vault.leaves(origin, size)
    assert leaves == [e.leaf_data() for _, e in site.world.log.entries(0, size)]
    tree = MerkleTree(leaf_hash(x) for x in leaves)
    assert tree.root() == site.world.log.tree.root(size)
    for i, data in enumerate(leaves):
        entry = LogEntry.parse(data)
        if entry.type == "receipt":
            body = site.vault.blob(origin, i)
            assert body is not None and hashlib.sha256(body).digest() == entry.sha256


async def test_a_cut_off_edge_keeps_logging_and_is_cosigned_once_the_link_returns(
    site: Site,
) -> None:
    await _receipts(site.world, 3)
    first = await site.reconcile()
    assert site.cosigned_by_core() == first.size  # positive control: linked, cosigned
    site.proxy.cut()
    await _receipts(site.world, 20)  # the edge keeps answering, and logging
    cut = await site.reconcile()
    assert cut.size == first.size + 20
    assert site.cosigned_by_core() == first.size  # nothing reached the core
    assert site.checkpointer.push_failures[site.client.name] >= 1
    site.proxy.restore()
    back = await site.reconcile()
    assert back.size == cut.size and site.cosigned_by_core() == back.size
    _vault_matches_log(site, back.size)
    # The checkpoint the core keeps carries its own cosignature over the edge's note.
    (size, note), *_ = reversed(site.vault.checkpoints(site.world.log.origin))
    assert size == back.size and note.startswith(site.world.log.checkpoint_at(size).text)  # type: ignore[union-attr]
    assert site.core.key.name in note


async def test_an_upload_cut_mid_way_resumes_where_the_core_stopped(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer_module, "UPLOAD_LEAVES", 8)
    await _receipts(site.world, 100)
    # Each upload's answer is ~20 bytes of JSON plus headers: the link drops after a few.
    site.proxy.drop_after(900)
    await site.reconcile()
    origin = site.world.log.origin
    partial = site.vault.stored(origin)
    assert 0 < partial < 101 and site.cosigned_by_core() == 0
    site.proxy.restore()
    sent_before = site.proxy.stats.bytes_up
    done = await site.reconcile()
    assert site.cosigned_by_core() == done.size
    _vault_matches_log(site, done.size)
    # Resumed, not restarted: the second round sent less than the whole log again would.
    full = sum(len(x) for x in site.vault.leaves(origin)) + sum(
        len(b) for i in range(done.size) if (b := site.vault.blob(origin, i)) is not None
    )
    assert site.proxy.stats.bytes_up - sent_before < full


def _forge(site: Site, leaves: list[bytes]) -> tuple[SignedNote, MerkleTree]:
    """What a captured edge can make: any tree, signed with the site's own log key."""
    tree = MerkleTree(leaf_hash(x) for x in leaves)
    origin = site.world.log.origin
    cp = Checkpoint(origin, len(leaves), tree.root(), int(time.time()))
    name, sig = NoteKey(origin, site.world.log_key.public_key()).sign(site.world.log_key, cp.text())
    return SignedNote(cp.text(), ((name, sig),)), tree


def _leaves(site: Site, end: int) -> list[bytes]:
    return [e.leaf_data() for _, e in site.world.log.entries(0, end)]


async def test_history_the_core_witnessed_cannot_be_rewritten(site: Site) -> None:
    await _receipts(site.world, 5)
    await site.reconcile()
    witnessed = site.cosigned_by_core()
    assert witnessed == 6  # positive control: the real log, cosigned
    real = _leaves(site, witnessed)
    other = LogEntry("receipt", hashlib.sha256(b"another answer").digest()).leaf_data()
    forged = [*real[:-1], other, other, other, other]  # leaf 5 rewritten, then grown
    note, tree = _forge(site, forged)
    origin = site.world.log.origin
    async with httpx.AsyncClient(base_url=site.url) as http:
        r = await http.post(
            "/vault/upload",
            params={"origin": origin},
            json=_signed(site, 5, forged[5:]),
        )
        assert r.status_code == 409 and "rewritten" in r.json()["error"]
        with pytest.raises(WitnessRefused) as refused:
            await site.client.add_checkpoint(note, witnessed, tree.consistency_proof)
        assert refused.value.status == 422
        metrics = (await http.get("/metrics")).text
    assert site.core.refusals["rewritten"] == 1 and site.core.refusals["inconsistent"] == 1
    assert 'ztgate_witness_refusals_total{reason="inconsistent"} 1' in metrics
    assert site.vault.leaves(origin, witnessed) == real  # what the core holds is unchanged
    # The real log still reconciles.
    await _receipts(site.world, 1)
    await site.reconcile()
    assert site.cosigned_by_core() == witnessed + 1


async def test_a_truncated_edge_log_is_refused_and_counted(site: Site) -> None:
    await _receipts(site.world, 6)
    await site.reconcile()
    assert site.cosigned_by_core() == 7  # positive control
    note, tree = _forge(site, _leaves(site, 4))
    with pytest.raises(WitnessRefused):
        await site.client.add_checkpoint(note, 3, tree.consistency_proof)
    assert site.core.refusals["truncated"] == 1
    assert site.core.latest(site.world.log.origin)[0] == 7


async def test_a_revoked_site_key_is_refused_from_then_on(site: Site) -> None:
    await _receipts(site.world, 2)
    await site.reconcile()
    assert site.cosigned_by_core() == 3  # positive control (with the log_start leaf)
    site.core.trusted = [dataclasses.replace(t, revoked=True) for t in site.core.trusted]
    await _receipts(site.world, 2)
    await site.reconcile()
    assert site.cosigned_by_core() == 3
    assert site.core.refusals["revoked"] >= 1
    assert site.vault.stored(site.world.log.origin) == 3  # nor are its uploads taken


async def test_checkpoint_times_must_lie_between_the_last_one_and_the_cores_now(
    site: Site,
) -> None:
    await _receipts(site.world, 2)
    await site.reconcile()
    first = site.cosigned_by_core()
    assert first == 3  # positive control
    # A captured edge post-dating its checkpoint beyond the allowed skew.
    site.world.log.clock = lambda: time.time() + 3600
    await _receipts(site.world, 1)
    await site.reconcile()
    assert site.cosigned_by_core() == first and site.core.refusals["time"] == 1
    # And backdating below the last cosigned time.
    site.world.log.clock = lambda: time.time() - 3600
    await _receipts(site.world, 1)
    await site.reconcile()
    assert site.cosigned_by_core() == first and site.core.refusals["time"] == 2
    site.world.log.clock = time.time
    await _receipts(site.world, 1)
    await site.reconcile()
    assert site.cosigned_by_core() == first + 3


async def test_the_vault_refuses_bodies_that_do_not_hash_to_their_leaf_and_bombs(
    site: Site,
) -> None:
    origin = site.world.log.origin
    await _receipts(site.world, 2)
    entries = list(site.world.log.entries(0, 3))
    body = site.world.log.body_at(1)
    assert body is not None
    raw = [e.leaf_data() for _, e in entries]
    good = _signed(site, 0, raw, {1: body})
    bad = _signed(site, 0, raw, {1: body + b" "})
    unsigned = {**good, "note": ""}
    other_key = _signed(site, 0, raw, {1: body}, key=ed25519.Ed25519PrivateKey.generate())
    async with httpx.AsyncClient(base_url=site.url) as http:
        r = await http.post("/vault/upload", params={"origin": origin}, json=bad)
        assert r.status_code == 400 and "does not hash" in r.json()["error"]
        bomb = gzip.compress(b"[" * (32 << 20))
        r = await http.post(
            "/vault/upload",
            params={"origin": origin},
            content=bomb,
            headers={"content-encoding": "gzip"},
        )
        assert r.status_code == 400 and len(bomb) < (1 << 20)
        r = await http.post("/vault/upload", params={"origin": "elsewhere/x"}, json=good)
        assert r.status_code == 400  # no trusted key for that origin
        for forged_upload in (unsigned, other_key):  # only the edge's own log key may upload
            r = await http.post("/vault/upload", params={"origin": origin}, json=forged_upload)
            assert r.status_code == 400 and "not signed" in r.json()["error"]
        r = await http.post("/vault/upload", params={"origin": origin}, json=good)
        assert r.status_code == 200 and r.json() == {"stored": 3}  # positive control


def _signed(
    site: Site,
    start: int,
    leaves: list[bytes],
    blobs: dict[int, bytes] | None = None,
    key: ed25519.Ed25519PrivateKey | None = None,
    evidence: dict[int, dict[str, str]] | None = None,
    material: dict[str, bytes] | None = None,
) -> dict[str, object]:
    """An upload as the edge (or, with `key`, someone else) signs it."""
    origin = site.world.log.origin
    up = Upload(start, tuple(leaves), dict(blobs or {}), "", evidence or {}, material or {})
    signer = key or site.world.log_key
    name, sig = NoteKey(origin, signer.public_key()).sign(signer, up.note_text(origin))
    note = SignedNote(up.note_text(origin), ((name, sig),)).render()
    return dataclasses.replace(up, note=note).to_json()


def base64_of(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_uploads_are_json_not_pickles() -> None:
    """The wire format is plain JSON an auditor can read (and the core parses strictly)."""
    from gateway.receipts.vault import Upload, VaultError

    up = Upload(0, (b'{"sha256":"00","type":"receipt"}',), {})
    assert Upload.from_json(json.loads(json.dumps(up.to_json()))) == up
    with pytest.raises(VaultError):
        Upload.from_json({"start": -1, "leaves": [], "blobs": {}})


async def test_revoking_a_site_key_with_the_cli_takes_effect_at_the_next_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ztgate witness revoke-log` records what the core had cosigned when it revoked the
    key; a witness loaded afterwards (with its vault) refuses that key's checkpoints."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.cli import main
    from gateway.cli.witness import load_witness
    from gateway.receipts.canonical import b64
    from gateway.receipts.signing import raw_public
    from gateway.receipts.witness import add_checkpoint_body

    log_key = ed25519.Ed25519PrivateKey.generate()
    pub = b64(raw_public(log_key.public_key()))
    d = tmp_path / "w"
    assert main(["witness", "init", "--dir", str(d), "--name", "core.example/w",
                 "--trust-log", f"ztgate.local/={pub}"]) == 0  # fmt: skip
    rl = ReceiptLog.open(tmp_path / "logs", log_key, "ztgate.local/edge-1/receipts")
    try:
        await rl.append(LogEntry("revocation", hashlib.sha256(b"a").digest()))
        note = await rl.checkpoint()
        body = add_checkpoint_body(0, [], note)
        w = load_witness(d)
        assert (await w.add_checkpoint(body))[0] == 200  # positive control
        capsys.readouterr()
        assert main(["witness", "revoke-log", "--dir", str(d), "ztgate.local/", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["cosigned_at_revocation"] == {rl.origin: 2}
        revoked = load_witness(d, with_vault=True)
        await rl.append(LogEntry("revocation", hashlib.sha256(b"b").digest()))
        later = await rl.checkpoint()
        status, _, _ = await revoked.add_checkpoint(
            add_checkpoint_body(2, rl.consistency(2, 3), later)
        )
        assert status == 403 and revoked.refusals["revoked"] == 1
        assert revoked.vault is not None
        revoked.vault.close()
        assert main(["witness", "revoke-log", "--dir", str(d), "elsewhere/"]) == 2
    finally:
        await rl.close()


def _core_trust(site: Site) -> TrustPolicy:
    """The auditor's trust file: the edge's receipt and log keys, the core as witness."""
    return TrustPolicy(
        site.world.keyset,
        [TrustedLogKey("ztgate.local/", site.world.log_key.public_key())],
        {site.core.key.name: site.core.key},
    )


async def test_a_destroyed_edges_receipts_verify_from_the_cores_vault(
    site: Site, tmp_path: Path
) -> None:
    await _receipts(site.world, 12)
    await site.reconcile()
    held = site.world.issued[3]  # what one client kept
    origin, log_vkey = site.world.log.origin, site.world.log.note_key().vkey()
    await site.world.log.close()
    shutil.rmtree(site.world.log_dir)  # the edge is gone
    out = tmp_path / "from-core"
    written = export_vault(
        site.vault, {origin: log_vkey}, {site.core.key.name: site.core.key.vkey()}, out
    )
    assert written == 12
    report = verify_bundle(BundleReader(out), _core_trust(site), require=[site.core.key.name])
    assert report.status == "valid", [f for f in report.findings if f.status != "valid"]
    assert held.receipt.receipt_id in report.receipts
    # Negative control built the same way: one stored body altered at the core.
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    path = next((forged / "logs").glob(f"*/receipts/{held.receipt.receipt_id}.json"))
    path.write_bytes(path.read_bytes().replace(b'"iris"', b'"irid"'))
    assert verify_bundle(BundleReader(forged), _core_trust(site)).status == "invalid"


async def test_receipts_the_core_has_not_cosigned_are_reported_so(
    site: Site, tmp_path: Path
) -> None:
    await _receipts(site.world, 3)
    await site.reconcile()
    site.proxy.cut()
    await _receipts(site.world, 4)  # offline: checkpointed by the edge only
    await site.reconcile()
    out = tmp_path / "edge-export"
    export_bundle(site.world.log_dir, out)
    report = verify_bundle(BundleReader(out), _core_trust(site), require=[site.core.key.name])
    offline = {i.receipt.receipt_id for i in site.world.issued[3:]}
    online = {i.receipt.receipt_id for i in site.world.issued[:3]}
    uncosigned = {
        f.subject.split()[-1]
        for f in report.findings
        if (f.status, f.code) == ("pending", "not-yet-witnessed")
    }
    assert uncosigned == offline  # named, each of them, and only them
    assert report.status == "pending"  # not invalid: the core has not cosigned them yet
    valid = {f.subject.split()[-1] for f in report.findings if f.status == "valid"}
    assert online <= valid
    site.proxy.restore()
    await site.reconcile()  # reconciled: the same receipts now verify
    again = tmp_path / "edge-export-2"
    export_bundle(site.world.log_dir, again)
    report = verify_bundle(BundleReader(again), _core_trust(site), require=[site.core.key.name])
    assert report.status == "valid"


async def test_the_log_waits_for_revocations_from_the_core_first(site: Site) -> None:
    """After a reconnection an edge pulls the core's CRL before it uploads its log
    (gateway/uplink.py sets `ready`); until then the upload is held back and counted."""
    await _receipts(site.world, 2)
    pulled = False
    site.client.ready = lambda: pulled
    await site.reconcile()
    assert site.cosigned_by_core() == 0 and site.vault.stored(site.world.log.origin) == 0
    assert site.checkpointer.push_failures[site.client.name] == 1
    pulled = True  # the CRL came in
    await site.reconcile()
    assert site.cosigned_by_core() == 3


async def test_a_receipt_a_client_holds_is_flagged_when_the_reconciled_log_lacks_it(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A captured edge gives a client a receipt, then rewrites what it had not yet handed
    to the core and reconciles that: the core cosigns the rewritten history (it never saw
    the receipt), and `ztgate verify --held` on the core's export flags the client's
    receipt. A receipt from before the last reconciliation is found (the control)."""
    from gateway.cli import main

    await _receipts(site.world, 3)
    await site.reconcile()
    witnessed = site.cosigned_by_core()
    kept = site.world.issued[1]  # reconciled before the capture
    given = await site.world.receipt()  # then handed to a client, never reconciled
    held_old, held_new = tmp_path / "old.json", tmp_path / "new.json"
    held_old.write_bytes(kept.signed.to_bytes())
    held_new.write_bytes(given.signed.to_bytes())
    # The edge rewrites from `witnessed` on and reconciles the rewritten log.
    origin = site.world.log.origin
    other = LogEntry("revocation", hashlib.sha256(b"rewritten").digest()).leaf_data()
    forged = [*_leaves(site, witnessed), other]
    note, tree = _forge(site, forged)
    async with httpx.AsyncClient(base_url=site.url) as http:
        r = await http.post(
            "/vault/upload",
            params={"origin": origin},
            json=_signed(site, witnessed, [other]),
        )
        assert r.status_code == 200
    await site.client.add_checkpoint(note, witnessed, tree.consistency_proof)
    bundle = tmp_path / "from-core"
    export_vault(
        site.vault,
        {origin: site.world.log.note_key().vkey()},
        {site.core.key.name: site.core.key.vkey()},
        bundle,
    )
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps(_core_trust(site).to_dict()))
    args = ["verify", str(bundle), "--trust", str(trust), "--json"]
    assert main([*args, "--held", str(held_old)]) == 0  # the bundle and the old receipt
    capsys.readouterr()
    assert main([*args, "--held", str(held_old), "--held", str(held_new)]) == 1
    report = json.loads(capsys.readouterr().out)
    codes = {f["subject"]: f["code"] for f in report["findings"] if "held" in f["subject"]}
    assert codes == {
        f"held receipt {kept.receipt.receipt_id}": "held-in-log",
        f"held receipt {given.receipt.receipt_id}": "absent-from-log",
    }
    # A receipt someone made up (not signed by a trusted key) says nothing about the log.
    made_up = json.loads(held_new.read_bytes())
    made_up["sig"] = base64_of(bytes(64))
    held_fake = tmp_path / "fake.json"
    held_fake.write_text(json.dumps(made_up))
    assert main([*args, "--held", str(held_fake)]) == 1
    report = json.loads(capsys.readouterr().out)
    codes = {f["code"] for f in report["findings"] if "held" in f["subject"]}
    assert codes == {"bad-signature"}


# ----------------------------------------------------------------- zk evidence in the vault


async def _zk_receipt(
    site: Site, onboarded: Path, tmp_path: Path
) -> tuple[Issued, dict[str, bytes]]:
    """A zk answer as the edge logs it: a real ezkl proof of iris (the dev SRS of
    tests/test_zk.py), its receipt, and the evidence saved beside the log as the pipeline
    saves it (`ReceiptService.save_evidence`). Returns the receipt and its evidence files."""
    from gateway.pipeline.execute import RECEIPTED_EVIDENCE
    from gateway.receipts.model import ModelRef, VerificationRef, ext_value
    from gateway.receipts.service import ReceiptService
    from tests.test_zk import X
    from zk.prover import Prover
    from zk.record import NODE_DIR, VerifierArtefacts
    from zk.verifier import verify_proof

    a = VerifierArtefacts.from_dir(onboarded)
    _, raw = await asyncio.to_thread(Prover(onboarded / NODE_DIR, workdir=tmp_path).prove, X)
    result = verify_proof(raw, X, a.record, a.vk, a.settings, a.srs)
    assert result, result
    issued = await site.world.receipt(
        model=ModelRef("iris", "1", a.record.model_sha256),
        verification=VerificationRef(
            "zk", "verified", result.instances_sha256, result.proof_sha256
        ),
        extensions={
            k: ext_value(v) for k, v in a.record.evidence().items() if k in RECEIPTED_EVIDENCE
        },
    )
    service = ReceiptService.__new__(ReceiptService)
    service.log = site.world.log  # only save_evidence is used: it needs the log's path
    service.save_evidence(
        issued.receipt.receipt_id,
        {
            "proof.json": result.canonical_proof,
            **{name: (Path(p), d) for name, (p, d) in a.material().items()},
        },
    )
    files = {n: await asyncio.to_thread(Path(p).read_bytes) for n, (p, _) in a.material().items()}
    return issued, {"proof.json": result.canonical_proof, **files}


@pytest.mark.slow
async def test_an_edge_zk_receipt_verifies_its_proof_from_the_cores_vault(
    site: Site,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upload carries each zk receipt's proof and verification material; the vault
    takes only what the signed receipt commits to, and its export re-verifies the proof."""
    from gateway.cli import main

    onboarded: Path = request.getfixturevalue("zk_dir")  # tests/test_zk.py's
    await _receipts(site.world, 1)
    issued, files = await _zk_receipt(site, onboarded, tmp_path / "prove")
    refs = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    proof = files["proof.json"]
    origin, index = site.world.log.origin, issued.receipt.index
    body = site.world.log.body_at(index)
    assert body is not None
    leaves = _leaves(site, index + 1)
    blobs = {i: b for i in range(index + 1) if (b := site.world.log.body_at(i)) is not None}
    blobs[0] = site.world.log.record(0) or b""
    real = refs["proof.json"]
    other = proof.replace(b'"instances"', b'"instances" ', 1)  # another proof file
    swapped = hashlib.sha256(other).hexdigest()
    async with httpx.AsyncClient(base_url=site.url) as http:

        async def post(**kw: object) -> httpx.Response:
            return await http.post(
                "/vault/upload", params={"origin": origin}, json=_signed(site, **kw)
            )  # type: ignore[arg-type]

        # A proof whose digest is not the one the receipt names is refused...
        r = await post(
            start=0, leaves=leaves, blobs=blobs, evidence={index: {**refs, "proof.json": swapped}}
        )
        assert r.status_code == 400 and "commits to" in r.json()["error"]
        # ...and the same upload naming the receipt's own proof is taken (the control).
        r = await post(start=0, leaves=leaves, blobs=blobs, evidence={index: refs})
        assert r.status_code == 200, r.text
        missing = (await http.get("/vault/missing", params={"origin": origin})).json()
        assert missing == {"missing": [[index, n, d] for n, d in sorted(refs.items())]}
        for after in ("--5", "x", "1" * 30):
            r = await http.get("/vault/missing", params={"origin": origin, "after": after})
            assert r.status_code == 400
        # The file itself: one no receipt names, or not hashing to its name, is refused.
        r = await post(start=0, leaves=[], material={swapped: other})
        assert r.status_code == 400 and "names that evidence" in r.json()["error"]
        r = await post(start=0, leaves=[], material={real: other})
        assert r.status_code == 400 and "does not hash" in r.json()["error"]
        # The receipt names its zk record by content: a record of another model is refused.
        record = json.loads(files["zk.json"])
        forged = json.dumps({**record, "model_sha256": "00" * 32}).encode()
        named = {**refs, "zk.json": hashlib.sha256(forged).hexdigest()}
        r = await post(start=0, leaves=leaves, blobs=blobs, evidence={index: named})
        assert r.status_code == 200  # pending leaves: the edge may name them again
        r = await post(start=0, leaves=[], material={named["zk.json"]: forged})
        assert r.status_code == 400 and "zk record" in r.json()["error"]
        r = await post(start=0, leaves=leaves, blobs=blobs, evidence={index: refs})
        assert r.status_code == 200
    assert site.vault.evidence(origin, index) == {}
    # The edge's own round: it names every file, sends what the core lacks (paging through
    # what the core says it lacks, one leaf a page here), and is cosigned.
    later, later_files = await _zk_receipt(site, onboarded, tmp_path / "prove-2")
    monkeypatch.setattr(vault_module, "MAX_MISSING_LISTED", 1)
    await site.reconcile()
    assert site.cosigned_by_core() == later.receipt.index + 1
    assert site.vault.evidence(origin, index) == files  # each file, as the edge holds it
    assert site.vault.evidence(origin, later.receipt.index) == later_files
    # The edge is destroyed; the auditor verifies from the core's export alone.
    log_vkey = site.world.log.note_key().vkey()
    await site.world.log.close()
    shutil.rmtree(site.world.log_dir)
    out = tmp_path / "from-core"
    export_vault(site.vault, {origin: log_vkey}, {site.core.key.name: site.core.key.vkey()}, out)
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps(_core_trust(site).to_dict()))
    args = ["verify", str(out), "--trust", str(trust), "--json", "--allow-dev-srs"]
    capsys.readouterr()
    assert main([*args, "--require-witness", site.core.key.name]) == 0
    report = json.loads(capsys.readouterr().out)
    for rid in (issued.receipt.receipt_id, later.receipt.receipt_id):
        (finding,) = [f for f in report["findings"] if f["subject"] == f"receipt {rid}"]
        assert finding["status"] == "valid" and finding["details"]["proof_reverified"] is True


# ------------------------------------------- the vault's evidence: quotas, erasure, records
#
# These receipts are zk receipts as a captured edge holding its keys signs them: their
# digests point at whatever files it likes (the vault checks commitments, not proofs), so no
# prover is needed. Real edge log, real vault database, real files.


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _fake_zk(
    site: Site, tag: bytes, srs: bytes | None = None, model: str = "cd" * 32
) -> tuple[Issued, dict[str, bytes]]:
    """A zk receipt whose evidence is filler (`srs`: random bytes unless given) with a
    proof naming `tag`; its zk.json is the record of its model and keys."""
    import os

    from gateway.receipts.model import ModelRef, VerificationRef

    instances = os.urandom(8).hex().encode()  # what erasure must leave no trace of
    files = {
        "proof.json": b'{"proof":"' + tag + b'","instances":[["' + instances + b'"]]}',
        "vk": b"vk " + tag,
        "settings.json": b'{"settings":"' + tag + b'"}',
        "srs": os.urandom(64) if srs is None else srs,
    }
    keys = {"vk_sha256": _sha(files["vk"]), "settings_sha256": _sha(files["settings.json"]),
            "srs_sha256": _sha(files["srs"])}  # fmt: skip
    files["zk.json"] = json.dumps({"model_sha256": model, **keys}).encode()
    issued = await site.world.receipt(
        model=ModelRef("iris", "1", model),
        verification=VerificationRef("zk", "verified", "ee" * 32, _sha(files["proof.json"])),
        extensions=keys,
    )
    return issued, files


def _save_evidence(site: Site, issued: Issued, files: dict[str, bytes]) -> None:
    """Beside the edge's log, as the pipeline saves it (what its reconciliation sends)."""
    from gateway.receipts.service import ReceiptService

    service = ReceiptService.__new__(ReceiptService)
    service.log = site.world.log  # only save_evidence is used: it needs the log's path
    service.save_evidence(issued.receipt.receipt_id, dict(files))


def _one_leaf(site: Site, issued: Issued, refs: dict[str, str]) -> Upload:
    """The receipt as leaf 0 of some log, naming `refs` (the vault takes any log's leaves:
    the witness checks who signed them)."""
    body = site.world.log.body_at(issued.receipt.index)
    assert body is not None
    leaf = LogEntry("receipt", hashlib.sha256(body).digest()).leaf_data()
    return Upload(0, (leaf,), {0: body}, "", {0: refs})


def _held_digests(path: Path) -> set[str]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return {str(r[0]) for r in db.execute("SELECT digest FROM material")}
    finally:
        db.close()


async def test_one_edge_fills_only_its_own_share_of_the_vaults_evidence(
    site: Site, tmp_path: Path
) -> None:
    """An edge that re-signs its pending leaves to point at ever new filler files keeps
    only the latest: a file no reference names is deleted, and what it holds counts
    against its own key's quota, however many log ids it starts; another edge still stores
    evidence (the positive control)."""
    import os

    path = tmp_path / "quota" / "vault.db"
    vault = Vault(path, quota=(3 << 20) // 2)  # room for one 1 MiB file, not two
    edge, other = "ztgate.local/", "edge-b.example/"
    a, a_files = await _fake_zk(site, b"a", srs=os.urandom(1 << 20))
    b, b_files = await _fake_zk(site, b"b", srs=os.urandom(1 << 20))
    c, c_files = await _fake_zk(site, b"c", srs=os.urandom(1 << 20))
    origin = f"{edge}gw/log-1"
    try:
        vault.append(origin, _one_leaf(site, a, {"srs": _sha(a_files["srs"])}), edge)
        vault.append(
            origin, Upload(1, (), {}, material={_sha(a_files["srs"]): a_files["srs"]}), edge
        )
        assert vault.evidence(origin, 0) == {"srs": a_files["srs"]}
        # The pending leaf replaced: a's file is named by nothing and goes, so b's fits.
        vault.append(origin, _one_leaf(site, b, {"srs": _sha(b_files["srs"])}), edge)
        assert _held_digests(path) == set()
        vault.append(
            origin, Upload(1, (), {}, material={_sha(b_files["srs"]): b_files["srs"]}), edge
        )
        assert _held_digests(path) == {_sha(b_files["srs"])}
        # At its quota: a new log id under the same key shares it.
        fresh = f"{edge}gw/log-2"
        c_srs = {_sha(c_files["srs"]): c_files["srs"]}
        vault.append(fresh, _one_leaf(site, c, {"srs": _sha(c_files["srs"])}), edge)
        with pytest.raises(vault_module.VaultError, match="quota"):
            vault.append(fresh, Upload(1, (), {}, material=c_srs), edge)
        # Another edge's key has its own share: the same file is taken from it.
        vault.append(f"{other}log-1", _one_leaf(site, c, {"srs": _sha(c_files["srs"])}), other)
        vault.append(f"{other}log-1", Upload(1, (), {}, material=c_srs), other)
        assert vault.evidence(f"{other}log-1", 0) == {"srs": c_files["srs"]}
    finally:
        vault.close()


async def test_a_zk_record_the_vault_holds_is_checked_against_each_receipt_naming_it(
    site: Site, tmp_path: Path
) -> None:
    """Edge B cannot point its receipt at a zk.json held for edge A's receipt of another
    model; a receipt whose model and keys the record does describe may (the control)."""
    path = tmp_path / "records" / "vault.db"
    vault = Vault(path)
    a, a_files = await _fake_zk(site, b"a")
    record = a_files["zk.json"]
    mine = {"zk.json": _sha(record)}
    try:
        vault.append("edge-a.example/log", _one_leaf(site, a, mine), "edge-a.example/")
        vault.append(
            "edge-a.example/log",
            Upload(1, (), {}, material={_sha(record): record}),
            "edge-a.example/",
        )
        other_model, _ = await _fake_zk(site, b"b", model="0f" * 32)
        with pytest.raises(vault_module.VaultError, match="zk record"):
            vault.append(
                "edge-b.example/log", _one_leaf(site, other_model, mine), "edge-b.example/"
            )
        assert vault.stored("edge-b.example/log") == 0
        # The control: the same model and keys (a's receipt, as edge B logged it).
        vault.append("edge-b.example/log", _one_leaf(site, a, mine), "edge-b.example/")
        assert vault.evidence("edge-b.example/log", 0) == {"zk.json": record}
    finally:
        vault.close()


def _vault_files(site: Site) -> bytes:
    """Every byte of the core's vault: the database, its WAL and shared memory."""
    db = site.vault_path
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())


async def test_an_erasure_reaches_the_cores_copy_of_the_evidence(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A zk proof carries the client's inputs and outputs. Erased at the edge, the erasure
    leaf it uploads erases the core's copy; the core's operator erases with `ztgate
    witness erase`. Either way no byte of it is left in the vault's files, while what
    another receipt still names stays (the control)."""
    from gateway.cli import main

    kept, kept_files = await _fake_zk(site, b"kept")
    by_edge, by_edge_files = await _fake_zk(site, b"by-edge")
    by_core, by_core_files = await _fake_zk(site, b"by-core", srs=kept_files["srs"])
    for issued, files in ((kept, kept_files), (by_edge, by_edge_files), (by_core, by_core_files)):
        _save_evidence(site, issued, files)
    await site.reconcile()
    origin = site.world.log.origin
    for issued, files in ((kept, kept_files), (by_edge, by_edge_files)):
        assert site.vault.evidence(origin, issued.receipt.index) == files
    secret = by_edge_files["proof.json"]
    assert secret in _vault_files(site)  # the scan finds it before erasure (control)
    await site.world.log.erase([by_edge.receipt.receipt_id], "erasure-request")
    await site.reconcile()  # uploads the erasure leaf
    assert site.vault.evidence(origin, by_edge.receipt.index) == {}
    assert secret not in _vault_files(site)
    assert site.vault.evidence(origin, kept.receipt.index) == kept_files
    # The core's operator: the command erases only what no other receipt names.
    d = site.vault_path.parent
    args = ["witness", "erase", "--dir", str(d), "--origin", origin]
    assert main([*args, "--index", str(by_core.receipt.index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["references"] == 5
    assert site.vault.evidence(origin, by_core.receipt.index) == {}
    assert by_core_files["proof.json"] not in _vault_files(site)
    assert site.vault.evidence(origin, kept.receipt.index) == kept_files  # its SRS is shared
    assert site.vault.missing(origin) == []  # nothing asked for again
    assert main([*args, "--index", "-1"]) == 2


@pytest.mark.slow
async def test_evidence_erased_at_the_core_is_reported_missing_and_the_rest_verify(
    site: Site,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    """Real proofs: after `ztgate witness erase` of one receipt's evidence, the core's
    export reports that receipt's evidence missing, and the other receipt's proof, whose
    verification material it shared, still re-verifies (the control)."""
    from gateway.cli import main

    onboarded: Path = request.getfixturevalue("zk_dir")  # tests/test_zk.py's
    erased, _ = await _zk_receipt(site, onboarded, tmp_path / "prove-1")
    kept, kept_files = await _zk_receipt(site, onboarded, tmp_path / "prove-2")
    await site.reconcile()
    origin = site.world.log.origin
    assert site.vault.evidence(origin, kept.receipt.index) == kept_files
    d = site.vault_path.parent
    cmd = ["witness", "erase", "--dir", str(d), "--origin", origin]
    assert main([*cmd, "--index", str(erased.receipt.index)]) == 0
    assert site.vault.evidence(origin, erased.receipt.index) == {}
    out = tmp_path / "from-core"
    export_vault(
        site.vault,
        {origin: site.world.log.note_key().vkey()},
        {site.core.key.name: site.core.key.vkey()},
        out,
    )
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps(_core_trust(site).to_dict()))
    capsys.readouterr()
    args = ["verify", str(out), "--trust", str(trust), "--json", "--allow-dev-srs"]
    assert main([*args, "--require-witness", site.core.key.name]) == 1
    findings = {f["subject"]: f for f in json.loads(capsys.readouterr().out)["findings"]}
    gone = findings[f"receipt {erased.receipt.receipt_id}"]
    assert (gone["status"], gone["code"]) == ("invalid", "zk-evidence-missing")
    still = findings[f"receipt {kept.receipt.receipt_id}"]
    assert still["status"] == "valid" and still["details"]["proof_reverified"] is True


def test_the_vaults_quota_per_edge_key_is_set_in_witness_json(tmp_path: Path) -> None:
    from gateway.cli import main
    from gateway.cli.witness import load_witness

    d = tmp_path / "w"
    assert main(["witness", "init", "--dir", str(d), "--name", "core.example/w"]) == 0
    default = load_witness(d, with_vault=True)
    assert default.vault.quota == vault_module.MAX_OWNER_MATERIAL  # the control
    default.vault.close()
    cfg = json.loads((d / "witness.json").read_text())
    (d / "witness.json").write_text(json.dumps({**cfg, "vault_quota_bytes": 5 << 20}))
    configured = load_witness(d, with_vault=True)
    assert configured.vault.quota == 5 << 20
    configured.vault.close()
