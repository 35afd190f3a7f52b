"""The model registry: which ONNX models the gateway may serve, and under what rules.

A registry is a directory::

    <dir>/registry.json                       the index (below)
    <dir>/registry.lock                       flock'd while the index is rewritten
    <dir>/models/<name>/<version>/model.onnx  an immutable copy of each registered file

``registry.json``::

    {
      "format": "ztgate.registry/1",
      "models": {
        "<name>": {
          "<version>": {
            "sha256": "<hex digest of model.onnx>",
            "file": "models/<name>/<version>/model.onnx",
            "classification": "public" | "internal" | "confidential" | "restricted",
            "allowed_modes": ["none", "redundant", "zk", "mpc"],   (a non-empty subset)
            "inputs":  [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3],
                         "range": [0.0, 1.0]}]                  (range: optional, below)
          }
        }
      }
    }

Datatypes are KServe v2 names; ``-1`` marks a dynamic dimension. An output's ``range`` is
``[low, high]`` (``null`` for an unbounded side) of every value it may hold. A model that
allows mode ``mpc`` must have one on each output: declared at registration, or derived
from the op that produces it (Sigmoid, Softmax: [0, 1]; Relu: [0, null]). MPC answers are
held to it, since a party can shift its output share undetected otherwise. Versions are positive
integers without leading zeros (Triton's version directories), compared numerically.
A name/version is immutable once added: re-adding identical bytes is a no-op, different
bytes are refused, so a SHA-256 seen by a client always means the same model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data

from gateway.files import atomic_write, sha256_file

FORMAT = "ztgate.registry/1"
INDEX_FILE = "registry.json"
LOCK_FILE = "registry.lock"
MODEL_FILE = "model.onnx"

CLASSIFICATIONS: tuple[str, ...] = ("public", "internal", "confidential", "restricted")
MODES: tuple[str, ...] = ("none", "redundant", "zk", "mpc")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")

_ONNX_TO_KSERVE: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.STRING: "BYTES",
}
DATATYPES: frozenset[str] = frozenset(_ONNX_TO_KSERVE.values())


class RegistryError(Exception):
    """A model or registry that cannot be used as asked; the message says why."""


# (low, high) of an output's values; None on an unbounded side.
Range = tuple[float | None, float | None]
# What the op that produces an output bounds it to (the ONNX op types; mpc.model.OP_RANGES
# says the same of the MPC program, for indexes written before ranges were recorded).
DERIVED_RANGES: dict[str, Range] = {
    "Sigmoid": (0.0, 1.0),
    "Softmax": (0.0, 1.0),
    "Relu": (0.0, None),
}


def validate_range(raw: Any, where: str) -> Range:
    """A ``[low, high]`` pair of finite numbers or nulls, low < high, not both null."""
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise RegistryError(f"{where}: range must be [low, high], got {raw!r}")
    bounds: list[float | None] = []
    for b in raw:
        if b is None:
            bounds.append(None)
        elif isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b):
            bounds.append(float(b))
        else:
            raise RegistryError(f"{where}: range bounds are finite numbers or null, got {b!r}")
    low, high = bounds
    if low is None and high is None:
        raise RegistryError(f"{where}: a range needs at least one bound")
    if low is not None and high is not None and not low < high:
        raise RegistryError(f"{where}: range low {low} must be below high {high}")
    return low, high


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    value_range: Range | None = None  # outputs only: see the module docstring

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "datatype": self.datatype,
            "shape": list(self.shape),
        }
        if self.value_range is not None:
            out["range"] = list(self.value_range)
        return out

    @classmethod
    def from_json(cls, raw: Any) -> TensorSpec:
        if not isinstance(raw, dict):
            raise RegistryError(f"tensor spec must be an object, got {raw!r}")
        name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
        if not isinstance(name, str) or datatype not in DATATYPES or not isinstance(shape, list):
            raise RegistryError(f"malformed tensor spec {raw!r}")
        if not all(isinstance(d, int) and d >= -1 for d in shape):
            raise RegistryError(f"malformed shape in tensor spec {raw!r}")
        value_range = raw.get("range")
        if value_range is not None:
            value_range = validate_range(value_range, f"tensor {name}")
        return cls(name, str(datatype), tuple(shape), value_range)


@dataclass(frozen=True)
class GenerativeSpec:
    """What a generative entry's node model honours (gateway/llm/generative.py checks it)."""

    tokenizer_sha256: str
    vocab: int
    context_length: int
    end_tokens: tuple[int, ...]
    sampling: tuple[str, ...]  # the parameters the node honours
    max_tokens: int  # the most tokens one request may ask for

    def to_json(self) -> dict[str, Any]:
        return {
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab": self.vocab,
            "context_length": self.context_length,
            "end_tokens": list(self.end_tokens),
            "sampling": list(self.sampling),
            "max_tokens": self.max_tokens,
        }

    @classmethod
    def from_json(cls, raw: Any) -> GenerativeSpec:
        from gateway.llm.generative import spec_from_json

        return spec_from_json(raw)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    classification: str
    allowed_modes: tuple[str, ...]
    path: Path
    generative: GenerativeSpec | None = None  # set for the generative kind

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object, including its name, version and absolute path."""
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "classification": self.classification,
            "allowed_modes": list(self.allowed_modes),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "path": str(self.path),
        }
        if self.generative is not None:
            out["kind"] = "generative"
            out["generative"] = self.generative.to_json()
        return out


# --------------------------------------------------------------------------- validation


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise RegistryError(
            f"invalid model name {name!r}: use 1-64 of a-z 0-9 _ . - starting with a-z or 0-9"
        )
    return name


def validate_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise RegistryError(
            f"invalid version {version!r}: use a positive integer without leading zeros"
        )
    return version


def validate_classification(classification: str) -> str:
    if classification not in CLASSIFICATIONS:
        expected = ", ".join(CLASSIFICATIONS)
        raise RegistryError(
            f"invalid classification {classification!r}: expected one of {expected}"
        )
    return classification


def validate_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """Check modes are known and non-empty; return them de-duplicated in canonical order."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise RegistryError(f"invalid mode(s) {', '.join(unknown)}: expected {', '.join(MODES)}")
    if not modes:
        raise RegistryError("a model needs at least one allowed mode")
    return tuple(m for m in MODES if m in modes)


