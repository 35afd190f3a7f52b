"""The zk registry record (``zk.json``) and the artefact layout every side agrees on.

An onboarded model is a directory::

    <dir>/zk.json                   the record below; what the gateway trusts
    <dir>/node/network.ezkl         compiled circuit      } the prover's set: copied into the
    <dir>/node/pk.key               proving key           } node's Triton repository by
    <dir>/node/settings.json        circuit settings      } zk/repository.py
    <dir>/node/kzg.srs              SRS (same bytes)      }  dev_unsafe_kzg.srs in dev mode
    <dir>/verifier/vk.key           verifying key         } the gateway's and the auditor's set
    <dir>/verifier/settings.json    circuit settings
    <dir>/verifier/kzg.srs          SRS

``zk.json`` (format ``ztgate.zk/1``) names the registered model by its SHA-256 and pins every
artefact by its own SHA-256, with the settings that decide soundness spelled out so an
operator or auditor can read them without ezkl: ``check_mode`` (must be ``SAFE``),
``visibility`` (inputs public, outputs public, params fixed), ``logrows``, the scales, and
``dev_srs`` (true when the SRS was generated locally and its toxic waste may be known).

A record that breaks any of those rules is refused on load, so nothing can serve or verify
under it: :func:`load_record` is the one gate every side passes through.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.files import sha256_file as sha256_file  # zk's callers import it from here

FORMAT = "ztgate.zk/1"
RECORD_FILE = "zk.json"
CIRCUIT_FILE = "network.ezkl"
PK_FILE = "pk.key"
VK_FILE = "vk.key"
SETTINGS_FILE = "settings.json"
SRS_FILE = "kzg.srs"
DEV_SRS_FILE = "dev_unsafe_kzg.srs"  # generated locally: its toxic waste may be known
NODE_DIR = "node"
VERIFIER_DIR = "verifier"

# What this gateway accepts. Anything else is refused at onboarding, on load, and per proof.
REQUIRED_CHECK_MODE = "SAFE"
REQUIRED_VISIBILITY: dict[str, str] = {"input": "public", "output": "public", "params": "fixed"}
POSTPROCESS = frozenset({"softmax"})  # what the gateway may apply to proven outputs


class ZkError(Exception):
    """A zk record, artefact or setting that must not be used; the message says why."""


@dataclass(frozen=True)
class ZkTensor:
    name: str
    shape: tuple[int, ...]  # the circuit's fixed shape, batch included
    scale: int  # fixed-point scale: value = felt / 2**scale

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "scale": self.scale}

    @classmethod
    def from_json(cls, raw: Any) -> ZkTensor:
        try:
            shape = tuple(int(d) for d in raw["shape"])
            tensor = cls(str(raw["name"]), shape, int(raw["scale"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ZkError(f"malformed tensor in zk record: {raw!r}") from exc
        if not shape or any(d <= 0 for d in shape):
            raise ZkError(f"zk tensor {tensor.name!r} needs a fixed positive shape, got {shape}")
        return tensor


@dataclass(frozen=True)
class ZkRecord:
    """``zk.json``: what a proof for this model must be bound to."""

    name: str
    version: str
    model_sha256: str
    settings_sha256: str
    vk_sha256: str
    srs_sha256: str
    pk_sha256: str
    circuit_sha256: str
    logrows: int
    inputs: tuple[ZkTensor, ...]
    outputs: tuple[ZkTensor, ...]
    visibility: dict[str, str]
    check_mode: str
    dev_srs: bool
    ezkl_version: str
    quantisation: dict[str, Any]
    # Output name -> function the gateway applies to the proven values ("softmax": the
    # circuit proves the logits, see zk/tuning.py). Part of the receipt's evidence.
    postprocess: dict[str, str] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)  # what the search tried and why

    @property
    def zk_model_name(self) -> str:
        """The Triton model name the node serves proofs under."""
        return f"{self.name}-zk"

    @property
    def srs_file(self) -> str:
        return DEV_SRS_FILE if self.dev_srs else SRS_FILE

    @property
    def instance_count(self) -> int:
        return sum(t.size for t in self.inputs) + sum(t.size for t in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "model_sha256": self.model_sha256,
            "settings_sha256": self.settings_sha256,
            "vk_sha256": self.vk_sha256,
            "srs_sha256": self.srs_sha256,
            "pk_sha256": self.pk_sha256,
            "circuit_sha256": self.circuit_sha256,
            "logrows": self.logrows,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "visibility": dict(self.visibility),
            "check_mode": self.check_mode,
            "dev_srs": self.dev_srs,
            "ezkl_version": self.ezkl_version,
            "quantisation": dict(self.quantisation),
            "postprocess": dict(self.postprocess),
            "tuning": dict(self.tuning),
        }

    def evidence(self) -> dict[str, Any]:
        """The record's part of every zk Outcome's evidence."""
        return {
            "model_sha256": self.model_sha256,
            "vk_sha256": self.vk_sha256,
            "settings_sha256": self.settings_sha256,
            "srs_sha256": self.srs_sha256,
            "logrows": self.logrows,
            "dev_srs": self.dev_srs,
            # What the gateway applied to the proven outputs, in the receipt so an auditor
            # recomputes the same answer (zk/offline.py compares it with zk.json).
            **({"postprocess": self.postprocess_terms()} if self.postprocess else {}),
        }

    def postprocess_terms(self) -> list[str]:
        return [f"{name}={fn}" for name, fn in sorted(self.postprocess.items())]

    @classmethod
    def from_json(cls, raw: Any) -> ZkRecord:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ZkError(f"not a {FORMAT} record")
        try:
            record = cls(
                name=str(raw["name"]),
                version=str(raw["version"]),
                model_sha256=str(raw["model_sha256"]),
                settings_sha256=str(raw["settings_sha256"]),
                vk_sha256=str(raw["vk_sha256"]),
                srs_sha256=str(raw["srs_sha256"]),
                pk_sha256=str(raw["pk_sha256"]),
                circuit_sha256=str(raw["circuit_sha256"]),
                logrows=int(raw["logrows"]),
                inputs=tuple(ZkTensor.from_json(t) for t in raw["inputs"]),
                outputs=tuple(ZkTensor.from_json(t) for t in raw["outputs"]),
                visibility={str(k): str(v) for k, v in dict(raw["visibility"]).items()},
                check_mode=str(raw["check_mode"]),
                dev_srs=bool(raw["dev_srs"]),
                ezkl_version=str(raw["ezkl_version"]),
                quantisation=dict(raw.get("quantisation", {})),
                postprocess={str(k): str(v) for k, v in dict(raw.get("postprocess", {})).items()},
                tuning=dict(raw.get("tuning", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ZkError(f"malformed zk record: {exc}") from exc
        check_policy(record.check_mode, record.visibility, where="zk record")
        if not record.inputs or not record.outputs:
            raise ZkError("zk record has no inputs or no outputs")
        names = {t.name for t in record.outputs}
        for output, function in record.postprocess.items():
            if output not in names or function not in POSTPROCESS:
                raise ZkError(f"zk record: unknown postprocess {output!r}: {function!r}")
        return record


def check_policy(check_mode: str, visibility: dict[str, str], where: str) -> None:
    """Refuse the settings that would let a proof stop binding input, output or weights."""
    if str(check_mode).upper() != REQUIRED_CHECK_MODE:
        raise ZkError(
            f"{where}: check_mode is {check_mode!r}; only SAFE is accepted (UNSAFE skips "
            "the circuit's own range checks, so a proof no longer shows the model's answer)"
        )
    for key, want in REQUIRED_VISIBILITY.items():
        got = str(visibility.get(key, "")).lower()
        if got == want:
            continue
        if key == "params" and got == "private":
            raise ZkError(
                f"{where}: params visibility is 'private': a proof made with other weights "
                "verifies under the same vk, so the model is not bound; use 'fixed'"
            )
        raise ZkError(f"{where}: {key} visibility is {got!r}; this gateway requires {want!r}")


def check_settings(settings: dict[str, Any], where: str) -> None:
    """The same policy, read from ezkl's own settings.json (the file that is verified under)."""
    run_args = settings.get("run_args")
    if not isinstance(run_args, dict):
        raise ZkError(f"{where}: no run_args in settings")
    visibility = {
        "input": str(run_args.get("input_visibility", "")),
        "output": str(run_args.get("output_visibility", "")),
        "params": str(run_args.get("param_visibility", "")),
    }
    check_policy(str(settings.get("check_mode", run_args.get("check_mode", ""))), visibility, where)
    if str(run_args.get("check_mode", "")).upper() != REQUIRED_CHECK_MODE:
        raise ZkError(f"{where}: run_args.check_mode is {run_args.get('check_mode')!r}")
    if run_args.get("ignore_range_check_inputs_outputs"):
        raise ZkError(f"{where}: ignore_range_check_inputs_outputs is set; refusing")


