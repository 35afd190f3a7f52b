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

Flavour = Literal["python", "onnxruntime"]
FLAVOURS: tuple[str, ...] = ("python", "onnxruntime")
MANIFEST = ".ztgate-repository.json"
TEMPLATE = "python_model.py.tmpl"


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


def render_config(entry: ModelEntry, flavour: Flavour) -> str:
    """The config.pbtxt text for ``entry``'s model name."""
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
        if len({(e.inputs, e.outputs) for e in versions}) != 1:
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


def _write_model(root: Path, versions: Sequence[ModelEntry], flavour: Flavour) -> None:
    model_dir = root / versions[0].name
    model_dir.mkdir()
    latest = max(versions, key=lambda e: int(e.version))
    (model_dir / "config.pbtxt").write_text(render_config(latest, flavour), encoding="utf-8")
    wrapper = resources.files("gateway.node").joinpath(TEMPLATE).read_bytes()
    for entry in versions:
        version_dir = model_dir / entry.version
        version_dir.mkdir()
        _copy_verified(entry, version_dir / "model.onnx")
        if flavour == "python":
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
    entries: Iterable[ModelEntry], out_dir: Path | str, flavour: Flavour = "python"
) -> Path:
    """Write a Triton model repository serving ``entries`` at ``out_dir``; returns the path.

    Rebuilding from the same entries gives the same tree, so calling it again is harmless.
    """
    if flavour not in FLAVOURS:
        raise RepositoryError(f"unknown flavour {flavour!r}: expected one of {FLAVOURS}")
    out = Path(out_dir).absolute()
    groups = _group(entries)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name in sorted(groups):
            _write_model(staged, groups[name], flavour)
        (staged / MANIFEST).write_text(_manifest(groups, flavour), encoding="utf-8")
        # mkdtemp makes 0700 dirs; Triton may run as another user in a container.
        staged.chmod(0o755)
        _swap_in(staged, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staged)
        raise
    return out
