"""The operator's CLI conventions (gateway/cli/__init__.py): one flag name per kind of path
with the old names kept as hidden aliases, --json where a verb prints data, defaults in
help, a closed pipe ends quietly, other libraries' logs only with -v."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import HIDDEN_ALIASES, build_parser, configure_logging, main
from gateway.pki import PKI

ZTGATE = Path(sys.executable).parent / "ztgate"
# Nouns whose flags other modules own (see the report of issue 16): not held here yet.
OWNED_ELSEWHERE = {"policy", "verify", "nodes"}
OLD_NAMES = {"--dir", "--artefacts"}


def verbs(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from verbs(sub, (*path, name))
            return
    yield path, parser


def visible_flags(parser: argparse.ArgumentParser) -> set[str]:
    out: set[str] = set()
    for a in parser._actions:
        if a.help is argparse.SUPPRESS:
            continue
        out |= set(a.option_strings) - set(getattr(a, HIDDEN_ALIASES, ()))
    return out


def test_one_flag_name_per_kind_of_path_and_old_names_hidden() -> None:
    seen = []
    for path, parser in verbs(build_parser()):
        if path[0] in OWNED_ELSEWHERE:
            continue
        seen.append(path)
        shown = visible_flags(parser)
        assert not shown & OLD_NAMES, (path, shown & OLD_NAMES)
        assert "--dir" not in parser.format_help().replace("-dir ", "").split(), path
    assert ("pki", "issue") in seen and ("witness", "serve") in seen and ("up",) in seen


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["pki", "init", "/p"], "old_dir", "/p"),  # the handler prefers it to --pki
        (["pki", "init", "--pki", "/p"], "dir", Path("/p")),
        (["pki", "issue", "client", "a", "--dir", "/p"], "dir", Path("/p")),
        (["pki", "issue", "client", "a", "--pki", "/p"], "dir", Path("/p")),
        (["pki", "crl", "--dir", "/p", "--out", "c"], "dir", Path("/p")),
        (["witness", "vkey", "--dir", "/w"], "dir", Path("/w")),
        (["witness", "vkey", "--witness-dir", "/w"], "dir", Path("/w")),
        (["up", "--dir", "/c"], "dir", Path("/c")),
        (["up", "--cluster-dir", "/c"], "dir", Path("/c")),
        (["demo", "--dir", "/c"], "dir", Path("/c")),
        (["zk", "verify", "p", "--artefacts", "/z", "--input", "[]"], "artefacts", Path("/z")),
        (["zk", "verify", "p", "--zk-artefacts", "/z", "--input", "[]"], "artefacts", Path("/z")),
        (["zk", "add-to-repository", "R", "--name", "n", "--artefacts", "/z"], "artefacts",
         Path("/z")),
    ],
)  # fmt: skip
def test_old_flag_names_still_work(argv: list[str], dest: str, value: object) -> None:
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    issue = help_of("pki", "issue")
    assert "(default: .ztgate/pki)" in issue and "(default: 365.0)" in issue
    assert "--dir" not in issue  # the old name works, but is not offered
    serve = help_of("node", "serve")
    assert "(default: 30.0)" in serve and "(default: site-a)" in serve
    assert "(default: 8090)" in help_of("witness", "serve")
    assert "(default: .ztgate)" in help_of("up")


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_json_wherever_a_verb_prints_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = _json(capsys, "pki", "init", "--pki", str(tmp_path / "pki"))
    assert pki == {
        "pki": str(tmp_path / "pki"),
        "trust_domain": "ztgate.local",
        "sites": ["site-a"],
    }
    reg = str(tmp_path / "reg")
    models = _json(capsys, "model", "examples", "--registry", reg)
    assert isinstance(models, list) and {m["name"] for m in models} >= {"iris", "mnist"}
    assert _json(capsys, "model", "verify", "--registry", reg) == {"ok": True, "problems": []}
    listed = _json(capsys, "model", "list", "--registry", reg)
    assert isinstance(listed, list) and len(listed) == len(models)
    repo = _json(capsys, "node", "repository", "--registry", reg, "--out", str(tmp_path / "r"))
    assert repo == {"repository": str(tmp_path / "r"), "flavour": "onnxruntime"}
    crl = _json(
        capsys, "pki", "crl", "--pki", str(tmp_path / "pki"), "--out", str(tmp_path / "c.pem")
    )
    assert crl == {"crl": str(tmp_path / "c.pem"), "revoked": 0}
    w = str(tmp_path / "w")
    made = _json(capsys, "witness", "init", "--witness-dir", w, "--name", "w.example/w1")
    assert isinstance(made, dict)
    assert _json(capsys, "witness", "vkey", "--witness-dir", w) == {"vkey": made["vkey"]}
    # Without --json the same verbs print text.
    capsys.readouterr()
    assert main(["witness", "vkey", "--witness-dir", w]) == 0
    assert capsys.readouterr().out.strip() == made["vkey"]


def _closed_pipe_run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run ztgate with stdout a pipe whose reader is gone before it writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [str(ZTGATE), *argv], stdout=write, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write)


def test_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    subprocess.run(
        [str(ZTGATE), "model", "examples", "--registry", str(tmp_path / "reg")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    for argv in (("model", "list", "--registry", str(tmp_path / "reg")), ("pki", "--help")):
        done = _closed_pipe_run(*argv)
        assert done.stderr == b"", (argv, done.stderr.decode())
        # A verb's output ends with 141 (128 + SIGPIPE, as `head` expects); argparse's
        # own help printing swallows the error and exits 0.
        assert done.returncode == (0 if "--help" in argv else 141), argv


@pytest.mark.parametrize("verbose", [False, True])
def test_other_libraries_logs_only_with_verbose(
    verbose: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    import warnings

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers.clear()  # as a fresh `ztgate` process has it (pytest installs handlers)
    try:
        configure_logging(verbose)
        logging.getLogger("httpx").info("HTTP Request: GET https://example")
        logging.getLogger("gateway.node.triton").info("node n1 ready")
        logging.getLogger("onnx").warning("a library warning")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("UserWarning from a library", UserWarning, stacklevel=1)
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        root.handlers.extend(saved[0])
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    assert "node n1 ready" in err and "a library warning" in err
    assert ("HTTP Request" in err) is verbose
    assert ("UserWarning from a library" in err) is verbose


def test_serve_check_twice_in_one_process_on_one_data_dir(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--check` builds the gateway as a start would, then closes it: the revocation file's
    lock, the state store and the receipt log are free for the next check (or a serve)."""
    from tests.conftest import example_entries
    from tests.gateway_harness import dev_toml, policy_dir

    example_entries(tmp_path)
    config = tmp_path / "gateway.toml"
    policies = policy_dir(tmp_path / "policies")
    config.write_text(
        dev_toml(pki, tmp_path / "registry", tmp_path / "data", policies)
        + f"""[receipts]
signing_key = "{pki.key_path("receipt-signing")}"
log_key = "{pki.key_path("log-checkpoint")}"
"""
    )
    for _ in range(2):
        capsys.readouterr()
        assert main(["serve", "--config", str(config), "--check"]) == 0, capsys.readouterr().err
        assert "OK (dev mode, 0 nodes)" in capsys.readouterr().out
    assert (tmp_path / "data" / "revoked.jsonl").exists()


