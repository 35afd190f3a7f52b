"""Real processes for the system suite: each in its own process group, logged to a file,
stopped (TERM, then KILL of the whole group) at teardown, and checked gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ZTGATE = [sys.executable, "-m", "gateway"]


def env() -> dict[str, str]:
    # Unbuffered: readiness lines ("node n1 ready", "LISTENING") reach the log at once.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_cli(args: list[str], cwd: Path, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """One `ztgate` command, the way an operator types it; output captured as text."""
    return subprocess.run(
        [*ZTGATE, *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


@dataclass
class Service:
    """A long-running command: `start`, `wait_for` a line in its log, `stop`/`kill`."""

    name: str
    argv: list[str]
    cwd: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    groups: list[int] = field(default_factory=list)  # every process group it ever had

    def start(self) -> Service:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            sink.write(f"\n=== start {' '.join(self.argv)}\n".encode())
            sink.flush()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: children die with it
            )
        self.groups.append(self.proc.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def text_since_start(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return text.rsplit("\n=== start ", 1)[-1]

    def wait_for(self, pattern: str, deadline_s: float) -> re.Match[str]:
        """Poll the log (of the current run) for `pattern`; fail if the process exits."""
        rx = re.compile(pattern)
        end = time.monotonic() + deadline_s
        while True:
            found = rx.search(self.text_since_start())
            if found:
                return found
            if not self.running():
                raise RuntimeError(f"{self.name} exited before {pattern!r}:\n{self.tail()}")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.name}: no {pattern!r} in {deadline_s}s:\n{self.tail()}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group: the process and every child it started."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._wait_group_gone(self.proc.pid, 10)

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        if group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        if not self._wait_group_gone(pgid, 5):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_group_gone(pgid, 10)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)

    @staticmethod
    def _wait_group_gone(pgid: int, deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        while group_alive(pgid):
            if time.monotonic() > end:
                return False
            time.sleep(0.1)
        return True


@dataclass
class Services:
    """Every service started by the suite, stopped in reverse order."""

    items: list[Service] = field(default_factory=list)
    # In-process helpers (the fault proxy's thread) closed after every service stopped.
    closers: list[Callable[[], None]] = field(default_factory=list)

    def add(self, service: Service) -> Service:
        self.items.append(service)
        return service

    def on_stop(self, close: Callable[[], None]) -> None:
        self.closers.append(close)

    def stop_all(self) -> list[str]:
        for s in reversed(self.items):
            s.stop()
        for close in reversed(self.closers):
            close()
        return [f"{s.name} (group {g})" for s in self.items for g in s.groups if group_alive(g)]
