"""Turn registry entries into a Triton model repository.

Layout, for each model name::

    <out>/<name>/config.pbtxt
    <out>/<name>/<version>/model.onnx     byte-identical to the registry copy (SHA-256 checked)
    <out>/<name>/<version>/model.py       python flavour only: gateway/node/python_model.py.tmpl

Flavours:

* ``python`` -- ``backend: "python"`` with a small onnxruntime wrapper. The tritonserver in the
  nvidia-pytriton wheel ships only the python backend, so this is what runs on CPU nodes.
* ``onnxruntime`` -- the stock ``platform: "onnxruntime_onnx"`` config for NVIDIA's Triton
  image on GPU nodes.
* ``vllm`` -- generative entries only, for GPU nodes: Triton's vLLM backend
  (``backend: "vllm"``, ``<version>/model.json`` with the vLLM engine arguments). vLLM
  loads Hugging Face weights, not ONNX, so the weights' reference is given at build time
  (``vllm_model``); the entry supplies the context length (deploy/README.md).

A generative entry (gateway/llm/generative.py) is served, in the python and onnxruntime
flavours alike, by a decoupled python-backend model (``model_transaction_policy {
decoupled: true }``) that streams one response per token:
gateway/node/generate_model.py.tmpl (NVIDIA's image has the python backend; its Python
needs numpy and onnxruntime). Stock onnxruntime_onnx cannot loop over tokens.
Beside it, ``<name>-score`` (`score_model_name`): a plain (non-decoupled) python-backend
model over the same verified ``model.onnx`` that scores a given answer in one
teacher-forced pass (gateway/node/score_model.py.tmpl), which text spot checks run.

Both use ``max_batch_size: 0`` and spell out the full shape, the batch dimension included as
-1, so a request's shape is exactly the ONNX graph's. Every version handed in is served
(``version_policy: { all { } }``) because the gateway pins versions explicitly.

The repository is built in a sibling temp directory and swapped in with renames, so a reader
sees the old tree or the new one. ``<out>/.ztgate-repository.json`` records what was built;
a non-empty directory without it is never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from gateway.registry import ModelEntry, TensorSpec

Flavour = Literal["python", "onnxruntime", "vllm"]
FLAVOURS: tuple[str, ...] = ("python", "onnxruntime", "vllm")
MANIFEST = ".ztgate-repository.json"
TEMPLATE = "python_model.py.tmpl"
GENERATE_TEMPLATE = "generate_model.py.tmpl"
SCORE_TEMPLATE = "score_model.py.tmpl"
SCORE_SUFFIX = "-score"
SCORE_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("input_ids", "INT64", (-1,)),
    TensorSpec("answer_tokens", "INT64", (1,)),
    TensorSpec("temperature", "FP32", (1,)),
    TensorSpec("top_p", "FP32", (1,)),
)
SCORE_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("argmax", "INT64", (-1,)),
    TensorSpec("margin", "FP32", (-1,)),
    TensorSpec("gap", "FP32", (-1,)),
    TensorSpec("logprob", "FP32", (-1,)),
    TensorSpec("cdf_low", "FP64", (-1,)),
    TensorSpec("cdf_high", "FP64", (-1,)),
)
# Streams one node model serves at once (one thread each); more are refused at once.
MAX_STREAMS = 16


class RepositoryError(Exception):
    """The entries cannot be laid out as a Triton repository, or the target is unsafe."""


def triton_datatype(datatype: str) -> str:
    """KServe v2 datatype name -> Triton config enum (BYTES is TYPE_STRING there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _quote(text: str) -> str:
    # JSON string escaping is a subset of protobuf text-format escaping.
    return json.dumps(text)


def _tensor_block(spec: TensorSpec) -> str:
    lines = [
        "  {",
        f"    name: {_quote(spec.name)}",
        f"    data_type: {triton_datatype(spec.datatype)}",
    ]
    if spec.shape:
        lines.append(f"    dims: [ {', '.join(str(d) for d in spec.shape)} ]")
    else:
        # Triton has no rank-0 dims; the documented idiom is [1] reshaped to a scalar.
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    lines.append("  }")
    return "\n".join(lines)


def _tensor_list(key: str, specs: Sequence[TensorSpec]) -> str:
    return f"{key} [\n" + ",\n".join(_tensor_block(s) for s in specs) + "\n]"


def _parameters(values: dict[str, str]) -> str:
    items = [
        f"  {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
        for k, v in sorted(values.items())
    ]
    return "parameters [\n" + ",\n".join(items) + "\n]"


def score_model_name(model: str) -> str:
    """The Triton name of the teacher-forced scoring model served beside `model`."""
    return model + SCORE_SUFFIX


def render_score_config(entry: ModelEntry) -> str:
    """config.pbtxt of ``<name>-score`` for a generative entry (python and onnxruntime)."""
    spec = entry.generative
    assert spec is not None
    parts = [
        f"name: {_quote(score_model_name(entry.name))}",
        'backend: "python"',
        "max_batch_size: 0",
        "version_policy: { all { } }",
        _tensor_list("input", SCORE_INPUTS),
        _tensor_list("output", SCORE_OUTPUTS),
        "instance_group [ { kind: KIND_CPU, count: 1 } ]",
        _parameters({"context_length": str(spec.context_length)}),
    ]
    return "\n".join(parts) + "\n"


def _render_generative(entry: ModelEntry, flavour: Flavour) -> str:
    spec = entry.generative
    assert spec is not None
    if flavour in ("python", "onnxruntime"):
        return (
            "\n".join(
                [
                    f"name: {_quote(entry.name)}",
                    'backend: "python"',
                    "max_batch_size: 0",
                    "version_policy: { all { } }",
                    "model_transaction_policy { decoupled: true }",
                    _tensor_list("input", entry.inputs),
                    _tensor_list("output", entry.outputs),
                    # One instance: its execute hands each stream to a thread (the template).
                    "instance_group [ { kind: KIND_CPU, count: 1 } ]",
                    _parameters(
                        {
                            "end_tokens": ",".join(str(t) for t in spec.end_tokens),
                            "context_length": str(spec.context_length),
                            "max_streams": str(MAX_STREAMS),
                        }
                    ),
                ]
            )
            + "\n"
        )
    if flavour == "vllm":
        # As Triton's vllm_backend documents it (samples/model_repository/vllm_model).
        return (
            "\n".join(
                [
                    f"name: {_quote(entry.name)}",
                    'backend: "vllm"',
                    "max_batch_size: 0",
                    "model_transaction_policy { decoupled: true }",
                    "input [",
                    '  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },',
                    '  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true },',
                    '  { name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ]'
                    " optional: true },",
                    '  { name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [ 1 ]'
                    " optional: true }",
                    "]",
                    'output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] } ]',
                    "instance_group [ { count: 1, kind: KIND_MODEL } ]",
                ]
            )
            + "\n"
        )
    raise RepositoryError(f"unknown flavour {flavour!r}: expected one of {FLAVOURS}")


def render_vllm_engine_args(entry: ModelEntry, vllm_model: str) -> str:
    """``<version>/model.json``: the vLLM engine arguments for a generative entry."""
    spec = entry.generative
    if spec is None:
        raise RepositoryError(f"{entry.name} is not generative; vLLM serves generative models")
    args = {
        "model": vllm_model,
        "max_model_len": spec.context_length,
        # Prompts and outputs are clients' text: never in the node's log.
        "disable_log_requests": True,
        "gpu_memory_utilization": 0.9,
        "seed": 0,
    }
    return json.dumps(args, indent=2, sort_keys=True) + "\n"


def render_config(entry: ModelEntry, flavour: Flavour) -> str:
    """The config.pbtxt text for ``entry``'s model name."""
    if entry.generative is not None:
        return _render_generative(entry, flavour)
    if flavour == "vllm":
        raise RepositoryError(f"{entry.name} is not generative; flavour vllm serves text models")
    if flavour == "python":
        head = 'backend: "python"'
        instances = "instance_group [ { kind: KIND_CPU, count: 1 } ]"
    elif flavour == "onnxruntime":
        head = 'platform: "onnxruntime_onnx"'
        instances = "instance_group [ { kind: KIND_GPU } ]"
    else:
        raise RepositoryError(f"unknown flavour {flavour!r}: expected one of {FLAVOURS}")
    parts = [
        f"name: {_quote(entry.name)}",
        head,
        "max_batch_size: 0",
        "version_policy: { all { } }",
        _tensor_list("input", entry.inputs),
        _tensor_list("output", entry.outputs),
        instances,
    ]
    return "\n".join(parts) + "\n"


def _group(entries: Iterable[ModelEntry]) -> dict[str, list[ModelEntry]]:
    groups: dict[str, list[ModelEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.name, []).append(entry)
    for name, versions in groups.items():
        if len({e.version for e in versions}) != len(versions):
            raise RepositoryError(f"model {name!r} is listed twice with the same version")
        # One config.pbtxt covers every version, so they must agree on the tensors.
        if len({(e.inputs, e.outputs, e.generative) for e in versions}) != 1:
            raise RepositoryError(f"versions of {name!r} differ in inputs/outputs")
    return groups


def _copy_verified(entry: ModelEntry, target: Path) -> None:
    """Copy the model, refusing bytes that are not the ones the registry recorded."""
    try:
        data = entry.path.read_bytes()
    except OSError as exc:
        raise RepositoryError(f"cannot read {entry.path}: {exc.strerror or exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise RepositoryError(
            f"{entry.path} has sha256 {actual}, registry says {entry.sha256}; refusing to serve it"
        )
    target.write_bytes(data)


def _write_model(
    root: Path, versions: Sequence[ModelEntry], flavour: Flavour, vllm_model: str | None
) -> None:
    model_dir = root / versions[0].name
    model_dir.mkdir()
    latest = max(versions, key=lambda e: int(e.version))
    (model_dir / "config.pbtxt").write_text(render_config(latest, flavour), encoding="utf-8")
    template = GENERATE_TEMPLATE if latest.generative is not None else TEMPLATE
    wrapper = resources.files("gateway.node").joinpath(template).read_bytes()
    for entry in versions:
        version_dir = model_dir / entry.version
        version_dir.mkdir()
        if flavour == "vllm":
            if not vllm_model:
                raise RepositoryError("flavour vllm needs the weights to serve (vllm_model)")
            engine = render_vllm_engine_args(entry, vllm_model)
            (version_dir / "model.json").write_text(engine, encoding="utf-8")
            continue
        _copy_verified(entry, version_dir / "model.onnx")
        if flavour == "python" or entry.generative is not None:
            (version_dir / "model.py").write_bytes(wrapper)
    if latest.generative is not None and flavour != "vllm":
        _write_score_model(root, versions)


def _write_score_model(root: Path, versions: Sequence[ModelEntry]) -> None:
    latest = max(versions, key=lambda e: int(e.version))
    model_dir = root / score_model_name(latest.name)
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(render_score_config(latest), encoding="utf-8")
    wrapper = resources.files("gateway.node").joinpath(SCORE_TEMPLATE).read_bytes()
    for entry in versions:
        version_dir = model_dir / entry.version
        version_dir.mkdir()
        _copy_verified(entry, version_dir / "model.onnx")
        (version_dir / "model.py").write_bytes(wrapper)


def _manifest(groups: dict[str, list[ModelEntry]], flavour: Flavour) -> str:
    models = [
        {"name": e.name, "version": e.version, "sha256": e.sha256}
        for name in sorted(groups)
        for e in sorted(groups[name], key=lambda e: int(e.version))
    ]
    return json.dumps({"flavour": flavour, "models": models}, indent=2) + "\n"


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RepositoryError(f"{out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise RepositoryError(
            f"{out_dir} is a non-empty directory that ztgate did not build; refusing to replace it"
        )


def _swap_in(staged: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with ``staged``: two renames, so it is never half-written."""
    if not out_dir.exists():
        os.rename(staged, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / out_dir.name)
    os.rename(staged, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_repository(
    entries: Iterable[ModelEntry],
    out_dir: Path | str,
    flavour: Flavour = "python",
    *,
    vllm_model: str | None = None,
) -> Path:
    """Write a Triton model repository serving ``entries`` at ``out_dir``; returns the path.

    Rebuilding from the same entries gives the same tree, so calling it again is harmless.
    """
    if flavour not in FLAVOURS:
        raise RepositoryError(f"unknown flavour {flavour!r}: expected one of {FLAVOURS}")
    out = Path(out_dir).absolute()
    groups = _group(entries)
    for name, versions in groups.items():
        if versions[0].generative is not None and score_model_name(name) in groups:
            raise RepositoryError(f"{score_model_name(name)!r} is taken by the scorer of {name!r}")
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name in sorted(groups):
            _write_model(staged, groups[name], flavour, vllm_model)
        (staged / MANIFEST).write_text(_manifest(groups, flavour), encoding="utf-8")
        # mkdtemp makes 0700 dirs; Triton may run as another user in a container.
        staged.chmod(0o755)
        _swap_in(staged, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staged)
        raise
    return out
