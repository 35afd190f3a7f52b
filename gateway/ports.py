"""Loopback ports and readiness: what the CLI, the local cluster, tests and benches share."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (another process may still take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, deadline_s: float, proc: subprocess.Popen[bytes]) -> bool:
    """Poll a plain-HTTP readiness URL until 200, the deadline, or `proc` exiting."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 (loopback URL)
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False
