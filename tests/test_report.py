"""The verification report an auditor reads and files (`ztgate verify --format text|md|html`),
and the witness walkthrough of docs/compliance.md, followed step by step.

The HTML report is rendered in headless Chromium with hostile strings planted where the
party being audited controls a value: a signed receipt's denial reason and model name
(signed here with the test keys) and a receipt id in the bundle's manifest. The page must
show its summary, load nothing (a loopback listener sees no connection) and run no script.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from gateway.cli import main
from gateway.receipts.canonical import b64
from gateway.receipts.checkpointer import Checkpointer, WitnessClient
from gateway.receipts.export import export_bundle
from gateway.receipts.log import LogEntry
from gateway.receipts.model import Denial, ModelRef, Receipt, VerificationRef
from gateway.receipts.note import WitnessKey
from gateway.receipts.report import CSP
from gateway.receipts.signing import raw_public
from gateway.receipts.verify import PROOF_VERIFIERS, register_proof_verifier
from gateway.receipts.witness import witness_app
from tests.conftest import in_ci
from tests.test_receipt_library import forbidden_in, loaded_by
from tests.test_receipts import WITNESS, World, make_world

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = "https://ztgate.dev/problems/forbidden"


@pytest_asyncio.fixture(loop_scope="function")
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Three iris answers and a denial in a cosigned checkpoint, then one pending answer."""
    w = await make_world(tmp_path)
    for _ in range(3):
        await w.receipt()
    await w.receipt(kind="denial", denial=Denial(FORBIDDEN, "Forbidden"), inputs=[], outputs=[])
    await w.checkpoint()
    await w.log.append(LogEntry("policy_load", b"\x01" * 32))
    await w.receipt()
    yield w
    if not w.log._closed:
        await w.log.close()


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["verify", *args])
    return rc, capsys.readouterr().out


# =========================================================================== in words


async def test_the_report_says_what_was_checked_in_words(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust = world.write_trust(tmp_path / "trust.json")
    bundle = tmp_path / "bundle"
    export_bundle(world.log_dir, bundle)
    rc, out = _verify(capsys, str(bundle), "--trust", str(trust))
    assert rc == 3, out  # one receipt is not yet in a checkpoint
    key_id = world.issued[0].receipt.key_id
    pending = world.issued[-1].receipt.receipt_id
    assert out.startswith("status: PENDING")
    for words in (
        "Valid so far, not final: 1 receipt not yet in a signed checkpoint",
        "What was checked: an audit bundle (format v2, with each log's inventory)",
        "Receipts: 5 receipts (4 answers, 1 denial): 4 valid, 1 pending.",
        f"Keys: only those of the auditor's trust file ({trust})",
        "Witnesses: none required.",
        "WARNING: No witness was required",
        "Time range: receipts issued 20",
        "; checkpoints signed 20",
        "Client salts: not given",
        f"pending: receipt {pending}: no signed checkpoint includes it yet",
        "Receipt keys (from the trust file):",
        "Logs, checkpoints and cosigners:",
        WITNESS,  # the checkpoint's cosigner, named though not required
        f"{world.log.origin}",
    ):
        assert words in out, (words, out)
    assert re.search(rf"^  {key_id}\s+2020-01-01T00:00:00.000Z\s+current\s+5$", out, re.M), out
    assert re.search(r"^  iris 1\s+none\s+answer\s+valid\s+3$", out, re.M), out
    assert re.search(r"^  iris 1\s+none\s+answer\s+pending\s+1$", out, re.M), out
    assert re.search(r"^  iris 1\s+none\s+denial\s+valid\s+1$", out, re.M), out
    assert re.search(rf"^  {re.escape(FORBIDDEN)}\s+Forbidden\s+1$", out, re.M), out

    # With a witness required and one client's salts: no warning, salts matched.
    first = world.issued[0]
    salts = tmp_path / "salts.json"
    assert first.salt is not None
    record = {
        "salt": b64(first.salt),
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                    "data": [5.1, 3.5, 1.4, 0.2]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [0]}],
    }  # fmt: skip
    salts.write_text(json.dumps({first.receipt.receipt_id: record}))
    rc, out = _verify(
        capsys, str(bundle), "--trust", str(trust), "--require-witness", WITNESS,
        "--salts", str(salts),
    )  # fmt: skip
    assert rc == 3, out
    assert f"Witnesses: required, every one of {WITNESS}." in out
    assert "No witness was required" not in out
    assert "Client salts: given for 1 receipt; 1 matched, 0 did not." in out
    # the JSON carries the same scope for tools
    rc, out = _verify(capsys, str(bundle), "--trust", str(trust), "--format", "json")
    doc = json.loads(out)
    assert doc["scope"]["trust_file"] == str(trust)
    assert doc["scope"]["receipt_keys"][0]["key_id"] == key_id
    assert doc["logs"][0]["checkpoints"][0]["witnesses"] == [WITNESS]


