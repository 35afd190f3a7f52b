"""`make wheelhouse` (deploy/wheelhouse.py): an air-gapped install from one directory.

The wheelhouse is built once per session (about 30 s here with pip's cache warm; set
ZTGATE_WHEELHOUSE to a built one to skip that), then installed into a fresh venv with
`pip install --no-index` and no pip configuration, so nothing but the directory is used,
and a node is started from that venv."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "wheelhouse.py"

pytestmark = pytest.mark.slow


def offline_env() -> dict[str, str]:
    """pip with no index, no configured find-links and no config file: the wheelhouse only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.fixture(scope="session")
def srs_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    srs = tmp_path_factory.mktemp("srs") / "ceremony-15.srs"
    srs.write_bytes(os.urandom(4096))  # stands in for a ceremony file: only its pin matters here
    return srs, hashlib.sha256(srs.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, srs_file: tuple[Path, str]) -> Path:
    given = os.environ.get("ZTGATE_WHEELHOUSE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("air-gap") / "wheelhouse"
    srs, pin = srs_file
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--srs", str(srs), "--srs-sha256", pin],
        check=True,
        timeout=900,
    )
    return out


def test_a_wrong_srs_pin_is_refused_before_anything_is_fetched(
    tmp_path: Path, srs_file: tuple[Path, str]
) -> None:
    srs, _ = srs_file
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "w"), "--srs", str(srs),
         "--srs-sha256", "0" * 64],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "not the pinned" in done.stderr
    assert not (tmp_path / "w" / "wheels").exists()


def test_the_wheelhouse_holds_every_wheel_the_models_and_the_pinned_srs(
    wheelhouse: Path, srs_file: tuple[Path, str]
) -> None:
    wheels = {p.name.split("-")[0].lower() for p in (wheelhouse / "wheels").glob("*.whl")}
    for need in ("ztgate", "torch", "nvidia_pytriton", "ezkl", "crypten", "python_pkcs11"):
        assert need in wheels, need
    (torch,) = (wheelhouse / "wheels").glob("torch-*.whl")
    assert torch.name.startswith("torch-2.13.0+cpu-")  # the pinned CPU wheel, not CUDA's
    models = {p.name for p in (wheelhouse / "models").iterdir()}
    assert {"iris.onnx", "mnist.onnx", "risk.onnx"} <= models
    if "ZTGATE_WHEELHOUSE" not in os.environ:
        srs, pin = srs_file
        assert (wheelhouse / "srs" / srs.name).read_bytes() == srs.read_bytes()
        assert pin in (wheelhouse / "INSTALL.txt").read_text()
    # Every file is in SHA256SUMS, and matches.
    sums = dict(
        reversed(line.split("  ", 1))
        for line in (wheelhouse / "SHA256SUMS").read_text().splitlines()
    )
    files = {
        str(p.relative_to(wheelhouse))
        for p in wheelhouse.rglob("*")
        if p.is_file() and p.name != "SHA256SUMS"
    }
    assert set(sums) == files
    some = sorted(files)[:: max(1, len(files) // 10)]
    for name in some:
        with (wheelhouse / name).open("rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == sums[name], name


def test_an_offline_install_runs_ztgate_and_starts_a_node(wheelhouse: Path, tmp_path: Path) -> None:
    env = offline_env()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q"]
    links = ["--no-index", "--find-links", str(wheelhouse / "wheels")]
    # Every extra resolves from the wheelhouse alone (resolved, not installed: torch alone
    # is 200 MB) ...
    subprocess.run(
        [*pip, "install", "--dry-run", *links, "ztgate[node,mpc,zk,train]"],
        check=True, env=env, timeout=300,
    )  # fmt: skip
    # ... and a node's install is done for real.
    subprocess.run([*pip, "install", *links, "ztgate[node]"], check=True, env=env, timeout=600)
    ztgate = str(venv / "bin" / "ztgate")
    version = subprocess.run(
        [ztgate, "--version"], capture_output=True, text=True, check=True, env=env, timeout=60
    )
    assert version.stdout.startswith("ztgate 0.")
    work = tmp_path / "node"
    subprocess.run([ztgate, "pki", "init", str(work / "pki")], check=True, env=env, timeout=120,
                   capture_output=True)  # fmt: skip
    subprocess.run(
        [ztgate, "model", "examples", "--registry", str(work / "registry")],
        check=True, env=env, timeout=120, capture_output=True,
    )  # fmt: skip
    port = free_port()
    log = work / "node.log"
    with log.open("wb") as out:
        node = subprocess.Popen(
            [ztgate, "node", "serve", "--name", "n1", "--region", "eu-west",
             "--provider", "prov-a", "--grpc-port", str(port), "--pki", str(work / "pki"),
             "--registry", str(work / "registry"), "--workdir", str(work / "n1")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        end = time.monotonic() + 120
        while "node n1 ready" not in log.read_text(errors="replace"):
            assert node.poll() is None, log.read_text()
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        assert f"127.0.0.1:{port}" in text
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            rc = node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            rc = node.wait()
    assert rc == 0, log.read_text()[-2000:]
