"""The model registry and the `ztgate model` commands."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from gateway.cli import main
from gateway.examples import SHIPPED_DIR, shipped_sums
from gateway.registry import (
    EXAMPLE_POLICY,
    INDEX_FILE,
    Registry,
    RegistryError,
    TensorSpec,
    read_signature,
    seed_examples,
)

IRIS = SHIPPED_DIR / "iris.onnx"
RISK = SHIPPED_DIR / "risk.onnx"


def identity_model(
    path: Path,
    elem_type: int = TensorProto.FLOAT,
    dims: list[int | str | None] | None = None,
    weight_as_input: bool = False,
) -> Path:
    """A one-node ONNX file whose input/output declaration the test controls."""
    shape: list[int | str | None] = ["batch", 3] if dims is None else dims
    x = helper.make_tensor_value_info("x", elem_type, shape)
    y = helper.make_tensor_value_info("y", elem_type, shape)
    inputs = [x]
    initializers = []
    if weight_as_input:
        initializers.append(helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0]))
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", inputs, [y], initializer=initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry.open(tmp_path / "reg")


# --------------------------------------------------------------------------- signatures


def test_signature_of_shipped_model() -> None:
    inputs, outputs = read_signature(IRIS)
    assert inputs == (TensorSpec("input", "FP32", (-1, 4)),)
    assert outputs == (TensorSpec("probabilities", "FP32", (-1, 3)),)


@pytest.mark.parametrize(
    ("elem_type", "datatype"),
    [
        (TensorProto.FLOAT, "FP32"),
        (TensorProto.DOUBLE, "FP64"),
        (TensorProto.FLOAT16, "FP16"),
        (TensorProto.INT64, "INT64"),
        (TensorProto.INT32, "INT32"),
        (TensorProto.UINT8, "UINT8"),
        (TensorProto.BOOL, "BOOL"),
        (TensorProto.STRING, "BYTES"),
    ],
)
def test_signature_maps_onnx_types_to_kserve(tmp_path: Path, elem_type: int, datatype: str) -> None:
    inputs, outputs = read_signature(identity_model(tmp_path / "m.onnx", elem_type))
    assert inputs == (TensorSpec("x", datatype, (-1, 3)),)
    assert outputs == (TensorSpec("y", datatype, (-1, 3)),)


def test_signature_dynamic_dims_and_initializer_inputs(tmp_path: Path) -> None:
    path = identity_model(tmp_path / "m.onnx", dims=["n", None, 5], weight_as_input=True)
    inputs, outputs = read_signature(path)
    assert inputs == (TensorSpec("x", "FP32", (-1, -1, 5)),)
    assert outputs == (TensorSpec("y", "FP32", (-1, -1, 5)),)


def test_signature_refuses_unsupported_type(tmp_path: Path) -> None:
    path = identity_model(tmp_path / "m.onnx", TensorProto.COMPLEX64)
    with pytest.raises(RegistryError, match="unsupported element type COMPLEX64"):
        read_signature(path)


# --------------------------------------------------------------------------- add / get


def test_open_creates_an_empty_registry(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    registry = Registry.open(root)
    index = json.loads((root / INDEX_FILE).read_text())
    assert index == {"format": "ztgate.registry/1", "models": {}}
    assert registry.entries() == []
    assert Registry.open(root).entries() == []


def test_add_copies_hashes_and_indexes(registry: Registry) -> None:
    entry = registry.add(IRIS, "iris", "3", "public", ("zk", "none"))
    assert entry.sha256 == hashlib.sha256(IRIS.read_bytes()).hexdigest()
    assert entry.path == registry.root / "models/iris/3/model.onnx"
    assert entry.path.read_bytes() == IRIS.read_bytes()
    assert entry.allowed_modes == ("none", "zk")  # canonical order
    assert entry.inputs == (TensorSpec("input", "FP32", (-1, 4)),)
    # The index on disk is the source of truth: a fresh handle sees the same entry.
    assert Registry.open(registry.root).get("iris", "3") == entry
    record = json.loads(registry.index_path.read_text())["models"]["iris"]["3"]
    assert record["file"] == "models/iris/3/model.onnx"
    assert record["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]


def test_defaults(registry: Registry) -> None:
    entry = registry.add(IRIS, "iris")
    assert (entry.version, entry.classification, entry.allowed_modes) == (
        "1",
        "internal",
        ("none",),
    )


def test_get_latest_compares_versions_numerically(registry: Registry) -> None:
    for version in ("2", "10", "9"):
        registry.add(IRIS, "iris", version)
    assert registry.get("iris").version == "10"
    assert registry.get("iris", "2").version == "2"
    assert [(e.name, e.version) for e in registry.entries()] == [
        ("iris", "2"),
        ("iris", "9"),
        ("iris", "10"),
    ]


def test_get_unknown(registry: Registry) -> None:
    registry.add(IRIS, "iris")
    with pytest.raises(RegistryError, match="no model named 'nope'"):
        registry.get("nope")
    with pytest.raises(RegistryError, match=r"no version '2' \(has 1\)"):
        registry.get("iris", "2")


def test_readd_same_bytes_is_a_noop(registry: Registry) -> None:
    first = registry.add(IRIS, "iris", "1", "public", ("none",))
    before = registry.index_path.read_bytes()
    assert registry.add(IRIS, "iris", "1", "public", ("none",)) == first
    assert registry.index_path.read_bytes() == before


def test_readd_different_bytes_is_refused(registry: Registry) -> None:
    first = registry.add(IRIS, "iris")
    with pytest.raises(RegistryError, match="already registered with different bytes"):
        registry.add(RISK, "iris")
    assert registry.get("iris") == first
    assert first.path.read_bytes() == IRIS.read_bytes()


def test_readd_with_other_policy_is_refused(registry: Registry) -> None:
    registry.add(IRIS, "iris", classification="public")
    with pytest.raises(RegistryError, match="classification 'public', not 'restricted'"):
        registry.add(IRIS, "iris", classification="restricted")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Iris"}, "invalid model name"),
        ({"name": "-iris"}, "invalid model name"),
        ({"name": "a" * 65}, "invalid model name"),
        ({"name": "../etc"}, "invalid model name"),
        ({"name": "ir is"}, "invalid model name"),
        ({"version": "0"}, "invalid version"),
        ({"version": "01"}, "invalid version"),
        ({"version": "v1"}, "invalid version"),
        ({"version": ""}, "invalid version"),
        ({"classification": "secret"}, "invalid classification"),
        ({"allowed_modes": ("tee",)}, "invalid mode"),
        ({"allowed_modes": ()}, "at least one allowed mode"),
    ],
)
def test_invalid_arguments(registry: Registry, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "iris", **kwargs}
    with pytest.raises(RegistryError, match=message):
        registry.add(IRIS, **args)  # type: ignore[arg-type]
    assert registry.entries() == []
    # Positive control: the same call without the one bad argument is accepted.
    assert registry.add(IRIS, name="iris").name == "iris"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # parses as an empty ModelProto, which the checker refuses
        (b"", "is not a valid ONNX model: The model does not have an ir_version"),
        (b"hello, I am not a model\n", "is not an ONNX model: Error parsing message"),
        (bytes(range(256)) * 4, "is not an ONNX model: Error parsing message"),
    ],
)
def test_garbage_files_are_refused(
    registry: Registry, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(RegistryError, match=message):
        registry.add(path, "junk")
    assert registry.entries() == []
    assert not (registry.root / "models" / "junk").exists()


def test_missing_file_is_refused(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read"):
        registry.add(tmp_path / "absent.onnx", "absent")


def test_model_without_inputs_is_refused(registry: Registry, tmp_path: Path) -> None:
    const = helper.make_node(
        "Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0])
    )
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(
        helper.make_graph([const], "g", [], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, tmp_path / "c.onnx")
    with pytest.raises(RegistryError, match="no inputs or no outputs"):
        registry.add(tmp_path / "c.onnx", "const")


def test_no_temp_files_left_behind(registry: Registry) -> None:
    registry.add(IRIS, "iris")
    registry.add(RISK, "risk")
    leftovers = [p for p in registry.root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def _add_in_child(root: str, name: str) -> None:
    Registry.open(root).add(IRIS, name)


def test_concurrent_adds_from_processes_all_survive(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry.open(root)
    ctx = multiprocessing.get_context("fork")
    names = [f"m{i}" for i in range(6)]
    procs = [ctx.Process(target=_add_in_child, args=(str(root), n)) for n in names]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert sorted(e.name for e in Registry.open(root).entries()) == names


# --------------------------------------------------------------------------- index problems


def test_corrupt_index(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry.open(root)
    (root / INDEX_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match="cannot read"):
        Registry.open(root)
    (root / INDEX_FILE).write_text('{"format": "other", "models": {}}')
    with pytest.raises(RegistryError, match=r"is not a ztgate\.registry/1 index"):
        Registry.open(root)
    (root / INDEX_FILE).write_text(
        '{"format": "ztgate.registry/1", "models": {"iris": {"1": {"sha256": "x"}}}}'
    )
    with pytest.raises(RegistryError, match="malformed entry iris/1"):
        Registry.open(root).entries()


def test_registry_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryError, match="cannot create registry"):
        Registry.open(tmp_path / "file")


# --------------------------------------------------------------------------- verify


def test_verify_reports_tampered_and_missing_files(registry: Registry) -> None:
    iris = registry.add(IRIS, "iris")
    risk = registry.add(RISK, "risk")
    assert registry.verify() == []
    tampered = iris.path.read_bytes() + b"\0"
    iris.path.write_bytes(tampered)
    risk.path.unlink()
    assert registry.verify() == [
        f"iris/1: sha256 is {hashlib.sha256(tampered).hexdigest()}, registry says {iris.sha256}",
        f"risk/1: cannot read {risk.path}: No such file or directory",
    ]


# --------------------------------------------------------------------------- examples


def test_seed_examples_is_idempotent(registry: Registry) -> None:
    first = seed_examples(registry)
    assert seed_examples(registry) == first
    sums = shipped_sums()
    assert {(e.name, e.sha256) for e in first} == {(n, sums[n]) for n in EXAMPLE_POLICY}
    for entry in first:
        assert (entry.classification, entry.allowed_modes) == EXAMPLE_POLICY[entry.name]
    risk = registry.get("risk")
    assert risk.classification == "restricted" and "none" not in risk.allowed_modes
    assert registry.verify() == []


# --------------------------------------------------------------------------- output ranges


def test_mpc_models_carry_an_output_range(registry: Registry) -> None:
    """risk ends in a Sigmoid: [0, 1] is derived and recorded; iris (no mpc) records none."""
    seed_examples(registry)
    assert registry.get("risk").outputs == (TensorSpec("score", "FP32", (-1, 1), (0.0, 1.0)),)
    models = json.loads(registry.index_path.read_text())["models"]
    assert models["risk"]["1"]["outputs"][0]["range"] == [0.0, 1.0]
    assert registry.get("iris").outputs[0].value_range is None
    assert "range" not in models["iris"]["1"]["outputs"][0]


def test_declared_range_wins_and_round_trips(registry: Registry, tmp_path: Path) -> None:
    entry = registry.add(RISK, "risk", allowed_modes=("mpc",), output_ranges={"score": [0.1, None]})
    assert entry.outputs[0].value_range == (0.1, None)
    assert Registry.open(registry.root).get("risk") == entry
    # A model without mpc may declare one too; it is recorded as given.
    path = identity_model(tmp_path / "m.onnx")
    ident = registry.add(path, "ident", output_ranges={"y": [-1, 1]})
    assert ident.outputs[0].value_range == (-1.0, 1.0)


def test_mpc_model_whose_output_nothing_bounds_needs_a_declaration(
    registry: Registry, tmp_path: Path
) -> None:
    path = identity_model(tmp_path / "m.onnx")
    with pytest.raises(RegistryError, match=r"output 'y', and its producing op \(Identity\)"):
        registry.add(path, "ident", allowed_modes=("mpc",))
    assert registry.entries() == []


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"y": [1, 0]}, "must be below high"),
        ({"y": [0, 0]}, "must be below high"),
        ({"y": [None, None]}, "at least one bound"),
        ({"y": [0]}, "must be \\[low, high\\]"),
        ({"y": [0, float("nan")]}, "finite numbers or null"),
        ({"y": ["0", 1]}, "finite numbers or null"),
        ({"y": [True, 2]}, "finite numbers or null"),
        ({"z": [0, 1]}, "unknown output"),
    ],
)
def test_malformed_ranges_are_refused(
    registry: Registry, tmp_path: Path, declared: dict[str, object], message: str
) -> None:
    path = identity_model(tmp_path / "m.onnx")
    with pytest.raises(RegistryError, match=message):
        registry.add(path, "ident", allowed_modes=("mpc",), output_ranges=declared)


def test_a_malformed_range_in_the_index_is_refused() -> None:
    raw = {"name": "y", "datatype": "FP32", "shape": [-1, 1], "range": [2, 1]}
    with pytest.raises(RegistryError, match="must be below high"):
        TensorSpec.from_json(raw)


# --------------------------------------------------------------------------- CLI


def test_cli_add_prints_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "reg")
    rc = main(
        ["model", "add", str(IRIS), "--name", "iris", "--version", "2", "--classification",
         "public", "--modes", "zk, none", "--registry", reg]
    )  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["name"] == "iris" and printed["version"] == "2"
    assert printed["allowed_modes"] == ["none", "zk"]
    assert printed["sha256"] == hashlib.sha256(IRIS.read_bytes()).hexdigest()
    assert Registry.open(reg).get("iris").to_json() == printed


def test_cli_list_examples_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "reg")
    assert main(["model", "examples", "--registry", reg]) == 0
    assert "risk\t1\trestricted\tredundant,mpc" in capsys.readouterr().out
    assert main(["model", "list", "--registry", reg]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["iris", "mnist", "risk"]
    assert main(["model", "list", "--json", "--registry", reg]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert main(["model", "verify", "--registry", reg]) == 0
    (Path(reg) / "models/mnist/1/model.onnx").write_bytes(b"swapped")
    assert main(["model", "verify", "--registry", reg]) == 1
    assert capsys.readouterr().out.startswith("mnist/1: sha256 is")


def test_cli_default_registry_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["model", "add", str(IRIS), "--name", "iris"]) == 0
    assert (tmp_path / ".ztgate/registry/models/iris/1/model.onnx").is_file()


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["model", "add", "GARBAGE", "--name", "x"], "is not an ONNX model"),
        (["model", "add", "IRIS", "--name", "Bad Name"], "invalid model name 'Bad Name'"),
        (["model", "add", "IRIS", "--name", "x", "--version", "1.0"], "invalid version '1.0'"),
        (["model", "add", "IRIS", "--name", "x", "--modes", "none,tee"], "invalid mode(s) tee"),
        (["model", "add", "IRIS", "--name", "x", "--modes", ","], "at least one allowed mode"),
        (
            ["model", "add", "IRIS", "--name", "x", "--classification", "top-secret"],
            "invalid classification 'top-secret'",
        ),
        (["model", "add", "MISSING", "--name", "x"], "cannot read"),
    ],
)
def test_cli_user_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01garbage")
    files = {"GARBAGE": str(garbage), "IRIS": str(IRIS), "MISSING": str(tmp_path / "no.onnx")}
    registry = ["--registry", str(tmp_path / "reg")]
    argv = [files.get(a, a) for a in argv] + registry
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ztgate: error: ") and complaint in err and "Traceback" not in err
    assert Registry.open(tmp_path / "reg").entries() == []
    # Positive control: the same command line for IRIS, name x, nothing else, is accepted.
    assert main(["model", "add", str(IRIS), "--name", "x", *registry]) == 0


def test_cli_corrupt_registry_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / INDEX_FILE).write_text("[]")
    assert main(["model", "list", "--registry", str(reg)]) == 2
    assert "is not a ztgate.registry/1 index" in capsys.readouterr().err


def test_cli_add_declares_output_ranges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "reg")
    capsys.readouterr()
    rc = main(["model", "add", str(IRIS), "--name", "iris", "--modes", "none,mpc",
               "--output-range", "probabilities=0:0.5", "--registry", reg])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    outputs = json.loads(capsys.readouterr().out)["outputs"]
    declared = [o for o in outputs if o["name"] == "probabilities"]
    assert declared and declared[0]["range"] == [0.0, 0.5]
    # An open side, and malformed declarations (usage errors, nothing registered).
    rc = main(["model", "add", str(IRIS), "--name", "iris", "--version", "2", "--modes",
               "mpc", "--output-range", "probabilities=0:", "--registry", reg])  # fmt: skip
    assert rc == 0 and json.loads(capsys.readouterr().out)["outputs"][-1]["range"][1] is None
    for bad in ("probabilities", "probabilities=a:b", "=0:1"):
        rc = main(["model", "add", str(IRIS), "--name", "iris", "--version", "3",
                   "--output-range", bad, "--registry", reg])  # fmt: skip
        assert rc == 2 and "expected NAME=LOW:HIGH" in capsys.readouterr().err
    assert [e.version for e in Registry.open(reg).entries()] == ["1", "2"]


# --------------------------------------------------------------------------- generative kind

TINYGPT = SHIPPED_DIR / "tinygpt.onnx"


def test_generative_entry_records_tokenizer_context_end_tokens_and_sampling(
    tmp_path: Path,
) -> None:
    from gateway.llm import tokenizer
    from gateway.llm.generative import STREAM_INPUTS, STREAM_OUTPUTS

    registry = Registry.open(tmp_path)
    entry = registry.add_generative(TINYGPT, "tinygpt", "1", "public")
    assert entry.sha256 == shipped_sums()["tinygpt"] and entry.allowed_modes == ("none",)
    spec = entry.generative
    assert spec is not None
    assert spec.tokenizer_sha256 == tokenizer.TOKENIZER_SPEC_SHA256
    assert (spec.vocab, spec.context_length, spec.end_tokens) == (257, 128, (tokenizer.EOS,))
    assert spec.sampling == ("temperature", "top_p", "seed")
    assert (entry.inputs, entry.outputs) == (STREAM_INPUTS, STREAM_OUTPUTS)
    raw = json.loads((tmp_path / INDEX_FILE).read_text())["models"]["tinygpt"]["1"]
    assert raw["kind"] == "generative" and raw["generative"]["end_tokens"] == [256]
    assert Registry.open(tmp_path).get("tinygpt") == entry  # read back the same
    # A tensor model's entry has no generative part (control, read the same way).
    assert registry.add(IRIS, "iris").generative is None


def test_generative_refuses_what_is_not_a_next_token_model_over_its_vocab(
    tmp_path: Path,
) -> None:
    import dataclasses

    from gateway.llm.generative import default_spec

    registry = Registry.open(tmp_path)
    with pytest.raises(RegistryError, match="input_ids"):
        registry.add_generative(IRIS, "notgpt")
    with pytest.raises(RegistryError, match="logits over 257 tokens"):
        registry.add_generative(
            TINYGPT, "wrongvocab", spec=dataclasses.replace(default_spec(), vocab=300)
        )
    with pytest.raises(RegistryError, match="end token"):
        registry.add_generative(
            TINYGPT, "badend", spec=dataclasses.replace(default_spec(), end_tokens=(999,))
        )
    # Control: the same file with the default spec registers.
    assert registry.add_generative(TINYGPT, "tinygpt").generative == default_spec()


def test_generative_entry_is_immutable_in_its_spec(tmp_path: Path) -> None:
    from gateway.llm.generative import default_spec

    registry = Registry.open(tmp_path)
    first = registry.add_generative(TINYGPT, "tinygpt")
    assert registry.add_generative(TINYGPT, "tinygpt") == first  # identical: a no-op
    with pytest.raises(RegistryError, match="generative"):
        registry.add_generative(TINYGPT, "tinygpt", spec=default_spec(context_length=64))


def test_cli_model_add_generative(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "reg")
    args = ["model", "add", str(TINYGPT), "--name", "tg", "--registry", reg]
    assert main([*args, "--generative", "--context-length", "64", "--max-tokens", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "generative"
    assert printed["generative"]["context_length"] == 64
    assert printed["generative"]["max_tokens"] == 32
    assert main(["model", "list", "--registry", reg]) == 0
    assert capsys.readouterr().out.startswith("tg\t1\tinternal\tnone\tgenerative\t")
    # Modes other than none are refused for generative models, with the reason.
    assert main([*args, "--generative", "--name", "tg2", "--modes", "none,zk"]) == 2
    assert "only mode none" in capsys.readouterr().err
