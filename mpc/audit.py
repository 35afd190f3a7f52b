"""Does a node's view of a session contain what it must never learn? (tests and audits)

A node's *view* is every frame it received (``received.bin`` from ``--record``), the
values it legitimately opened with the other parties (``opened.bin``: Beaver-masked
differences), and any masks it knows because it generated them (only a node that wrongly
hosts the dealer, or is CrypTen's TFP "party 0", knows those). `find_leaks` reports:

- ``plaintext``: a secret value appears in the received bytes as float32 or float64 (a run
  of consecutive elements holding at least `MIN_SIGNIFICANT` nonzero bytes, so that chance
  cannot match it: see `_float_runs`), anywhere in the stream at any alignment; or as
  CrypTen fixed point int64 (``round(v * 2**16)`` and
  CrypTen's own truncating ``int(v * 2**16)``, each +-1) as any int64 element of any
  received tensor, and, where the word is large enough not to occur in frame headers
  (``|w| >= 2**32``), anywhere in the stream;
- ``share``: the node received a word of another party's share of a secret (with two
  parties that *is* the secret, given its own share);
- ``unmasked``: an opened value plus a mask the node knows equals a secret's encoding
  (``x = (x - a) + a``: how the dealer, or TFP's party 0, would read every input).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mpc.model import SCALE
from mpc.wire import KIND_TENSOR, decode_tensor, split_frames

Int64Array = npt.NDArray[np.int64]


@dataclass
class Secrets:
    """What no node may learn, as the gateway knows it."""

    plain: list[npt.NDArray[np.float64]] = field(default_factory=list)  # real values
    encoded: list[Int64Array] = field(default_factory=list)  # exact ring words
    shares: dict[int, list[Int64Array]] = field(default_factory=dict)  # rank -> its shares

    def add(
        self,
        plain: npt.NDArray[np.float64] | None,
        encoded: Int64Array,
        shares: Sequence[Int64Array],
    ) -> None:
        if plain is not None:
            self.plain.append(np.asarray(plain, dtype=np.float64))
        self.encoded.append(np.asarray(encoded, dtype=np.int64))
        for rank, s in enumerate(shares):
            self.shares.setdefault(rank, []).append(np.asarray(s, dtype=np.int64))

    def others_shares(self, rank: int) -> Int64Array:
        parts = [s.ravel() for r, ss in self.shares.items() if r != rank for s in ss]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def all_encoded(self) -> Int64Array:
        words = [e.ravel() for e in self.encoded]
        for p in self.plain:
            v = p.ravel()
            words += [np.rint(v * SCALE).astype(np.int64), (v * SCALE).astype(np.int64)]
        return np.unique(np.concatenate(words)) if words else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class View:
    received: bytes
    opened: Int64Array
    masks: Int64Array

    @classmethod
    def load(cls, party_dir: Path, masks_file: Path | None = None) -> View:
        rec = party_dir / "received.bin"
        opened = party_dir / "opened.bin"
        return cls(
            received=rec.read_bytes() if rec.exists() else b"",
            opened=_words(opened.read_bytes() if opened.exists() else b""),
            masks=_words(masks_file.read_bytes() if masks_file and masks_file.exists() else b""),
        )

    def received_words(self) -> Int64Array:
        """Every int64 element of every tensor frame received."""
        parts = [
            decode_tensor(f.payload).ravel()
            for f in split_frames(self.received)
            if f.kind == KIND_TENSOR
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _words(raw: bytes) -> Int64Array:
    return np.frombuffer(raw[: len(raw) - len(raw) % 8], dtype="<i8").astype(np.int64)


# Nonzero bytes a float pattern must hold. The stream is searched at every offset and is
# full of zero bytes (headers, small integers), so a pattern's zero bytes match almost for
# free and only its nonzero bytes count against chance: with 8 of them, ~1e4 patterns over
# ~1e6 offsets match by chance with probability ~1e10 * 2**-64. Values of float32 origin
# (weights) and fixed-point ones (k / 2**16: inputs, outputs) have many zero low bytes: one
# float64 of 0.5 is 00 00 00 00 00 00 e0 3f, two nonzero bytes, which random bytes matched
# 1 run in ~9 (issue 13, item 7).
MIN_SIGNIFICANT = 8


def _float_runs(values: npt.NDArray[Any], kind: str) -> Iterable[tuple[str, bytes]]:
    """From each nonzero element on, the shortest run of consecutive elements (as a leak
    would serialise them) with `MIN_SIGNIFICANT` nonzero bytes: always two float32 or more
    (one has at most four). A tail that never gets there is skipped: chance could match it."""
    raw = values.tobytes()
    size = values.itemsize
    nonzero = [sum(1 for b in raw[i : i + size] if b) for i in range(0, len(raw), size)]
    for i, count in enumerate(nonzero):
        if count == 0:
            continue  # the run that starts at the next value covers this one
        j, total = i + 1, count
        while total < MIN_SIGNIFICANT and j < len(nonzero):
            total += nonzero[j]
            j += 1
        if total >= MIN_SIGNIFICANT:
            yield kind, raw[i * size : j * size]


def _patterns(secrets: Secrets) -> Iterable[tuple[str, bytes]]:
    for p in secrets.plain:
        v = p.ravel()
        yield from _float_runs(v.astype("<f4"), "float32")
        yield from _float_runs(v.astype("<f8"), "float64")
    for w in secrets.all_encoded():
        if abs(int(w)) < 1 << 32:  # small words occur in headers (shapes, lengths)
            continue
        for d in (-1, 0, 1):
            yield "fixed-point", np.array([w + d], dtype="<i8").tobytes()


def _fixed_point_words(secrets: Secrets) -> Int64Array:
    enc = secrets.all_encoded()
    enc = enc[np.abs(enc) > 2]  # 0 and +-1 are ordinary protocol values
    out: Int64Array = np.unique(np.concatenate([enc - 1, enc, enc + 1]))
    return out


def find_leaks(rank: int, view: View, secrets: Secrets) -> list[str]:
    leaks: list[str] = []
    for kind, pat in _patterns(secrets):
        at = view.received.find(pat)
        if at >= 0:
            leaks.append(f"plaintext: a secret value in {kind} at byte {at}")
            break
    words = view.received_words()
    if not leaks:
        n = int(np.isin(_fixed_point_words(secrets), words).sum())
        if n:
            leaks.append(f"plaintext: {n} secret values as fixed-point tensor elements")
    others = secrets.others_shares(rank)
    hit = np.isin(others, words)
    if hit.any():
        leaks.append(f"share: received {int(hit.sum())} words of another party's shares")
    if view.masks.size and view.opened.size:
        enc = secrets.all_encoded().astype(np.uint64)
        masks = np.unique(view.masks).astype(np.uint64)
        opened = np.unique(view.opened).astype(np.uint64)
        for chunk in np.array_split(enc, max(1, enc.size // 64)):
            diffs = (chunk[:, None] - masks[None, :]).ravel()  # wraps mod 2**64
            n = int(np.isin(diffs, opened).sum())
            if n:
                leaks.append(f"unmasked: {n} opened values + known masks give secrets")
                break
    return leaks
