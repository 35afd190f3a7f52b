"""Node side: compute the answer and prove it, in one step.

``Prover`` is built once per Triton model instance (``zk/triton_model.py.tmpl``); each call
runs ezkl's witness generation (the forward pass in the circuit) and ``prove``. The answer
returned is the one in the proof's public instances, so what the node says is what it
proved.

ezkl's Python API takes the proving key as a path and loads it on every ``prove``; there is
no handle to keep it in memory between requests (23.0.5). The key stays in the page cache
after the first call, so the per-call cost is deserialisation, not disk (measured in
bench/zk.py and docs/zk.md).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zk.record import (
    CIRCUIT_FILE,
    PK_FILE,
    RECORD_FILE,
    SETTINGS_FILE,
    ZkError,
    ZkRecord,
    check_settings,
    load_record,
    sha256_file,
)


class Prover:
    """Proves inferences for one onboarded model; the artefacts are hash-checked once."""

    def __init__(self, artefacts: Path | str, workdir: Path | str | None = None) -> None:
        """``artefacts`` holds zk.json and the node set (circuit, pk, settings, SRS).

        Either the onboarding output's ``node/`` directory with ``zk.json`` one level up,
        or a flat directory with all of them (what zk/repository.py lays out).
        """
        root = Path(artefacts).absolute()
        record_path = root / RECORD_FILE
        if not record_path.is_file():
            record_path = root.parent / RECORD_FILE
        self.record: ZkRecord = load_record(record_path)
        self.dir = root
        self.circuit = root / CIRCUIT_FILE
        self.pk = root / PK_FILE
        self.settings = root / SETTINGS_FILE
        self.srs = root / self.record.srs_file
        for label, path, want in (
            ("circuit", self.circuit, self.record.circuit_sha256),
            ("proving key", self.pk, self.record.pk_sha256),
            ("settings", self.settings, self.record.settings_sha256),
            ("srs", self.srs, self.record.srs_sha256),
        ):
            got = sha256_file(path)
            if got != want:
                raise ZkError(f"{label} {path} has sha256 {got}, zk.json says {want}")
        check_settings(json.loads(self.settings.read_text(encoding="utf-8")), str(self.settings))
        self.workdir = Path(workdir) if workdir is not None else root / ".work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        # ezkl keeps a cache under EZKL_REPO_PATH (default ~/.ezkl): keep it with the model.
        os.environ.setdefault("EZKL_REPO_PATH", str(self.workdir / "ezkl"))
        import ezkl

        self._ezkl: Any = ezkl
        self._lock = threading.Lock()  # ezkl's prover already uses every core

    def prove(self, x: npt.NDArray[Any]) -> tuple[list[npt.NDArray[np.float32]], bytes]:
        """(outputs dequantised from the proof's instances, the proof as JSON bytes)."""
        spec = self.record.inputs[0]
        arr = np.asarray(x, dtype=np.float32)
        if arr.size != spec.size:
            raise ZkError(f"zk circuit takes exactly {spec.shape} (one row), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ZkError("input holds NaN or Inf")
        ezkl = self._ezkl
        with self._lock, tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            work = Path(tmp)
            data, witness, proof_path = work / "input.json", work / "witness.json", work / "p"
            data.write_text(json.dumps({"input_data": [arr.reshape(-1).tolist()]}), "utf-8")
            ezkl.gen_witness(str(data), str(self.circuit), str(witness), None, str(self.srs))
            proof = ezkl.prove(
                str(witness), str(self.circuit), str(self.pk), str(proof_path), str(self.srs)
            )
            raw = proof_path.read_bytes()
        return self.outputs_from_instances(proof["instances"]), raw

    def outputs_from_instances(self, instances: Any) -> list[npt.NDArray[np.float32]]:
        from zk.verifier import dequantise_outputs

        return dequantise_outputs(self._ezkl, list(instances[0]), self.record)
