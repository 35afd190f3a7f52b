"""Add a ``<name>-zk`` model to a Triton repository built by gateway/node/repository.py.

Layout::

    <repo>/<name>-zk/config.pbtxt       inputs as the base model; its outputs plus
                                        ``proof`` BYTES [1]; one CPU instance
    <repo>/<name>-zk/<version>/model.py      zk/triton_model.py.tmpl
    <repo>/<name>-zk/<version>/zk.json       the record
    <repo>/<name>-zk/<version>/network.ezkl, pk.key, settings.json, <srs>

Every artefact is checked against zk.json before it is placed (hard-linked when on the same
filesystem: the proving key is hundreds of MB). ``build_repository`` replaces the whole
tree, so call this again after every rebuild.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from gateway.node.repository import render_config
from gateway.registry import ModelEntry, TensorSpec
from zk.record import (
    CIRCUIT_FILE,
    NODE_DIR,
    PK_FILE,
    RECORD_FILE,
    SETTINGS_FILE,
    ZkError,
    ZkRecord,
    load_record,
    sha256_file,
)

TEMPLATE = Path(__file__).resolve().parent / "triton_model.py.tmpl"
PROOF_OUTPUT = TensorSpec("proof", "BYTES", (1,))


def zk_entry(entry: ModelEntry, record: ZkRecord) -> ModelEntry:
    """The registry entry as the ``<name>-zk`` model: same inputs, outputs plus ``proof``."""
    return dataclasses.replace(
        entry, name=record.zk_model_name, outputs=(*entry.outputs, PROOF_OUTPUT)
    )


def _entry_for(record: ZkRecord, artefacts: Path) -> ModelEntry:
    """A signature-only entry for the config, from the record (dynamic batch kept as -1)."""

    def spec(name: str, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec(name, "FP32", (-1, *shape[1:]))

    return ModelEntry(
        name=record.name,
        version=record.version,
        sha256=record.model_sha256,
        inputs=tuple(spec(t.name, t.shape) for t in record.inputs),
        outputs=tuple(spec(t.name, t.shape) for t in record.outputs),
        classification="internal",
        allowed_modes=("zk",),
        path=artefacts,
    )


def _place(source: Path, target: Path, want: str) -> None:
    got = sha256_file(source)
    if got != want:
        raise ZkError(f"{source} has sha256 {got}, zk.json says {want}; refusing to serve it")
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def add_zk_model(
    repo_dir: Path | str, name: str, artefacts_dir: Path | str, entry: ModelEntry | None = None
) -> Path:
    """Write ``<repo>/<name>-zk``; returns its directory. ``entry`` (the registry entry)
    gives the exact tensor specs; without it they come from zk.json."""
    repo, artefacts = Path(repo_dir).absolute(), Path(artefacts_dir).absolute()
    record = load_record(artefacts / RECORD_FILE)
    if record.name != name:
        raise ZkError(f"{artefacts} was onboarded as {record.name!r}, not {name!r}")
    if entry is not None and entry.sha256 != record.model_sha256:
        raise ZkError(f"registry's {name} v{entry.version} is not the model zk.json names")
    if not repo.is_dir():
        raise ZkError(f"{repo} is not a Triton repository directory")
    base = entry or _entry_for(record, artefacts)
    model_dir = repo / record.zk_model_name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version_dir = model_dir / record.version
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        render_config(zk_entry(base, record), "python"), encoding="utf-8"
    )
    node = artefacts / NODE_DIR
    for filename, want in (
        (CIRCUIT_FILE, record.circuit_sha256),
        (PK_FILE, record.pk_sha256),
        (SETTINGS_FILE, record.settings_sha256),
        (record.srs_file, record.srs_sha256),
    ):
        _place(node / filename, version_dir / filename, want)
    shutil.copyfile(artefacts / RECORD_FILE, version_dir / RECORD_FILE)
    shutil.copyfile(TEMPLATE, version_dir / "model.py")
    return model_dir


# --------------------------------------------------------------------------- onboarded models
# `ztgate zk onboard MODEL` writes a registered model's artefacts beside the registry, at
# <registry>/zk/<name>/<version>/. That directory, holding a zk.json for exactly the entry's
# bytes, is what makes the entry zk-capable: nodes built from the registry serve its prover,
# and the gateway loads its verifier set, with no list kept by hand anywhere.
ZK_DIR = "zk"


def onboarded_dir(registry_root: Path | str, name: str, version: str) -> Path:
    return Path(registry_root).absolute() / ZK_DIR / name / version


def onboarded(
    registry_root: Path | str, entries: Iterable[ModelEntry]
) -> list[tuple[ModelEntry, Path]]:
    """The entries with artefacts onboarded for exactly their bytes (others are skipped:
    a record for an older version of the file serves nothing)."""
    found = []
    for entry in entries:
        d = onboarded_dir(registry_root, entry.name, entry.version)
        if not (d / RECORD_FILE).is_file():
            continue
        try:
            record = load_record(d / RECORD_FILE)
        except ZkError:
            continue
        if record.model_sha256 == entry.sha256 and record.name == entry.name:
            found.append((entry, d))
    return found


def add_onboarded(
    repo_dir: Path | str, registry_root: Path | str, entries: Iterable[ModelEntry]
) -> list[Path]:
    """Serve ``<name>-zk`` beside every served entry that has onboarded artefacts."""
    return [add_zk_model(repo_dir, e.name, d, e) for e, d in onboarded(registry_root, entries)]
