"""Triton model repositories generated from registry entries."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from gateway.node.repository import (
    MANIFEST,
    RepositoryError,
    build_repository,
    render_config,
    triton_datatype,
)
from gateway.ports import free_port as _free_port
from gateway.registry import Registry, TensorSpec, seed_examples

TEMPLATE = Path(__file__).resolve().parents[1] / "gateway/node/python_model.py.tmpl"

IRIS_PYTHON_CONFIG = """\
name: "iris"
backend: "python"
max_batch_size: 0
version_policy: { all { } }
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ -1, 4 ]
  }
]
output [
  {
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ -1, 3 ]
  }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry.open(tmp_path / "reg")
    seed_examples(registry)
    return registry


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- layout and text


def test_python_flavour_layout(registry: Registry, tmp_path: Path) -> None:
    out = build_repository(registry.entries(), tmp_path / "repo")
    assert out == tmp_path / "repo"
    assert sorted(tree(out)) == sorted(
        [MANIFEST]
        + [f"{n}/config.pbtxt" for n in ("iris", "mnist", "risk")]
        + [f"{n}/1/{f}" for n in ("iris", "mnist", "risk") for f in ("model.onnx", "model.py")]
    )
    for entry in registry.entries():
        assert (out / entry.name / "1/model.onnx").read_bytes() == entry.path.read_bytes()
        assert (out / entry.name / "1/model.py").read_bytes() == TEMPLATE.read_bytes()
    assert (out / "iris/config.pbtxt").read_text() == IRIS_PYTHON_CONFIG


def test_onnxruntime_flavour(registry: Registry, tmp_path: Path) -> None:
    out = build_repository(registry.entries(), tmp_path / "repo", flavour="onnxruntime")
    config = (out / "risk/config.pbtxt").read_text()
    assert config == IRIS_PYTHON_CONFIG.replace('"iris"', '"risk"').replace(
        'backend: "python"', 'platform: "onnxruntime_onnx"'
    ).replace("KIND_CPU, count: 1", "KIND_GPU").replace("-1, 4", "-1, 6").replace(
        '"probabilities"', '"score"'
    ).replace("-1, 3", "-1, 1")
    assert not list(out.rglob("model.py"))
    assert (out / "risk/1/model.onnx").is_file()


def test_unknown_flavour(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="unknown flavour"):
        build_repository(registry.entries(), tmp_path / "repo", flavour="tensorrt")  # type: ignore[arg-type]
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("datatype", "triton"),
    [
        ("FP32", "TYPE_FP32"),
        ("INT64", "TYPE_INT64"),
        ("BOOL", "TYPE_BOOL"),
        ("BYTES", "TYPE_STRING"),
    ],
)
def test_datatype_names(datatype: str, triton: str) -> None:
    assert triton_datatype(datatype) == triton


def test_scalars_and_odd_names_render(registry: Registry) -> None:
    entry = dataclasses.replace(
        registry.get("iris"),
        inputs=(TensorSpec('we"ird', "BYTES", ()),),
        outputs=(TensorSpec("out", "INT64", (-1,)),),
    )
    config = render_config(entry, "python")
    assert 'name: "we\\"ird"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n' in config
    assert "reshape: { shape: [ ] }" in config
    assert "dims: [ -1 ]" in config


def test_template_is_a_complete_python_backend_model() -> None:
    tree_ = ast.parse(TEMPLATE.read_text(), filename=str(TEMPLATE))
    classes = {n.name: n for n in tree_.body if isinstance(n, ast.ClassDef)}
    methods = {f.name for f in classes["TritonPythonModel"].body if isinstance(f, ast.FunctionDef)}
    assert {"initialize", "execute", "finalize"} <= methods
    source = TEMPLATE.read_text()
    assert "intra_op_num_threads = 1" in source and "inter_op_num_threads = 1" in source


# --------------------------------------------------------------------------- versions


def test_multiple_versions_share_one_config(registry: Registry, tmp_path: Path) -> None:
    registry.add(registry.get("iris").path, "iris", "2", "public", ("none",))
    out = build_repository(registry.entries(), tmp_path / "repo")
    assert (out / "iris/1/model.onnx").is_file() and (out / "iris/2/model.onnx").is_file()
    assert (out / "iris/config.pbtxt").read_text() == IRIS_PYTHON_CONFIG