def _remove_sealed(base: Path) -> None:
    with contextlib.suppress(OSError):
        os.chmod(base, 0o700)
        shutil.rmtree(base, ignore_errors=True)


def load_record(path: Path) -> ZkRecord:
    """Read and check ``zk.json`` (a directory holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ZkError(f"cannot read zk record {path}: {exc}") from exc
    return ZkRecord.from_json(raw)


@dataclass(frozen=True)
class VerifierArtefacts:
    """The verifier's files for one record, each checked against the record's hash."""

    record: ZkRecord
    vk: Path
    settings: Path
    srs: Path
    record_file: Path | None = None  # the zk.json these were loaded with
    # A private read-only copy hashed once when made (`seal`): verify_proof need not re-hash.
    sealed: bool = False
    record_sha256: str = ""

    @classmethod
    def from_dir(cls, artefacts_dir: Path, record: ZkRecord | None = None) -> VerifierArtefacts:
        """``artefacts_dir`` is the onboarding output (``zk.json`` + ``verifier/``)."""
        root = Path(artefacts_dir)
        record = record or load_record(root / RECORD_FILE)
        d = root / VERIFIER_DIR
        found = cls(record, d / VK_FILE, d / SETTINGS_FILE, d / record.srs_file, root / RECORD_FILE)
        found.check()
        return found

    def seal(self, into: Path | None = None) -> VerifierArtefacts:
        """Copy zk.json, vk, settings and SRS into a fresh private directory (0500, files
        0400), hash the copies once against the record, and return artefacts naming only
        the copy: what was checked is what ezkl reads, whatever happens to the originals
        later (no time-of-check/time-of-use gap), and no answer hashes megabytes again."""
        if self.record_file is None:
            raise ZkError("artefacts without their zk.json cannot be sealed")
        if into is not None:
            Path(into).mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="ztgate-zk-", dir=into))  # 0700, ours alone
        copies = {}
        for source in (self.record_file, self.vk, self.settings, self.srs):
            target = base / (RECORD_FILE if source == self.record_file else source.name)
            try:
                shutil.copyfile(source, target)
            except OSError as exc:
                raise ZkError(f"cannot copy {source}: {exc.strerror or exc}") from exc
            os.chmod(target, 0o400)
            copies[source] = target
        record_file = copies[self.record_file]
        if load_record(record_file) != self.record:
            raise ZkError(f"{self.record_file} changed while it was being sealed")
        sealed = dataclasses.replace(
            self,
            vk=copies[self.vk],
            settings=copies[self.settings],
            srs=copies[self.srs],
            record_file=record_file,
            sealed=True,
            record_sha256=sha256_file(record_file),
        )
        sealed.check()
        os.chmod(base, 0o500)
        atexit.register(_remove_sealed, base)  # this process's copy; no other process's
        return sealed

    def material(self) -> dict[str, tuple[str, str]]:
        """What an auditor needs beside a proof: name -> (path, sha256), hashes known."""
        if self.record_file is None:
            return {}
        return {
            RECORD_FILE: (
                str(self.record_file),
                self.record_sha256 or sha256_file(self.record_file),
            ),
            "vk": (str(self.vk), self.record.vk_sha256),
            SETTINGS_FILE: (str(self.settings), self.record.settings_sha256),
            "srs": (str(self.srs), self.record.srs_sha256),
        }

    def check(self) -> None:
        for label, path, want in (
            ("vk", self.vk, self.record.vk_sha256),
            ("settings", self.settings, self.record.settings_sha256),
            ("srs", self.srs, self.record.srs_sha256),
        ):
            try:
                got = sha256_file(path)
            except OSError as exc:
                raise ZkError(f"cannot read {label} {path}: {exc.strerror or exc}") from exc
            if got != want:
                raise ZkError(f"{label} {path} has sha256 {got}, the zk record says {want}")
        try:
            settings = json.loads(self.settings.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ZkError(f"cannot read settings {self.settings}: {exc}") from exc
        check_settings(settings, str(self.settings))
