"""`make wheelhouse`: everything an air-gapped install needs, in one directory.

    python deploy/wheelhouse.py --out wheelhouse [--srs FILE --srs-sha256 HEX] [--dev]

    wheelhouse/
      wheels/      the ztgate wheel and every wheel it needs with the node, mpc, zk and
                   train extras (torch is the pinned CPU wheel), crypten (installed
                   --no-deps, as the Makefile does); --dev adds the test tools
      models/      the example models and their registry records (gateway/examples)
      srs/         the pinned SRS (a public ceremony file), if --srs is given
      SHA256SUMS   every file above
      INSTALL.txt  how to install from it with no network

On the offline machine (nothing but this directory and python3.11)::

    python3.11 -m venv /opt/ztgate
    /opt/ztgate/bin/pip install --no-index --find-links wheelhouse/wheels 'ztgate[node]'
    /opt/ztgate/bin/pip install --no-index --find-links wheelhouse/wheels --no-deps crypten

tests/test_wheelhouse.py builds one and installs from it in a fresh venv.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "node,train,mpc,zk"  # the runtime extras `dev` pulls in
NO_DEPS = ("crypten==0.4.1",)  # its declared dependencies are broken (pyproject.toml)

INSTALL = """Offline install of ztgate {version} (made by `make wheelhouse`).

Check the files first:   (cd {name} && sha256sum -c SHA256SUMS)

    python3.11 -m venv /opt/ztgate
    /opt/ztgate/bin/pip install --no-index --find-links {name}/wheels 'ztgate[{extras}]'
    /opt/ztgate/bin/pip install --no-index --find-links {name}/wheels --no-deps crypten
    /opt/ztgate/bin/ztgate --version

A gateway needs only `ztgate`; a node `ztgate[node]` (and `[zk]`, `[mpc]` for those
modes). Example models: {name}/models (`ztgate model examples` registers the same ones).
{srs}"""


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "-q", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def build(out: Path, srs: Path | None, srs_sha256: str | None, dev: bool) -> None:
    if (srs is None) != (srs_sha256 is None):
        raise SystemExit("wheelhouse: --srs and --srs-sha256 go together")
    if srs is not None and srs_sha256 is not None and (got := sha256(srs)) != srs_sha256.lower():
        # Before minutes of downloading: a file that is not the pinned one never ships.
        raise SystemExit(f"wheelhouse: {srs} has SHA-256 {got}, not the pinned {srs_sha256}")
    wheels, models = out / "wheels", out / "models"
    wheels.mkdir(parents=True, exist_ok=True)
    extras = EXTRAS + (",dev" if dev else "")
    # `pip wheel` takes wheels as they are and builds any sdist into one, so the
    # offline side never compiles or needs build tools.
    pip("wheel", "--wheel-dir", str(wheels), f".[{extras}]")
    pip("wheel", "--wheel-dir", str(wheels), "--no-deps", *NO_DEPS)
    models.mkdir(exist_ok=True)
    for f in sorted((ROOT / "gateway" / "examples").iterdir()):
        if f.suffix in (".onnx", ".json"):
            shutil.copy2(f, models / f.name)
    srs_note = "No SRS: production zk onboarding needs a ceremony SRS (--srs at build).\n"
    if srs is not None and srs_sha256 is not None:
        got = srs_sha256.lower()
        (out / "srs").mkdir(exist_ok=True)
        shutil.copy2(srs, out / "srs" / srs.name)
        srs_note = (
            f"SRS: {out.name}/srs/{srs.name}, SHA-256 {got}: onboard with\n"
            f"  ztgate zk onboard ... --mode production --srs {out.name}/srs/{srs.name} "
            f'--srs-sha256 {got}\nand pin it in the gateway: [zk] srs_sha256 = ["{got}"]\n'
        )
    version = next(p.name.split("-")[1] for p in wheels.glob("ztgate-*.whl"))
    (out / "INSTALL.txt").write_text(
        INSTALL.format(version=version, name=out.name, extras="node", srs=srs_note)
    )
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    (out / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.relative_to(out)}\n" for p in files))
    size = sum(p.stat().st_size for p in files) >> 20
    print(f"wheelhouse: {out} ({len(list(wheels.glob('*.whl')))} wheels, {size} MiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "wheelhouse", help="(default: %(default)s)"
    )
    parser.add_argument("--srs", type=Path, default=None, help="the ceremony SRS to ship")
    parser.add_argument("--srs-sha256", default=None, help="its pinned SHA-256")
    parser.add_argument("--dev", action="store_true", help="also the test tools (pytest, ...)")
    args = parser.parse_args(argv)
    build(args.out.resolve(), args.srs, args.srs_sha256, args.dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