def test_versions_with_different_signatures_are_refused(registry: Registry, tmp_path: Path) -> None:
    iris = registry.get("iris")
    other = dataclasses.replace(iris, version="2", inputs=(TensorSpec("input", "FP32", (-1, 5)),))
    with pytest.raises(RepositoryError, match="differ in inputs/outputs"):
        build_repository([iris, other], tmp_path / "repo")
    with pytest.raises(RepositoryError, match="listed twice"):
        build_repository([iris, iris], tmp_path / "repo")


# --------------------------------------------------------------------------- safety


def test_rebuild_is_idempotent_and_leaves_no_temp_dirs(registry: Registry, tmp_path: Path) -> None:
    out = build_repository(registry.entries(), tmp_path / "repo")
    first = tree(out)
    build_repository(registry.entries(), out)
    assert tree(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg", "repo"]


def test_rebuild_replaces_old_models(registry: Registry, tmp_path: Path) -> None:
    out = build_repository(registry.entries(), tmp_path / "repo")
    build_repository([registry.get("risk")], out)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "risk"]


def test_tampered_model_is_not_served(registry: Registry, tmp_path: Path) -> None:
    out = build_repository(registry.entries(), tmp_path / "repo")
    before = tree(out)
    registry.get("mnist").path.write_bytes(b"evil")
    with pytest.raises(RepositoryError, match="refusing to serve it"):
        build_repository(registry.entries(), out)
    assert tree(out) == before  # the previous repository is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg", "repo"]