async def test_dev_srs_evidence_and_a_compact_receipt_stand_out(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zk = await world.receipt(
        verification=VerificationRef("zk", "proof-valid", "aa" * 32, "bb" * 32),
        extensions={"dev_srs": True},
    )
    await world.checkpoint()
    trust = world.write_trust(tmp_path / "trust.json")
    bundle = tmp_path / "bundle"
    export_bundle(world.log_dir, bundle)
    _, out = _verify(capsys, str(bundle), "--trust", str(trust), "--require-witness", WITNESS)
    assert "zk receipt name evidence made with a development SRS" in out, out
    assert re.search(r"^WARNING: 1 zk receipt name evidence made with a development SRS", out, re.M)
    # only the compact line of a response: its signature, and it says so up front
    line = tmp_path / "summary.txt"
    line.write_text(zk.summary + "\n")
    rc, out = _verify(capsys, str(line), "--trust", str(trust))
    assert rc == 0, out
    assert out.splitlines()[1] == "signature valid, inclusion unchecked"
    assert "WARNING: Only a compact receipt was given" in out
    assert "No witness was required" not in out  # not applicable to a compact receipt


async def test_third_party_output_never_reaches_the_report(
    world: World, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A mode's proof verifier that prints, writes to file descriptor 1 (as native code
    such as ezkl does) and logs through a third-party logger: the report holds none of it;
    what is printed goes to stderr, the third-party log record nowhere (without -v)."""
    await world.receipt(verification=VerificationRef("redundant", "agreed"))
    await world.checkpoint()
    trust = world.write_trust(tmp_path / "trust.json")
    bundle = tmp_path / "bundle"
    export_bundle(world.log_dir, bundle)
    noisy = logging.getLogger("ezkl.prover")
    handler = logging.StreamHandler()  # stderr, as `ztgate`'s own logging.basicConfig
    logging.getLogger().addHandler(handler)

    def chatty(receipt: Receipt, evidence: object) -> object:
        from gateway.receipts.signing import Verdict

        print("PRINTED-NOISE")
        os.write(1, b"FD1-NOISE\n")
        noisy.warning("THIRD-PARTY-LOG")
        return Verdict.success()

    register_proof_verifier("redundant", chatty)  # type: ignore[arg-type]
    try:
        capfd.readouterr()
        rc = main(["verify", str(bundle), "--trust", str(trust), "--require-witness", WITNESS])
        out, err = capfd.readouterr()
        assert rc == 0, out
        assert out.startswith("status: VALID") and "Receipts:" in out
        for noise in ("PRINTED-NOISE", "FD1-NOISE", "THIRD-PARTY-LOG"):
            assert noise not in out, (noise, out)
        assert "PRINTED-NOISE" in err and "FD1-NOISE" in err
        assert "THIRD-PARTY-LOG" not in err
        noisy.warning("THIRD-PARTY-LOG")  # control: outside the checks it is logged
        assert "THIRD-PARTY-LOG" in capfd.readouterr().err
        # the same run writing the report to a file: stdout stays empty
        report = tmp_path / "report.txt"
        rc = main(["verify", str(bundle), "--trust", str(trust), "-o", str(report)])
        out, err = capfd.readouterr()
        assert out == "" and "report written to" in err
        assert report.read_text().startswith("status: VALID")
        assert "NOISE" not in report.read_text()
    finally:
        PROOF_VERIFIERS.pop("redundant", None)
        logging.getLogger().removeHandler(handler)


def test_the_report_renderer_imports_no_web_framework_log_writer_or_pki() -> None:
    """Rendering is part of the offline verifier an auditor runs alone."""
    assert forbidden_in(loaded_by("gateway.receipts.report")) == set()
    probe = (
        "gateway.receipts.verify, gateway.receipts.report; "
        "gateway.receipts.report.render_text(gateway.receipts.verify.Report())"
    )
    assert forbidden_in(loaded_by(probe)) == set()


# =========================================================================== HTML in Chromium


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = "chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


class _Listener:
    """A loopback TCP listener that records every connection (and answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.hits.append(conn.recv(200) or b"(connected)")
                except OSError:
                    self.hits.append(b"(connected)")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    lst = _Listener()
    yield lst
    lst.close()


def _dump_dom(exe: str, page: Path, tmp: Path) -> str:
    profile = tmp / f"profile-{page.stem}"
    out = subprocess.run(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _title(dom: str) -> str:
    m = re.search(r"<title>(.*?)</title>", dom, re.S)
    return m.group(1) if m else ""


async def test_html_report_renders_its_summary_loads_nothing_and_runs_no_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listener: _Listener
) -> None:
    exe = _chromium()
    url = f"http://127.0.0.1:{listener.port}"
    script = (
        "<script>document.title='PWNED';"
        "document.body.insertAdjacentHTML('beforeend','<p id=\"pwned\">ran</p>')</script>"
    )
    w = await make_world(tmp_path)
    try:
        await w.receipt()
        # Signed with the test keys: a denial reason and a model name carrying markup.
        await w.receipt(
            kind="denial",
            model=ModelRef(f'<img src="{url}/model">', "1", "ab" * 32),
            denial=Denial(FORBIDDEN, f'{script}<img src="{url}/reason">'),
            inputs=[],
            outputs=[],
        )
        await w.checkpoint()
    finally:
        await w.log.close()
    trust = w.write_trust(tmp_path / "trust.json")
    bundle = tmp_path / "bundle"
    export_bundle(w.log_dir, bundle)
    # The bundle's own files are the audited party's: a receipt id in the manifest.
    manifest = json.loads((bundle / "manifest.json").read_text())
    hostile_id = f'<img src="{url}/manifest">{script}'
    manifest["logs"][0]["receipts"].append({"id": hostile_id, "index": 99})
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    page = tmp_path / "report.html"
    rc, _ = _verify(capsys, str(bundle), "--trust", str(trust), "--format", "html", "-o",
                    str(page))  # fmt: skip
    assert rc == 1
    raw = page.read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in raw
    assert CSP == "default-src 'none'; style-src 'unsafe-inline'"
    assert "<script" not in raw and "<img" not in raw  # every value escaped
    assert "&lt;script&gt;" in raw and "&lt;img src=&quot;" in raw  # and shown, escaped
    assert raw.index('id="summary"') < raw.index('id="problems"') < raw.index('id="details"')

    dom = _dump_dom(exe, page, tmp_path)
    assert _title(dom) == "ztgate verification report", dom[:500]
    assert "Verification FAILED" in dom and "What was checked: an audit bundle" in dom
    assert "No witness was required" in dom  # the warning, in the summary
    assert '<p id="pwned">' not in dom and "PWNED" not in _title(dom)
    assert "&lt;script&gt;document.title" in dom  # the planted text is there, as text
    assert listener.hits == [], listener.hits

    # Markdown: a viewer that renders raw HTML gets none either.
    md = tmp_path / "report.md"
    rc, _ = _verify(capsys, str(bundle), "--trust", str(trust), "--format", "md", "-o", str(md))
    text = md.read_text()
    assert rc == 1 and "<script" not in text and "<img" not in text
    assert text.startswith("# ztgate verification report\n\n**Status: INVALID**")

    # Control: the same planted markup without the report's escaping and CSP does load
    # and run here, so the checks above can see a failure.
    control = tmp_path / "control.html"
    control.write_text(f"<html><head><title>t</title></head><body>{hostile_id}</body></html>")
    dom = _dump_dom(exe, control, tmp_path)
    assert _title(dom) == "PWNED" and '<p id="pwned">' in dom
    assert any(b"/manifest" in h or h == b"(connected)" for h in listener.hits), listener.hits


# =========================================================================== witnesses


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().out


async def test_witness_walkthrough_two_of_three(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/compliance.md, "Witnesses: a walkthrough", step by step."""
    from gateway.cli.witness import load_witness

    w = await make_world(tmp_path)
    log_pub = b64(raw_public(w.log_key.public_key()))
    # 1. Each witness operator creates a witness that accepts this operator's log key.
    vkeys: dict[str, str] = {}
    for n in ("w1", "w2", "w3"):
        name, trust_log = f"witness.example/{n}", f"ztgate.local/={log_pub}"
        rc, out = _cli(capsys, "witness", "init", "--dir", str(tmp_path / n), "--name", name,
                       "--trust-log", trust_log)  # fmt: skip
        assert rc == 0
        rc, vkey = _cli(capsys, "witness", "vkey", "--dir", str(tmp_path / n))
        assert rc == 0 and vkey.strip() == out.strip()
        vkeys[n] = vkey.strip()
    # 2. The gateway operator lists them in gateway.toml; `ztgate witness serve` serves
    # each directory (here the same app, in process).
    toml = "[receipts]\nwitnesses = [\n" + "".join(
        f'  ["{vkeys[n]}", "https://{n}.example:8090"],\n' for n in vkeys
    ) + "]\n"  # fmt: skip
    pairs = tomllib.loads(toml)["receipts"]["witnesses"]
    clients = {}
    for vkey, url in pairs:
        key = WitnessKey.from_vkey(vkey)
        d = tmp_path / key.name.rsplit("/", 1)[1]
        app = witness_app(load_witness(d))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        clients[key.name] = WitnessClient(key, url, http)
    w.checkpointer = Checkpointer(lambda: w.log, list(clients.values()))
    for _ in range(2):
        await w.receipt()
    await w.checkpoint()  # all three cosign
    down = "witness.example/w3"
    w.checkpointer = Checkpointer(
        lambda: w.log, [c for name, c in clients.items() if name != down]
    )  # w3 is down: the log goes on, cosigned by 2 of 3
    await w.receipt()
    await w.checkpoint()
    await w.log.close()
    # 3. The auditor: a trust file from what the operator publishes, each witness key
    # compared with the one its operator sent, and the k-of-n requirement.
    rc, out = _cli(capsys, "audit", "trust", "--log-dir", str(w.log_dir))
    doc = json.loads(out)
    assert sorted(x["vkey"] for x in doc["witnesses"]) == sorted(vkeys.values())
    doc["witness_policy"] = {"quorum": 2}
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps(doc, indent=2))
    # 4. Export and verify.
    bundle = tmp_path / "bundle.tar"
    assert _cli(capsys, "audit", "export", "--log-dir", str(w.log_dir), str(bundle))[0] == 0
    rc, out = _cli(capsys, "verify", str(bundle), "--trust", str(trust))
    assert rc == 0, out
    assert "Witnesses: required, at least 2 of the 3 trusted." in out
    rc, out = _cli(capsys, "verify", str(bundle), "--trust", str(trust), "--witness-quorum", "3")
    assert rc == 3 and "[not-yet-witnessed]" in out, out  # pending: w3 is behind
    late = w.issued[-1].receipt.receipt_id
    assert re.findall(r"PENDING\s+receipt (\S+): \[not-yet-witnessed\]", out) == [late]
    rc, out = _cli(capsys, "verify", str(bundle), "--trust", str(trust), "--require-witness", down)
    assert rc == 3 and "[not-yet-witnessed]" in out, out
    assert (
        _cli(capsys, "verify", str(bundle), "--trust", str(trust), "--witness-quorum", "4")[0] == 2
    )