# --------------------------------------------------------------------------- ONNX


def _parse_onnx(data: bytes, origin: str) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    # protobuf's DecodeError has no typed import path; any parse failure means "not ONNX".
    except Exception as exc:
        raise RegistryError(f"{origin} is not an ONNX model: {exc}") from exc
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise RegistryError(f"{origin} is not a valid ONNX model: {exc}") from exc
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise RegistryError(f"{origin} keeps weights in external files; embed them first")
    return model


def _tensor_spec(value: onnx.ValueInfoProto, origin: str) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        raise RegistryError(f"{origin}: {value.name!r} is not a tensor")
    ttype = value.type.tensor_type
    datatype = _ONNX_TO_KSERVE.get(ttype.elem_type)
    if datatype is None:
        elem = TensorProto.DataType.Name(ttype.elem_type)
        raise RegistryError(f"{origin}: {value.name!r} has unsupported element type {elem}")
    if not ttype.HasField("shape"):
        raise RegistryError(f"{origin}: {value.name!r} has no declared rank")
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
    return TensorSpec(value.name, datatype, shape)


def _signature(
    model: onnx.ModelProto, origin: str
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    # Old exporters list initializers among the inputs; they are weights, not request tensors.
    weights = {t.name for t in model.graph.initializer}
    inputs = tuple(_tensor_spec(v, origin) for v in model.graph.input if v.name not in weights)
    outputs = tuple(_tensor_spec(v, origin) for v in model.graph.output)
    if not inputs or not outputs:
        raise RegistryError(f"{origin} has no inputs or no outputs")
    return inputs, outputs


def _ranged(
    model: onnx.ModelProto,
    outputs: tuple[TensorSpec, ...],
    declared: Mapping[str, Any],
    required: bool,
    origin: str,
) -> tuple[TensorSpec, ...]:
    """Outputs with their declared range, else the one their producing op implies.

    ``required`` (the model allows mpc): every output must end up with one.
    """
    unknown = sorted(set(declared) - {o.name for o in outputs})
    if unknown:
        raise RegistryError(f"{origin}: range declared for unknown output(s) {', '.join(unknown)}")
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    ranged = []
    for spec in outputs:
        value_range: Range | None
        if spec.name in declared:
            value_range = validate_range(declared[spec.name], f"{origin}: output {spec.name}")
        else:
            value_range = DERIVED_RANGES.get(producer.get(spec.name, ""))
        if value_range is None and required:
            op = producer.get(spec.name, "none")
            raise RegistryError(
                f"{origin}: mode mpc needs the value range of output {spec.name!r}, and its "
                f"producing op ({op}) does not bound it; declare one"
            )
        ranged.append(TensorSpec(spec.name, spec.datatype, spec.shape, value_range))
    return tuple(ranged)


def read_signature(onnx_path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of an ONNX file, with KServe datatypes and -1 for dynamic dims."""
    try:
        data = Path(onnx_path).read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read {onnx_path}: {exc.strerror or exc}") from exc
    return _signature(_parse_onnx(data, str(onnx_path)), str(onnx_path))


# --------------------------------------------------------------------------- files


# --------------------------------------------------------------------------- registry


class Registry:
    """A registry directory; every call re-reads the index, so several processes may share it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def open(cls, root: Path | str) -> Registry:
        """Open the registry at ``root``, creating an empty one if it does not exist."""
        registry = cls(Path(root))
        try:
            (registry.root / "models").mkdir(parents=True, exist_ok=True)
            if not registry.index_path.exists():
                with registry._locked():
                    if not registry.index_path.exists():
                        registry._write_index({})
        except OSError as exc:
            raise RegistryError(f"cannot create registry at {root}: {exc}") from exc
        registry._read_index()
        return registry

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    def add(
        self,
        onnx_path: Path | str,
        name: str,
        version: str = "1",
        classification: str = "internal",
        allowed_modes: Sequence[str] = ("none",),
        output_ranges: Mapping[str, Any] | None = None,
    ) -> ModelEntry:
        """Copy an ONNX file into the registry and index it; returns its entry.

        ``output_ranges`` declares output name -> [low, high]; a model allowing mpc needs
        one per output, declared or derived (see the module docstring).
        """
        validate_name(name)
        validate_version(version)
        validate_classification(classification)
        modes = validate_modes(allowed_modes)
        source = Path(onnx_path)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise RegistryError(f"cannot read {source}: {exc.strerror or exc}") from exc
        parsed = _parse_onnx(data, str(source))
        inputs, outputs = _signature(parsed, str(source))
        # Recorded for mpc models only: the check that uses them is mpc's.
        if "mpc" in modes or output_ranges:
            outputs = _ranged(parsed, outputs, output_ranges or {}, "mpc" in modes, str(source))
        digest = hashlib.sha256(data).hexdigest()
        relative = f"models/{name}/{version}/{MODEL_FILE}"
        record: dict[str, Any] = {
            "sha256": digest,
            "file": relative,
            "classification": classification,
            "allowed_modes": list(modes),
            "inputs": [t.to_json() for t in inputs],
            "outputs": [t.to_json() for t in outputs],
        }
        with self._locked():
            models = self._read_index()
            existing = models.get(name, {}).get(version)
            if existing is not None:
                return self._same_or_refuse(name, version, existing, record)
            target = self.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)  # 0600, as before
            models.setdefault(name, {})[version] = record
            self._write_index(models)
        return self._entry(name, version, record)

    def add_generative(
        self,
        onnx_path: Path | str,
        name: str,
        version: str = "1",
        classification: str = "internal",
        spec: GenerativeSpec | None = None,
    ) -> ModelEntry:
        """Register a generative model: an ONNX next-token model served token by token.

        The ONNX file maps ``input_ids`` to the next token's ``logits`` over the tokenizer's
        vocabulary (checked here); the entry's inputs and outputs are those of the streaming
        node model built from it. Only mode ``none`` applies (gateway/llm/generative.py)."""
        from gateway.llm import generative

        validate_name(name)
        validate_version(version)
        validate_classification(classification)
        source = Path(onnx_path)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise RegistryError(f"cannot read {source}: {exc.strerror or exc}") from exc
        parsed = _parse_onnx(data, str(source))
        spec = generative.check_model(_signature(parsed, str(source)), spec, str(source))
        relative = f"models/{name}/{version}/{MODEL_FILE}"
        record: dict[str, Any] = {
            "kind": "generative",
            "sha256": hashlib.sha256(data).hexdigest(),
            "file": relative,
            "classification": classification,
            "allowed_modes": list(generative.MODES),
            "inputs": [t.to_json() for t in generative.STREAM_INPUTS],
            "outputs": [t.to_json() for t in generative.STREAM_OUTPUTS],
            "generative": spec.to_json(),
        }
        with self._locked():
            models = self._read_index()
            existing = models.get(name, {}).get(version)
            if existing is not None:
                return self._same_or_refuse(name, version, existing, record)
            target = self.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
            models.setdefault(name, {})[version] = record
            self._write_index(models)
        return self._entry(name, version, record)

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry for ``name`` at ``version``, or its highest version when None."""
        versions = self._read_index().get(name)
        if not versions:
            raise RegistryError(f"no model named {name!r} in {self.root}")
        if version is None:
            version = max(versions, key=int)
        record = versions.get(version)
        if record is None:
            known = ", ".join(sorted(versions, key=int))
            raise RegistryError(f"model {name!r} has no version {version!r} (has {known})")
        return self._entry(name, version, record)

    def entries(self) -> list[ModelEntry]:
        """Every entry, sorted by name then numeric version."""
        models = self._read_index()
        return [
            self._entry(name, version, models[name][version])
            for name in sorted(models)
            for version in sorted(models[name], key=int)
        ]

    def verify(self) -> list[str]:
        """Re-hash every model file; one message per missing or altered file (empty: all good)."""
        problems: list[str] = []
        for entry in self.entries():
            label = f"{entry.name}/{entry.version}"
            try:
                actual = sha256_file(entry.path)
            except OSError as exc:
                problems.append(f"{label}: cannot read {entry.path}: {exc.strerror or exc}")
                continue
            if actual != entry.sha256:
                problems.append(f"{label}: sha256 is {actual}, registry says {entry.sha256}")
        return problems

    def allow_mode(self, name: str, version: str, mode: str) -> ModelEntry:
        """Add ``mode`` to an entry's allowed modes (`ztgate zk onboard` marks it zk-capable
        once its artefacts exist); the bytes and everything else stay as registered."""
        validate_modes([mode])
        with self._locked():
            models = self._read_index()
            record = models.get(name, {}).get(version)
            if record is None:
                raise RegistryError(f"no model {name!r} version {version!r} in the registry")
            if mode not in record["allowed_modes"]:
                record["allowed_modes"] = [*record["allowed_modes"], mode]
                self._write_index(models)
        return self._entry(name, version, record)

    # ------------------------------------------------------------------ internals

    def _same_or_refuse(
        self, name: str, version: str, existing: dict[str, Any], record: dict[str, Any]
    ) -> ModelEntry:
        if existing["sha256"] != record["sha256"]:
            raise RegistryError(
                f"{name} version {version} is already registered with different bytes "
                f"(sha256 {existing['sha256']}); register a new version instead"
            )
        for key in ("classification", "allowed_modes", "kind", "generative"):
            if existing.get(key) != record.get(key):
                raise RegistryError(
                    f"{name} version {version} is already registered with {key} "
                    f"{existing[key]!r}, not {record[key]!r}"
                )
        return self._entry(name, version, existing)

    def _entry(self, name: str, version: str, record: dict[str, Any]) -> ModelEntry:
        try:
            return ModelEntry(
                name=name,
                version=version,
                sha256=str(record["sha256"]),
                inputs=tuple(TensorSpec.from_json(t) for t in record["inputs"]),
                outputs=tuple(TensorSpec.from_json(t) for t in record["outputs"]),
                classification=validate_classification(str(record["classification"])),
                allowed_modes=validate_modes([str(m) for m in record["allowed_modes"]]),
                path=self.root / str(record["file"]),
                generative=(
                    GenerativeSpec.from_json(record["generative"])
                    if record.get("kind") == "generative"
                    else None
                ),
            )
        except (KeyError, TypeError) as exc:
            raise RegistryError(f"{self.index_path}: malformed entry {name}/{version}") from exc

    def _read_index(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise RegistryError(f"{self.root} is not a registry (no {INDEX_FILE})") from exc
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read {self.index_path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise RegistryError(f"{self.index_path} is not a {FORMAT} index")
        models = raw.get("models")
        if not isinstance(models, dict) or not all(
            isinstance(v, dict) and all(isinstance(r, dict) for r in v.values())
            for v in models.values()
        ):
            raise RegistryError(f"{self.index_path}: 'models' is malformed")
        return models

    def _write_index(self, models: dict[str, dict[str, dict[str, Any]]]) -> None:
        text = json.dumps({"format": FORMAT, "models": models}, indent=2, sort_keys=True)
        atomic_write(self.index_path, (text + "\n").encode("utf-8"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Serialises read-modify-write of the index across processes (os.replace alone would
        # let two concurrent adds each drop the other's entry).
        with (self.root / LOCK_FILE).open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- examples

# iris/mnist expose nothing personal, so any mode may serve them. risk scores applicants:
# MPC keeps the features hidden from nodes; redundant is kept as the fallback that still
# catches a lying node when the deployment's nodes are trusted with plaintext.
EXAMPLE_POLICY: dict[str, tuple[str, tuple[str, ...]]] = {
    "iris": ("public", ("none", "redundant", "zk")),
    "mnist": ("internal", ("none", "redundant", "zk")),
    "risk": ("restricted", ("redundant", "mpc")),
}


def seed_examples(registry: Registry) -> list[ModelEntry]:
    """Register the shipped example models as version 1 (a no-op when already there)."""
    from gateway.examples import ExampleError, shipped_examples

    try:
        shipped = shipped_examples()
    except (ExampleError, OSError, ValueError) as exc:
        raise RegistryError(f"shipped examples are unusable: {exc}") from exc
    added = []
    for name, path in shipped.items():
        classification, modes = EXAMPLE_POLICY[name]
        added.append(registry.add(path, name, "1", classification, modes))
    return added


def seed_generative_examples(registry: Registry) -> list[ModelEntry]:
    """Register the shipped generative example (tinygpt) as version 1."""
    from gateway.examples import ExampleError, shipped_generative

    try:
        shipped = shipped_generative()
    except (ExampleError, OSError, ValueError) as exc:
        raise RegistryError(f"shipped examples are unusable: {exc}") from exc
    return [registry.add_generative(path, name, "1", "public") for name, path in shipped.items()]
