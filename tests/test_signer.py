"""Signing keys in a PKCS#11 token (SoftHSM 2): receipts, checkpoints and witness
cosignatures signed there verify with the unchanged public-key code, keys made or
imported there never come out, and production can require the token."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.cli import main
from gateway.config import ConfigError
from gateway.pki import PKI, load_signing_key
from gateway.receipts.issue import verify_summary
from gateway.receipts.note import SignedNote, WitnessKey
from gateway.runtime import ProductionRefused, build_gateway, check_mode
from gateway.signer import FileSigner, Pkcs11Signer, Signer, SignerError, Token, generate
from tests.conftest import example_entries
from tests.gateway_harness import client_context, gateway_config, running_gateway
from tests.test_gateway import IRIS, infer_body

SOFTHSM_MODULES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
)
MODULE = next((m for m in SOFTHSM_MODULES if m.is_file()), None)
TOKEN_LABEL = "ztgate-test"
PIN = "246810"

pytestmark = pytest.mark.skipif(
    MODULE is None or shutil.which("softhsm2-util") is None,
    reason="softhsm2 is not installed (.ci/run installs it)",
)

UNREACHABLE_NODE = {
    "name": "n1",
    "address": "127.0.0.1:1",
    "dns_name": "n1.node.ztgate.local",
    "spiffe_id": "spiffe://ztgate.local/node/n1",
    "region": "eu-west",
    "provider": "prov-a",
}


@dataclass(frozen=True)
class SoftHsm:
    token: Token
    pin_file: Path
    env: dict[str, str]


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """One SoftHSM token for the session. SoftHSM reads its config and scans its tokens
    when the library is first initialised in a process, so the token is made first, and
    tests keep apart by key label."""
    assert MODULE is not None
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
         "--pin", PIN, "--so-pin", "13579111"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    pin_file = root / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    yield SoftHsm(Token(MODULE, pin_file, label=TOKEN_LABEL), pin_file, dict(os.environ))
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


def _raw(public: ed25519.Ed25519PublicKey) -> bytes:
    return public.public_bytes_raw()


def test_a_token_key_signs_verifiably_and_never_comes_out(softhsm: SoftHsm) -> None:
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import AttributeSensitive

    from gateway.signer import session

    public = generate(softhsm.token, "made-here")
    signer = Pkcs11Signer(softhsm.token, "made-here")
    assert isinstance(signer, Signer)
    assert _raw(signer.public_key()) == _raw(public)
    message = b"ztgate-receipt/v1\nr.1\n" + bytes(32)
    public.verify(signer.sign(message), message)  # cryptography's verify, unchanged
    assert not signer.extractable
    s, lock = session(softhsm.token)
    with lock:
        (private,) = s.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: "made-here"}
        )
        assert private[Attribute.SENSITIVE] and not private[Attribute.EXTRACTABLE]
        with pytest.raises(AttributeSensitive):
            private[Attribute.VALUE]
    # A label is never reused: a second keygen under it is refused, the key kept.
    with pytest.raises(SignerError, match="already holds"):
        generate(softhsm.token, "made-here")


def test_an_imported_key_signs_exactly_as_its_file_did(softhsm: SoftHsm, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "old.key"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    args = ["--module", str(MODULE), "--token", TOKEN_LABEL, "--pin-file", str(softhsm.pin_file)]
    assert main(["token", "import", str(pem), "imported", *args, "--json"]) == 0
    token_key = Pkcs11Signer(softhsm.token, "imported")
    assert not token_key.extractable
    # Ed25519 is deterministic: the same key gives the same signature, file or token.
    assert token_key.sign(b"m") == FileSigner(pem).sign(b"m") == key.sign(b"m")


def test_token_cli_lists_keys_as_json(
    softhsm: SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--module", str(MODULE), "--token", TOKEN_LABEL, "--pin-file", str(softhsm.pin_file)]
    pub = tmp_path / "k.pub"
    capsys.readouterr()
    assert main(["token", "keygen", "listed", "--public-out", str(pub), *args, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["label"] == "listed" and made["extractable"] is False
    assert main(["token", "list", *args, "--json"]) == 0
    listed = {k["label"]: k for k in json.loads(capsys.readouterr().out)}
    assert listed["listed"] == made
    on_disk = serialization.load_pem_public_key(pub.read_bytes())
    assert isinstance(on_disk, ed25519.Ed25519PublicKey)
    assert made["key_id"] == __import__("gateway.keyid").keyid.signing_key_id(on_disk)
    # No token named: a usage error, not a traceback.
    assert main(["token", "list"]) == 2


def test_wrong_pin_unknown_label_and_a_world_readable_pin_are_refused(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    from gateway.signer import read_pin

    loose = tmp_path / "pin"
    loose.write_text(PIN)
    loose.chmod(0o644)
    with pytest.raises(SignerError, match="readable by every user"):
        read_pin(loose)
    with pytest.raises(SignerError, match="no Ed25519 key pair labelled 'absent'"):
        Pkcs11Signer(softhsm.token, "absent")
    wrong = tmp_path / "wrong"
    wrong.write_text("000000")
    wrong.chmod(0o600)
    # A fresh process (this one is logged in already): one line naming the PIN file.
    ztgate = Path(__import__("sys").executable).parent / "ztgate"
    done = subprocess.run(
        [str(ztgate), "token", "list", "--module", str(MODULE), "--token", TOKEN_LABEL,
         "--pin-file", str(wrong)],
        capture_output=True, text=True, env=softhsm.env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"the PIN in {wrong} is wrong" in done.stderr and "Traceback" not in done.stderr


def _token_receipts(softhsm: SoftHsm, signing: str, log: str) -> dict[str, object]:
    return {
        "signing_key": None,
        "log_key": None,
        "signer": "pkcs11",
        "signing_key_label": signing,
        "log_key_label": log,
    }


def _pkcs11(softhsm: SoftHsm, **more: object) -> dict[str, object]:
    return {
        "module": str(MODULE),
        "token": TOKEN_LABEL,
        "pin_file": str(softhsm.pin_file),
        **more,
    }


def test_a_gateway_signs_receipts_in_the_token_and_ztgate_verify_checks_them(
    softhsm: SoftHsm, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipt_pub = generate(softhsm.token, "gw-receipt-signing")
    log_pub = generate(softhsm.token, "gw-log-checkpoint")
    example_entries(tmp_path)
    cfg = gateway_config(
        pki,
        tmp_path / "registry",
        tmp_path / "data",
        [UNREACHABLE_NODE],  # a denial is receipted before any node is asked
        receipts=_token_receipts(softhsm, "gw-receipt-signing", "gw-log-checkpoint"),
        pkcs11=_pkcs11(softhsm, required=True),
    )
    assert cfg.receipts.enabled and cfg.receipts.signing_key is None
    gw = build_gateway(cfg)
    assert gw.receipts is not None
    assert _raw(gw.receipts.signer.public_key) == _raw(receipt_pub)
    assert _raw(gw.receipts.log.note_key().public_key) == _raw(log_pub)
    issued = pki.ensure("client", "nobody")
    ctx = client_context(pki, issued.cert, issued.key)
    with running_gateway(cfg, gw) as running, httpx.Client(verify=ctx, timeout=10) as c:
        r = c.post(f"{running.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert r.status_code == 403, r.text
        summary = r.headers["ztgate-receipt"]
        assert verify_summary(summary, gw.receipts.keyset).ok
        rid = summary.split(" ")[1]
        end = time.monotonic() + 10
        while gw.receipts.log.proof(int(rid.split(".")[1])) is None:
            assert time.monotonic() < end, "no checkpoint covered the receipt"
            time.sleep(0.1)
    log_dir = gw.receipts.log.path.parent
    bundle, trust = tmp_path / "bundle", tmp_path / "trust.json"
    assert main(["audit", "export", "--log-dir", str(log_dir), str(bundle)]) == 0
    capsys.readouterr()
    assert main(["audit", "trust", "--log-dir", str(log_dir)]) == 0
    trust.write_text(capsys.readouterr().out)
    # The auditor's side sees public keys only: the token's, published in keys.json and
    # the log's checkpoint vkey.
    assert main(["verify", str(bundle), "--trust", str(trust), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "valid"
    mine = [f["status"] for f in report["findings"] if f["subject"] == f"receipt {rid}"]
    assert mine == ["valid"]
    # Control: the same bundle against a trust file naming another receipt key fails.
    from gateway.keyid import signing_key_id

    doc = json.loads(trust.read_text())
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    (entry,) = doc["receipt_keys"]["keys"]
    assert entry["public_key"] == base64.b64encode(_raw(receipt_pub)).decode()
    entry.update(public_key=base64.b64encode(_raw(other)).decode(), key_id=signing_key_id(other))
    (tmp_path / "other.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["verify", str(bundle), "--trust", str(tmp_path / "other.json")]) == 1


def test_production_with_pkcs11_required_refuses_file_keys(
    softhsm: SoftHsm, pki: PKI, tmp_path: Path
) -> None:
    generate(softhsm.token, "prod-receipt")
    generate(softhsm.token, "prod-log")
    example_entries(tmp_path)
    base = {"mode": "production", "pkcs11": _pkcs11(softhsm, required=True)}
    files = gateway_config(pki, tmp_path / "registry", tmp_path / "d1", [], **base)
    items = files.dev_only_items()
    refusal = [i for i in items if "pkcs11.required" in i]
    assert refusal and "receipts.signing_key and receipts.log_key are files" in refusal[0]
    with pytest.raises(ProductionRefused, match=r"pkcs11\.required"):
        check_mode(files)
    # Positive control: the same config with the keys in the token has no such item.
    token = gateway_config(
        pki,
        tmp_path / "registry",
        tmp_path / "d2",
        [],
        receipts=_token_receipts(softhsm, "prod-receipt", "prod-log"),
        **base,
    )
    assert not [i for i in token.dev_only_items() if "pkcs11" in i or "receipts" in i]
    # Without `required`, file keys are still allowed in production.
    optional = gateway_config(pki, tmp_path / "registry", tmp_path / "d3", [], mode="production")
    assert not [i for i in optional.dev_only_items() if "pkcs11" in i]


def test_serve_check_names_the_token_settings(
    softhsm: SoftHsm, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ztgate serve --check` opens the token and names what is wrong with it."""
    generate(softhsm.token, "check-receipt")
    generate(softhsm.token, "check-log")
    example_entries(tmp_path)

    def write(receipts: str, pkcs11: str) -> Path:
        # Each --check builds a gateway in this process: each its own data dir.
        data = tmp_path / f"data{len(list(tmp_path.glob('data*')))}"
        pol = tmp_path / "pol"
        from tests.gateway_harness import dev_toml, policy_dir

        policy_dir(pol)
        path = tmp_path / "gateway.toml"
        path.write_text(
            dev_toml(pki, tmp_path / "registry", data, pol)
            + f"""[receipts]
{receipts}
[pkcs11]
{pkcs11}
"""
        )
        return path

    good_receipts = (
        'signer = "pkcs11"\nsigning_key_label = "check-receipt"\nlog_key_label = "check-log"'
    )
    good_token = f'module = "{MODULE}"\ntoken = "{TOKEN_LABEL}"\npin_file = "{softhsm.pin_file}"'
    capsys.readouterr()
    assert main(["serve", "--config", str(write(good_receipts, good_token)), "--check"]) == 0
    assert "OK" in capsys.readouterr().out
    # A label the token lacks, a missing PIN file: each named, no traceback.
    bad_label = good_receipts.replace('"check-log"', '"no-such-key"')
    assert main(["serve", "--config", str(write(bad_label, good_token)), "--check"]) == 2
    err = capsys.readouterr().err
    assert "no Ed25519 key pair labelled 'no-such-key'" in err and "Traceback" not in err
    missing_pin = good_token.replace(str(softhsm.pin_file), str(tmp_path / "nopin"))
    assert main(["serve", "--config", str(write(good_receipts, missing_pin)), "--check"]) == 2
    err = capsys.readouterr().err
    assert "pkcs11.pin_file:" in err and "does not exist" in err