# --- progress of long steps: on stderr, never in stdout's data, none with --json -----------


def test_zk_onboard_progress_on_stderr_and_one_json_document_with_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI around onboarding (ezkl's ~20 s of work itself is tests/test_zk.py's)."""
    import numpy as np

    import zk.onboard
    from zk.record import ZkRecord, ZkTensor

    record = ZkRecord(
        name="iris", version="1", model_sha256="m" * 64, settings_sha256="s" * 64,
        vk_sha256="v" * 64, srs_sha256="r" * 64, pk_sha256="p" * 64, circuit_sha256="c" * 64,
        logrows=15, inputs=(ZkTensor("input", (1, 4), 7),), outputs=(ZkTensor("out", (1, 3), 7),),
        visibility={"input": "public", "output": "public", "params": "fixed"},
        check_mode="SAFE", dev_srs=True, ezkl_version="x",
        quantisation={"scale": 7, "max_abs_error": 0.004, "tolerance": 0.01, "samples": 32},
    )  # fmt: skip

    def fake_onboard(*_args: object, **kw: object) -> zk.onboard.OnboardResult:
        step = kw["progress"]
        assert callable(step)
        for text in ("calibrating (scale 7)", "setup (logrows 15)", "proving key 138 MB"):
            step(text)
        tried = (zk.onboard.Tried(7, 15, 0.004),)
        return zk.onboard.OnboardResult(record, tmp_path / "out", tried, {"zk.json": 900})

    monkeypatch.setattr(zk.onboard, "onboard", fake_onboard)
    cal = tmp_path / "cal.npy"
    np.save(cal, np.zeros((4, 4), np.float32))
    argv = ["zk", "onboard", "m.onnx", "--name", "iris", "--calibration", str(cal)]
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "zk onboard iris: calibrating (scale 7)..." in err
    assert "zk onboard iris: setup (logrows 15)..." in err
    assert "zk onboard iris: done in" in err and "WARNING: DEV-ONLY SRS" in err
    assert "onboarded iris v1" in out and "vk_sha256:" in out and "calibrating" not in out
    assert "{" not in out  # text, not text mixed with JSON
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # stdout is one JSON document
    assert data["record"] == record.to_json() and data["files"] == {"zk.json": 900}
    assert data["tried"] == [{"scale": 7, "logrows": 15, "max_abs_error": 0.004}]
    assert data["warnings"] and "zk onboard" not in err  # no progress with --json


def _node_serve(pki: PKI, triton_home: Path, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """Start `ztgate node serve` (iris only), wait for its ready line on stdout, SIGTERM it;
    returns (stdout, stderr) in full."""
    import select
    import signal
    import time

    from gateway.ports import free_port

    work = tmp_path / f"n{len(list(tmp_path.glob('n*')))}"
    node = subprocess.Popen(
        [str(ZTGATE), "node", "serve", "--name", "n9", "--region", "eu-west",
         "--provider", "prov-a", "--grpc-port", str(free_port()), "--pki", str(pki.root),
         "--registry", str(tmp_path / "registry"), "--models", "iris", "--workdir", str(work),
         "--triton-home", str(triton_home), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert node.stdout is not None
    try:
        end = time.monotonic() + 90
        # Ready once stdout has its data (text: the ready line; --json: a whole document).
        out = b""
        while not (b"\n  log:" in out or out.rstrip().endswith(b"}")):
            assert time.monotonic() < end and node.poll() is None, out
            if select.select([node.stdout], [], [], 0.5)[0]:
                out += os.read(node.stdout.fileno(), 65536)
    finally:
        node.send_signal(signal.SIGTERM)
        rest, err = node.communicate(timeout=60)
    assert node.returncode == 0, err.decode()
    return (out + rest).decode(), err.decode()


def test_node_start_progress_on_stderr_and_stdout_json_with_json(
    pki: PKI, triton_home: Path, tmp_path: Path
) -> None:
    from tests.conftest import example_entries

    example_entries(tmp_path)
    out, err = _node_serve(pki, triton_home, tmp_path)
    assert "node n9: building the model repository..." in err
    assert "node n9: starting tritonserver..." in err
    assert "node n9: loading models (tritonserver pid" in err
    assert re.search(r"node n9: ready in \d+(\.\d)? s", err), err
    assert out.startswith("node n9 ready in") and "n9:" not in out  # no progress in data
    out, err = _node_serve(pki, triton_home, tmp_path, "--json")
    data = json.loads(out)  # the whole of stdout: one JSON document
    assert data["name"] == "n9" and data["dns_name"] == pki.node_dns_name("n9")
    assert data["spiffe_id"] == "spiffe://ztgate.local/node/n9" and data["ready_s"] > 0
    assert not re.search(r"^node n9: ", err, re.M), err  # no progress lines with --json