def test_foreign_directory_is_not_replaced(registry: Registry, tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(RepositoryError, match="ztgate did not build"):
        build_repository(registry.entries(), foreign)
    assert (foreign / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RepositoryError, match="not a directory"):
        build_repository(registry.entries(), tmp_path / "file")


def test_empty_existing_directory_is_used(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    out = build_repository([registry.get("iris")], tmp_path / "repo")
    assert (out / "iris/config.pbtxt").is_file()


# --------------------------------------------------------------------------- tritonserver


def _pytriton_server_dir() -> Path:
    """The tritonserver that nvidia-pytriton (the node extra, in the dev extra) ships."""
    import pytriton  # type: ignore[import-untyped]

    server = Path(pytriton.__file__).parent / "tritonserver"
    assert (server / "bin/tritonserver").is_file(), f"no tritonserver binary under {server}"
    return server


def _triton_home(server: Path, home: Path) -> Path:
    """The layout tritonserver expects: its binary plus a backends/python with the stub."""
    backend = home / "backends/python"
    backend.mkdir(parents=True)
    (home / "bin").mkdir()
    shutil.copy2(server / "bin/tritonserver", home / "bin/tritonserver")
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(server / "backends/python" / name, backend / name)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / py / "triton_python_backend_stub"
    shutil.copy2(stub, backend / stub.name)
    return home


@dataclasses.dataclass(frozen=True)
class Served:
    address: str  # host:port of its HTTP endpoint
    prefix: str  # its python backend's shm-region prefix (unique to this server)


@contextlib.contextmanager
def run_tritonserver(repo: Path, home: Path, server: Path) -> Iterator[Served]:
    """Start tritonserver on free ports; always stop it and remove the shm segments it leaves
    behind (tritonserver 2.51 does, even on a clean SIGTERM; cf. gateway/node/triton.py)."""
    prefix = f"ztgtest{os.getpid()}x{uuid.uuid4().hex[:8]}"
    http_port = _free_port()
    env = dict(os.environ)
    libs = [str(server.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")])
    # The python backend stub imports onnxruntime, so this interpreter's env must come first.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    cmd = [
        str(home / "bin/tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={home / 'backends'}",
        f"--backend-config=python,shm-region-prefix-name={prefix}",
        "--exit-timeout-secs=2",
        f"--http-port={http_port}",
        f"--grpc-port={_free_port()}",
        "--allow-metrics=false",
    ]
    served = Served(f"127.0.0.1:{http_port}", prefix)
    log = (home / "tritonserver.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for leftover in Path("/dev/shm").glob(f"{prefix}*"):
            leftover.unlink(missing_ok=True)


def _wait_ready(client: Any, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if client.is_server_ready():
                return
        time.sleep(0.25)
    pytest.fail(f"tritonserver not ready after {timeout}s:\n{log.read_text()[-4000:]}")


def _infer(client: Any, model: str, x: NDArray[Any], output: str) -> NDArray[Any]:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    return np.asarray(result.as_numpy(output))


@pytest.mark.slow
def test_tritonserver_serves_the_generated_repository(registry: Registry, tmp_path: Path) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server = _pytriton_server_dir()

    iris = registry.get("iris")
    # Config says 5 features, the ONNX graph wants 4: exercises the wrapper's error path.
    broken = dataclasses.replace(
        iris, name="broken", inputs=(TensorSpec("input", "FP32", (-1, 5)),)
    )
    repo = build_repository([*registry.entries(), broken], tmp_path / "repo")
    home = _triton_home(server, tmp_path / "home")
    rng = np.random.default_rng(7)
    with run_tritonserver(repo, home, server) as served:
        client = httpclient.InferenceServerClient(served.address)
        _wait_ready(client, home / "tritonserver.log")
        for entry in registry.entries():
            features = entry.inputs[0].shape[1]
            output = entry.outputs[0].name
            for batch in (1, 5):
                x = rng.uniform(0, 1, (batch, features)).astype(np.float32)
                expected = ort.InferenceSession(str(entry.path)).run([output], {"input": x})[0]
                got = _infer(client, entry.name, x, output)
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        with pytest.raises(InferenceServerException, match="unexpected shape"):
            _infer(client, "iris", np.zeros((2, 5), np.float32), "probabilities")
        # The wrapper turns onnxruntime's exception into this request's error, and the stub
        # survives it: the second request gets the same answer, not "model unavailable".
        for _ in range(2):
            with pytest.raises(InferenceServerException) as failure:
                _infer(client, "broken", np.zeros((2, 5), np.float32), "probabilities")
            assert "Got invalid dimensions for input: input" in str(failure.value)
        assert client.is_model_ready("broken")
        # The python backend's shared memory really is under this server's prefix ...
        assert list(Path("/dev/shm").glob(f"{served.prefix}*"))
    # ... and none of it outlives the server (only ours: other runs may share /dev/shm).
    assert not list(Path("/dev/shm").glob(f"{served.prefix}*"))


# --------------------------------------------------------------------------- generative models

GENERATE_TEMPLATE = TEMPLATE.parent / "generate_model.py.tmpl"


def _tinygpt(tmp_path: Path) -> Any:
    from gateway.registry import seed_generative_examples

    (entry,) = seed_generative_examples(Registry.open(tmp_path / "registry"))
    return entry


@pytest.mark.parametrize("flavour", ["python", "onnxruntime"])
def test_generative_entry_becomes_a_decoupled_streaming_model(tmp_path: Path, flavour: str) -> None:
    entry = _tinygpt(tmp_path)
    out = build_repository([entry], tmp_path / "repo", flavour=flavour)  # type: ignore[arg-type]
    config = (out / "tinygpt" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config
    assert "model_transaction_policy { decoupled: true }" in config
    assert 'key: "end_tokens" value: { string_value: "256" }' in config
    assert 'key: "context_length" value: { string_value: "128" }' in config
    assert 'name: "token_id"' in config and 'name: "input_ids"' in config
    version = out / "tinygpt" / "1"
    assert (version / "model.py").read_bytes() == GENERATE_TEMPLATE.read_bytes()
    assert hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest() == entry.sha256
    ast.parse((version / "model.py").read_text())


def test_vllm_repository_follows_the_vllm_backend_layout(tmp_path: Path) -> None:
    import json

    entry = _tinygpt(tmp_path)
    out = build_repository(
        [entry], tmp_path / "repo", flavour="vllm", vllm_model="Qwen/Qwen2.5-0.5B-Instruct"
    )
    config = (out / "tinygpt" / "config.pbtxt").read_text()
    assert 'backend: "vllm"' in config and "max_batch_size: 0" in config
    assert "model_transaction_policy { decoupled: true }" in config
    for tensor in ("text_input", "stream", "sampling_parameters", "text_output"):
        assert f'name: "{tensor}"' in config
    assert sorted(p.name for p in (out / "tinygpt" / "1").iterdir()) == ["model.json"]
    engine = json.loads((out / "tinygpt" / "1" / "model.json").read_text())
    assert engine["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert engine["max_model_len"] == 128  # the registry entry's context length
    assert engine["disable_log_requests"] is True  # prompts stay out of the node's log
    # Controls built the same way: a tensor model, or no weights to load, is refused.
    iris = seed_examples(Registry.open(tmp_path / "registry"))[0]
    with pytest.raises(RepositoryError, match="not generative"):
        build_repository([iris], tmp_path / "r2", flavour="vllm", vllm_model="x")
    with pytest.raises(RepositoryError, match="vllm_model"):
        build_repository([entry], tmp_path / "r3", flavour="vllm")
