"""`ztgate verify` with a witness policy on receipts no witnessed checkpoint covers yet
(docs/compliance.md, section 2.1): in its log's checkpoints, the latest of them not yet
cosigned while an earlier one is, a receipt is `pending` (`not-yet-witnessed`, exit 3),
not `invalid`, for the witness grace (default 24 h; past it `missing-cosignature`,
exit 1); a cosignature that does not verify is still `invalid` (exit 1).

Real parts: a receipt log, a witness over in-process ASGI, `ztgate audit export`'s bundle
writer and the CLI itself. The untampered bundle, once the witness cosigns, is the
control that the same receipt then verifies.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.cli import main
from gateway.receipts.bundle import BundleReader
from gateway.receipts.export import export_bundle
from gateway.receipts.note import SignedNote
from gateway.receipts.signing import format_time
from gateway.receipts.verify import NOT_YET_WITNESSED, WITNESS_GRACE, verify_bundle
from tests.test_receipts import WITNESS, Issued, World, make_world


@pytest_asyncio.fixture(loop_scope="function")
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Receipts in two cosigned checkpoints."""
    w = await make_world(tmp_path)
    for _ in range(2):
        await w.receipt()
        await w.checkpoint()
    yield w
    if not w.log._closed:
        await w.log.close()


async def _unwitnessed(world: World) -> Issued:
    """A receipt whose only checkpoint the witness has not cosigned (it was down)."""
    newest = await world.receipt()
    await world.log.checkpoint()
    return newest


def _verify(
    capsys: pytest.CaptureFixture[str], bundle: Path, trust: Path, *extra: str
) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["verify", str(bundle), "--trust", str(trust), "--require-witness", WITNESS, *extra])
    return rc, capsys.readouterr().out


