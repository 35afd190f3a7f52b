"""Triton's `simple` example model, for tests that do what Triton's example clients do.

INT32 INPUT0 and INPUT1 of shape [-1, 16]; OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 =
INPUT0 - INPUT1 (what `simple_http_infer_client.py`, `simple_grpc_infer_client.py` and
their aio and streaming siblings call). Built with onnx.helper and onboarded with
`ztgate model add`, as an operator would register a model of their own.

Shared by both fronts' tests: `simple_registry` makes a registry with the shipped examples
and `simple`, and `simple_node` a real tritonserver serving `simple` and `iris` from it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper

from gateway.node.repository import build_repository
from gateway.pki import PKI
from gateway.registry import Registry, seed_examples
from tests.conftest import one_off_node

SIMPLE = "simple"
WIDTH = 16


def build_simple(path: Path) -> Path:
    """Write the `simple` ONNX model to `path` (opset 17, IR 8, as gateway.examples)."""
    shape: list[int | str] = ["batch", WIDTH]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("INPUT0", "INPUT1")
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("OUTPUT0", "OUTPUT1")
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        SIMPLE,
        inputs,
        outputs,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ztgate.tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def simple_registry(root: Path, classification: str = "public") -> Path:
    """A registry (under `root`) with the shipped examples and `simple`, the latter added
    with the CLI (`ztgate model add`, modes none and redundant). Returns its directory."""
    registry = root / "registry"
    seed_examples(Registry.open(registry))
    onnx_path = build_simple(root / "simple.onnx")
    subprocess.run(
        [
            sys.executable, "-m", "gateway", "model", "add", str(onnx_path),
            "--name", SIMPLE, "--classification", classification,
            "--modes", "none,redundant", "--registry", str(registry),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return registry


@contextmanager
def simple_node(
    pki: PKI, triton_home: Path, registry: Path, work: Path, name: str = "simple-n1"
) -> Iterator[dict[str, object]]:
    """A real tritonserver serving `simple` and `iris` from `registry`; yields its
    `[[nodes]]` table (limited to those two models) for a gateway config."""
    entries = [e for e in Registry.open(registry).entries() if e.name in (SIMPLE, "iris")]
    repo = build_repository(entries, work / "repository")
    with one_off_node(pki, triton_home, repo, name, work / "node") as node:
        yield {**node, "models": ["iris", SIMPLE]}


def example_inputs() -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """The examples' data: INPUT0 = 0..15, INPUT1 = all -1, each of shape [1, 16]."""
    input0 = np.expand_dims(np.arange(start=0, stop=WIDTH, dtype=np.int32), axis=0)
    input1 = np.full(shape=(1, WIDTH), fill_value=-1, dtype=np.int32)
    return input0, input1
