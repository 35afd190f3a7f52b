"""The head marker: a replica's record, kept outside its log directory, of how far its
active log has got. A log found behind its marker was restored from a backup.

Format: two 512-byte slots written alternately (ping-pong), each one JSON line
``{"seq", "log_id", "size", "root"}`` followed by its CRC-32, padded with spaces. A
write touches one slot and is followed by ``fdatasync``; a torn write spoils at most that
slot, and the reader takes the valid slot with the highest ``seq``. The marker is
written after a group-commit batch is durable, off the append path (at most one write
in flight, always of the newest durable size), and at most once per `MIN_INTERVAL_S`
(one fdatasync per ~50 ms, not one per batch), so it never runs ahead of the log and lags
it by at most that interval plus the batch being written.

What the lag means for a crash: nothing for the log's own recovery. The marker is a hint
about rollback, never a source of receipts: the log's leaves and bodies are durable in its
own database before any answer leaves (the group commit), and reopening after a crash
takes every durable leaf from there. A stale marker (behind the log) is always accepted,
since the log extends it. What it costs is detection: a restore to a state taken within
the last ~50 ms before the crash is not seen by the marker (the witnesses still refuse
the fork it would make, gateway/receipts/log.py).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from gateway.files import fsync_dir

__all__ = ["MIN_INTERVAL_S", "Head", "HeadMarker"]

SLOT = 512
MIN_INTERVAL_S = 0.05  # at most one marker write (and fdatasync) per this many seconds


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    log_id: str
    size: int
    root: str  # base64


class HeadMarker:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        current = self.read()
        self._seq = current.seq if current else 0

    def read(self) -> Head | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        best: Head | None = None
        for i in range(2):
            slot = raw[i * SLOT : (i + 1) * SLOT]
            line, sep, rest = slot.partition(b"\n")
            crc = rest.split(b" ", 1)[0].strip()
            if not sep or not crc.isdigit() or zlib.crc32(line) != int(crc):
                continue
            try:
                d = json.loads(line)
                head = Head(int(d["seq"]), str(d["log_id"]), int(d["size"]), str(d["root"]))
            except (ValueError, KeyError, TypeError):
                continue
            if best is None or head.seq > best.seq:
                best = head
        return best

    def write(self, log_id: str, size: int, root: str) -> None:
        """Durably record the head (blocking: call from a worker thread)."""
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if created:
                fsync_dir(self.path.parent)
        self._seq += 1
        line = json.dumps(
            {"seq": self._seq, "log_id": log_id, "size": size, "root": root}, sort_keys=True
        ).encode()
        record = line + b"\n" + str(zlib.crc32(line)).encode()
        if len(record) > SLOT:
            raise ValueError("head record too large")
        os.pwrite(self._fd, record.ljust(SLOT, b" "), (self._seq % 2) * SLOT)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
