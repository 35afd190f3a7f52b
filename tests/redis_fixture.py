"""A throwaway redis-server for the test session.

Use from a test module with `from tests.redis_fixture import redis_server  # noqa: F401`,
or from conftest.py with `pytest_plugins = ["tests.redis_fixture"]`.

Skips when redis-server is not installed, except under CI=true where a missing server
must not silently turn the Redis half of the suite green.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ports import free_port as _free_port

__all__ = ["redis_server"]

_START_DEADLINE_S = 10.0
_PORT_ATTEMPTS = 3  # the free port we pick can be taken before redis binds it


def _pings(port: int) -> bool:
    # Raw RESP so the fixture depends on nothing but the server itself.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(exe: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    log_path = workdir / "redis.log"
    last_log = ""
    for _ in range(_PORT_ATTEMPTS):
        port = _free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    exe,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--dir", str(workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + _START_DEADLINE_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _pings(port):
                return proc, port
            time.sleep(0.02)
        _stop(proc)
        last_log = log_path.read_text(errors="replace")[-2000:]
    pytest.fail(f"redis-server did not answer PING within {_START_DEADLINE_S}s:\n{last_log}")


def redis_executable() -> str:
    """The redis-server binary; missing, it fails the run under CI (skips elsewhere)."""
    exe = shutil.which("redis-server")
    if exe is None:
        msg = "redis-server not installed (apt-get install redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a fresh redis-server on loopback (`redis://127.0.0.1:PORT/0`)."""
    exe = redis_executable()
    proc, port = _start(exe, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)
