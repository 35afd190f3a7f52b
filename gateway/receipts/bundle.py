"""Audit bundles: everything an auditor needs to verify receipts offline, in one place.

Layout (a directory, or the same inside a ``.tar``), format ``ztgate-audit-bundle/v2``::

    manifest.json                                   index of what is below
    keys/receipt-keys.json                          published receipt key set (windows)
    keys/log-keys.json                              each log's origin and checkpoint vkey
    keys/witness-keys.json                          witnesses that cosigned, with vkeys
    logs/<log id>/checkpoints/<size>.checkpoint     signed checkpoints with cosignatures
    logs/<log id>/consistency/<a>-<b>.proof         RFC 9162 proofs between them (base64 lines)
    logs/<log id>/receipts/<receipt id>.json        the signed receipt (canonical JSON)
    logs/<log id>/receipts/<receipt id>.tlog-proof  C2SP tlog-proof: inclusion + checkpoint
    logs/<log id>/leaves                            the inventory: every leaf's exact bytes,
                                                    one a line, from the range start to the
                                                    head checkpoint's size
    logs/<log id>/leaves.left                       RFC 9162 subtree hashes left of the range
    logs/<log id>/records/<index>.json              what a log_start / erasure leaf hashes

The keys in a bundle are for reading only: `ztgate verify` takes keys from the auditor's
trust file and nowhere else, so a bundle re-signed end to end with other keys fails.

Why the inventory: a manifest is written by whoever exports, so it cannot show that
nothing was left out. The leaves can: with the left hashes they must reproduce the head
checkpoint's signed root, and every receipt leaf of the range must then be matched by a
receipt file or by a logged erasure.

Which checkpoints: each receipt's earliest including one (its time judges the receipt
key's validity window), the latest one cosigned by each witness and by at least k
witnesses for each k (what a witness policy needs), and the head; consecutive ones are
linked by consistency proofs, so a truncated, reordered or forked history between them
cannot verify. Each receipt's tlog-proof is against the most-cosigned (then latest)
checkpoint covering it, so a receipt taken out of the bundle still verifies alone.

v1 bundles (no inventory, no chain records) are still read; the verifier says that their
completeness was not checked.

Reading a bundle (here) needs nothing of the gateway: the offline verifier imports this
module, never the log writer. Writing one is `gateway.receipts.export`.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BUNDLE_FORMAT", "BUNDLE_V1", "MAX_MEMBER", "BundleError", "BundleReader"]

BUNDLE_FORMAT = "ztgate-audit-bundle/v2"
BUNDLE_V1 = "ztgate-audit-bundle/v1"
MAX_MEMBER = 256 << 20


class BundleError(Exception):
    """Not a bundle, or one that cannot be read at all (a usage error, exit 2)."""


class BundleReader:
    """Read-only access to a bundle directory or ``.tar`` (no extraction to disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, bytes] = {}
        if path.is_dir():
            for p in path.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    self._files[p.relative_to(path).as_posix()] = p.read_bytes()
        elif path.is_file() and tarfile.is_tarfile(path):
            try:
                with tarfile.open(path, "r") as tar:
                    for m in tar.getmembers():
                        if not m.isfile() or m.size > MAX_MEMBER:
                            continue
                        f = tar.extractfile(m)
                        if f is not None:
                            self._files[m.name.lstrip("./")] = f.read()
            except (tarfile.TarError, OSError) as exc:
                raise BundleError(f"{path}: unreadable tar: {exc}") from None
        else:
            raise BundleError(f"{path} is not a bundle directory or .tar")
        raw = self._files.get("manifest.json")
        if raw is None:
            raise BundleError(f"{path}: no manifest.json; not an audit bundle")
        try:
            self.manifest = json.loads(raw)
        except ValueError as exc:
            raise BundleError(f"{path}: manifest.json is not JSON: {exc}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") not in (
            BUNDLE_FORMAT,
            BUNDLE_V1,
        ):
            raise BundleError(f"{path}: not a {BUNDLE_FORMAT} (or v1) bundle")
        if not isinstance(self.manifest.get("logs"), list):
            raise BundleError(f"{path}: manifest has no list of logs")

    @property
    def version(self) -> int:
        return 1 if self.manifest["format"] == BUNDLE_V1 else 2

    def read(self, name: str) -> bytes | None:
        return self._files.get(name)

    def names(self, prefix: str = "") -> Iterator[str]:
        return (n for n in sorted(self._files) if n.startswith(prefix))
