"""A MAC over what a job will run as: the store is not trusted to say who a job is for.

A job runs as the certificate stored with it. Client certificates are public, so anyone
who could write the job store (its Redis, or the data dir) could otherwise queue a job
with any client's certificate and have the gateway run it as that client. The gateway
seals each job at submit (HMAC-SHA256 over its id, owner, route, model, certificate,
headers and body) with a key the store never sees, and runs only jobs whose seal holds.

The key is a file: `jobs.key_file`, or `<data_dir>/jobs.key` made on first start.
Replicas sharing one Redis must share the file too (a job sealed by one replica is run
by whichever claims it). Results need no seal: each carries its signed receipt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from gateway.files import fsync_dir

__all__ = ["KEY_BYTES", "load_key", "seal"]

KEY_BYTES = 32


def load_key(path: Path) -> bytes:
    """The key at `path`, made (random, 0600, fsynced) if there is none yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass  # another process made it first: read theirs
        else:
            try:
                os.write(fd, secrets.token_bytes(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path.parent)
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise ValueError(f"{path}: a job key has at least {KEY_BYTES} bytes")
    return key


def seal(
    key: bytes,
    *,
    job_id: str,
    owner: str,
    route: str,
    model: str,
    cert: str,
    headers: dict[str, str],
    body: bytes,
) -> str:
    mac = hmac.new(key, b"ztgate-job-v1", hashlib.sha256)
    for part in (job_id, owner, route, model):
        mac.update(b"\0" + part.encode())
    for blob in (cert.encode(), json.dumps(headers, sort_keys=True).encode(), body):
        mac.update(b"\0" + hashlib.sha256(blob).digest())
    return mac.hexdigest()