@pytest.mark.parametrize(
    ("receipts", "pkcs11", "message"),
    [
        ({"signer": "hsm"}, {}, 'receipts.signer must be "file" or "pkcs11"'),
        (
            {"signer": "pkcs11", "signing_key_label": "a", "log_key_label": "b",
             "signing_key": None, "log_key": None},
            {"module": "/m.so", "token": "t"},
            "needs pkcs11.pin_file",
        ),
        (
            {"signer": "pkcs11", "signing_key_label": "a", "log_key_label": "a",
             "signing_key": None, "log_key": None},
            {"module": "/m.so", "token": "t", "pin_file": "/p"},
            "must differ",
        ),
        (
            {"signer": "pkcs11", "signing_key_label": "a", "log_key_label": "b"},
            {"module": "/m.so", "token": "t", "pin_file": "/p"},
            "not the key files",
        ),
        (
            {"signing_key_label": "a", "log_key_label": "b"},
            {},
            'need receipts.signer = "pkcs11"',
        ),
        (
            {"signer": "pkcs11", "signing_key_label": "a", "log_key_label": "b",
             "signing_key": None, "log_key": None},
            {"module": "/m.so", "token": "t", "slot": 3, "pin_file": "/p"},
            "one of them",
        ),
        ({}, {"pin": "1234"}, "unknown key"),  # the PIN itself never goes in the TOML
    ],
)  # fmt: skip
def test_token_settings_are_checked_when_the_config_loads(
    pki: PKI, tmp_path: Path, receipts: dict[str, object], pkcs11: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        gateway_config(pki, tmp_path, tmp_path, [], receipts=receipts, pkcs11=pkcs11)


def test_a_witness_cosigns_with_its_key_in_the_token(
    softhsm: SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli.witness import load_witness

    d = tmp_path / "w"
    args = ["--module", str(MODULE), "--token", TOKEN_LABEL, "--pin-file", str(softhsm.pin_file)]
    capsys.readouterr()
    assert (
        main(["witness", "init", "--dir", str(d), "--name", "w.example/w1",
              "--key-label", "witness-w1", *args])
        == 0
    )  # fmt: skip
    vkey = capsys.readouterr().out.strip()
    assert not (d / "witness.key").exists()
    assert (
        "PIN" not in (d / "witness.json").read_text()
        and PIN not in (d / "witness.json").read_text()
    )
    witness = load_witness(d)
    assert witness.key.vkey() == vkey
    text = "o/1\n1\n" + "A" * 43 + "=\n"
    name, sig = witness.cosigner.cosign(text, 1_700_000_000)
    assert WitnessKey.from_vkey(vkey).verify(SignedNote(text, ((name, sig),)))[1] == 1_700_000_000
    assert not Pkcs11Signer(softhsm.token, "witness-w1").extractable


def test_a_file_key_still_works_everywhere(tmp_path: Path, pki: PKI) -> None:
    """FileSigner is what a file-keyed gateway uses; its errors name the file."""
    signer = FileSigner(pki.key_path("receipt-signing"))
    assert _raw(signer.public_key()) == _raw(
        load_signing_key(pki.key_path("receipt-signing")).public_key()
    )
    with pytest.raises(SignerError, match=r"nope\.key"):
        FileSigner(tmp_path / "nope.key")