async def test_a_receipt_in_a_checkpoint_not_yet_cosigned_is_pending(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    newest = await _unwitnessed(world)
    trust = world.write_trust(tmp_path / "trust.json")
    out = tmp_path / "b"
    export_bundle(world.log_dir, out)
    report = verify_bundle(BundleReader(out), world.trust(), [WITNESS])
    rid = newest.receipt.receipt_id
    [mine] = [f for f in report.findings if f.subject == f"receipt {rid}"]
    assert (mine.status, mine.code) == ("pending", NOT_YET_WITNESSED)
    assert "not yet witnessed" in mine.reason
    assert "witnessed_size" not in mine.details
    assert not [f for f in report.findings if f.status == "invalid"]
    older = {i.receipt.receipt_id for i in world.issued[:-1]}
    assert older <= {f.subject.split()[-1] for f in report.findings if f.status == "valid"}
    # The CLI: exit 3, not 1; the headline and the pending list say what is awaited.
    rc, text = _verify(capsys, out, trust)
    assert rc == 3, text
    status, headline = text.splitlines()[:2]
    assert status.startswith("status: PENDING"), text
    assert headline.startswith("Valid so far, not final: 1 receipt not yet witnessed"), text
    assert f"pending: receipt {rid}: not yet witnessed" in text
    rc, doc = _verify(capsys, out, trust, "--json")
    assert rc == 3
    assert json.loads(doc)["status"] == "pending"
    # Control: once the witness cosigns a later checkpoint, the same receipt verifies.
    await world.checkpoint()
    again = tmp_path / "c"
    export_bundle(world.log_dir, again)
    rc, text = _verify(capsys, again, trust)
    assert rc == 0, text


async def test_a_forged_cosignature_on_that_checkpoint_is_invalid(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pending bundle with the witness's cosignature of an earlier checkpoint copied
    onto the uncosigned one, wherever the bundle ships that checkpoint (its file and the
    proofs that embed it): what someone holding the bundle would do to pass it off as
    witnessed. It is invalid (`bad-cosignature`), not pending. Control: the bundle as
    exported is pending (the test above)."""
    newest = await _unwitnessed(world)
    trust = world.write_trust(tmp_path / "trust.json")
    out = tmp_path / "b"
    export_bundle(world.log_dir, out)
    rc, _ = _verify(capsys, out, trust)
    assert rc == 3  # control: as exported, pending
    cps = out / "logs" / world.log.log_id / "checkpoints"
    sizes = sorted(int(p.stem) for p in cps.glob("*.checkpoint"))
    witnessed = SignedNote.parse((cps / f"{sizes[-2]}.checkpoint").read_text())
    [cosig] = [(n, s) for n, s in witnessed.signatures if n == WITNESS]
    bare = (cps / f"{sizes[-1]}.checkpoint").read_text()
    note = SignedNote.parse(bare)
    assert WITNESS not in [n for n, _ in note.signatures]
    forged = SignedNote(note.text, (*note.signatures, cosig)).render()
    edited = 0
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".checkpoint", ".tlog-proof"):
            text = path.read_text()
            if bare in text:
                path.write_text(text.replace(bare, forged))
                edited += 1
    assert edited >= 2  # the checkpoint file and the newest receipt's proof
    report = verify_bundle(BundleReader(out), world.trust(), [WITNESS])
    codes = {f.code for f in report.findings if f.status == "invalid"}
    assert "bad-cosignature" in codes, codes
    rid = newest.receipt.receipt_id
    mine = {f.status for f in report.findings if f.subject == f"receipt {rid}"}
    assert mine == {"invalid"}
    rc, text = _verify(capsys, out, trust)
    assert rc == 1, text
    assert "[bad-cosignature]" in text, text


async def test_a_log_the_witness_never_cosigned_is_not_pending(tmp_path: Path) -> None:
    """Pending needs witnessing of the log to stand: with no checkpoint of the log
    cosigned as required, its receipts are `missing-cosignature` (invalid). Control: the
    same bundle without a witness policy is valid."""
    w = await make_world(tmp_path, witness_http=False)
    try:
        await w.receipt()
        await w.checkpoint()
    finally:
        await w.log.close()
    out = tmp_path / "b"
    export_bundle(w.log_dir, out)
    assert verify_bundle(BundleReader(out), w.trust()).status == "valid"
    report = verify_bundle(BundleReader(out), w.trust(), [WITNESS])
    assert report.status == "invalid"
    assert {f.code for f in report.findings if f.status != "valid"} == {"missing-cosignature"}


async def test_past_the_witness_grace_a_receipt_behind_is_invalid(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pending on the witness lasts the witness grace (default 24 h) from its log's last
    witnessed checkpoint, timed by that checkpoint's cosignature: verified later, the same
    bundle's receipt is `missing-cosignature` (invalid, exit 1), the reason naming the
    grace and the age. Control: within the grace (or with a longer `--witness-grace`) it
    is pending (exit 3). The library and the CLI alike."""
    newest = await _unwitnessed(world)
    trust = world.write_trust(tmp_path / "trust.json")
    out = tmp_path / "b"
    export_bundle(world.log_dir, out)
    rid = newest.receipt.receipt_id
    start = dt.datetime.now(dt.UTC)

    def mine(now: dt.datetime, **kw: Any) -> tuple[str, str, str]:
        report = verify_bundle(BundleReader(out), world.trust(), [WITNESS], now=now, **kw)
        [f] = [f for f in report.findings if f.subject == f"receipt {rid}"]
        return f.status, f.code, f.reason

    assert WITNESS_GRACE == dt.timedelta(hours=24)
    assert mine(start + dt.timedelta(hours=23))[:2] == ("pending", NOT_YET_WITNESSED)
    status, code, why = mine(start + dt.timedelta(hours=25))
    assert (status, code) == ("invalid", "missing-cosignature"), why
    assert "past the witness grace of 24h 0m" in why, why
    assert "25h" in why, why
    longer = {"witness_grace": dt.timedelta(days=2)}
    assert mine(start + dt.timedelta(hours=25), **longer)[:2] == ("pending", NOT_YET_WITNESSED)
    later = format_time(start + dt.timedelta(hours=25))
    rc, text = _verify(capsys, out, trust, "--now", later)
    assert rc == 1, text
    assert f"receipt {rid}: [missing-cosignature]" in text, text
    rc, text = _verify(capsys, out, trust, "--now", later, "--witness-grace", "2d")
    assert rc == 3, text
    assert "[not-yet-witnessed]" in text, text
    rc, text = _verify(capsys, out, trust, "--now", later, "--witness-grace", "93600")
    assert rc == 3, text  # in seconds: 26 h
    rc, text = _verify(capsys, out, trust, "--witness-grace", "soon")
    assert rc == 2, text


async def test_the_witness_grace_counts_only_the_witnesses_the_policy_counts(
    world: World, tmp_path: Path
) -> None:
    """The grace runs from when the policy's witnesses made the log's last witnessed
    checkpoint witnessed: a second trusted witness the policy does not require, cosigning
    that checkpoint 20 h later, does not stretch it (verified 25 h on: invalid). With
    a quorum of 1 it runs from the earliest cosignature. Control: with a quorum of 2 that
    late cosignature is one the policy counts, and the receipt is pending. A cosignature
    time after the check's counts as past the grace (control: an hour on, pending). The
    second witness's cosignature is real, added to the bundle the way an export of a log
    it cosigned would ship it."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.receipts.note import Cosigner

    newest = await _unwitnessed(world)
    out = tmp_path / "b"
    export_bundle(world.log_dir, out)
    cps = out / "logs" / world.log.log_id / "checkpoints"
    sizes = sorted(int(p.stem) for p in cps.glob("*.checkpoint"))
    bare = (cps / f"{sizes[-2]}.checkpoint").read_text()  # the last witnessed one
    note = SignedNote.parse(bare)
    late = Cosigner("witness.example/w2", ed25519.Ed25519PrivateKey.generate())
    start = dt.datetime.now(dt.UTC)
    cosigned = int((start + dt.timedelta(hours=20)).timestamp())
    both = SignedNote(note.text, (*note.signatures, late.cosign(note.text, cosigned))).render()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".checkpoint", ".tlog-proof"):
            text = path.read_text()
            if bare in text:
                path.write_text(text.replace(bare, both))
    trust = world.trust()
    trust.witnesses[late.key.name] = late.key
    rid = newest.receipt.receipt_id

    def mine(hours: float, require: list[str], quorum: int) -> str:
        now = start + dt.timedelta(hours=hours)
        report = verify_bundle(BundleReader(out), trust, require, now=now, quorum=quorum)
        [f] = [f for f in report.findings if f.subject == f"receipt {rid}"]
        return f.status

    assert mine(23, [WITNESS], 0) == "pending"  # control: within the grace
    assert mine(25, [WITNESS], 0) == "invalid"  # the late, unrequired witness does not count
    assert mine(25, [], 1) == "invalid"  # quorum 1: the earliest cosignature
    assert mine(25, [], 2) == "pending"  # control: quorum 2 counts the late one
    assert mine(-1, [WITNESS], 0) == "invalid"  # cosigned after the check: past the grace
    assert mine(1, [WITNESS], 0) == "pending"  # control


async def test_a_cosignature_time_no_date_can_hold_is_invalid_not_a_crash(
    world: World, tmp_path: Path
) -> None:
    """A trusted witness's real cosignature whose timestamp is past year 9999 (any value
    below 2^64 signs) is `bad-cosignature`, a finding, not an exception out of the
    verifier. Control: the same witness cosigning with a sane time gives no such finding."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.receipts.note import Cosigner

    await _unwitnessed(world)
    late = Cosigner("witness.example/w3", ed25519.Ed25519PrivateKey.generate())
    trust = world.trust()
    trust.witnesses[late.key.name] = late.key

    def bundle_with(ts: int, name: str) -> Path:
        out = tmp_path / name
        export_bundle(world.log_dir, out)
        cps = out / "logs" / world.log.log_id / "checkpoints"
        bare = cps / f"{min(int(p.stem) for p in cps.glob('*.checkpoint'))}.checkpoint"
        text = bare.read_text()
        note = SignedNote.parse(text)
        cosigned = SignedNote(note.text, (*note.signatures, late.cosign(note.text, ts))).render()
        for path in out.rglob("*"):
            if path.is_file() and path.suffix in (".checkpoint", ".tlog-proof"):
                body = path.read_text()
                if text in body:
                    path.write_text(body.replace(text, cosigned))
        return out

    def codes(out: Path) -> list[str]:
        report = verify_bundle(BundleReader(out), trust, [WITNESS])
        return [f.code for f in report.findings if f.status == "invalid"]

    assert "bad-cosignature" in codes(bundle_with(2**62, "far"))
    assert "bad-cosignature" not in codes(
        bundle_with(int(dt.datetime.now(dt.UTC).timestamp()), "now")
    )
