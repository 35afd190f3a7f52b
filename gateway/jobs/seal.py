"""MACs over what a job will run as and over what it answered: the store is not trusted
to say who a job is for, when it was asked, or what it answered.

A job runs as the certificate stored with it. Client certificates are public, so anyone
who could write the job store (its Redis, or the data dir) could otherwise queue a job
with any client's certificate and have the gateway run it as that client. The gateway
seals each job at submit (HMAC-SHA256 over its id, owner, route, model, submit time,
certificate, headers and body) with a key the store never sees, and runs only jobs whose
seal holds and whose sealed submit time is within `jobs.max_age_s`: a copy of a sealed
job written back later cannot run again once that much time has passed, and one whose
time was made fresh does not verify.

A finished job's answer is sealed too (`seal_result`: id, state, status, receipt id,
headers, result), so a store writer cannot swap in another job's answer, nor turn a done job into
a failure; a poll checks it.

The key is a file: `jobs.key_file`, or `<data_dir>/jobs.key` made on first start. It
must belong to the gateway's user with mode 0600 and not be a symlink (`load_key`
refuses to start otherwise). Replicas sharing one Redis must share the file too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

from gateway.files import fsync_dir

__all__ = ["KEY_BYTES", "KeyFileError", "load_key", "seal", "seal_result", "verify"]

KEY_BYTES = 32
_MAX_KEY_BYTES = 4096


class KeyFileError(ValueError):
    """The job key file is not one the gateway can trust."""


def load_key(path: Path) -> bytes:
    """The key at `path`, made (random, 0600, fsynced) if there is none yet.

    Whoever can replace this file can forge jobs as any client, so it is read only if it
    is a regular file (no symlink followed) of this process's user, readable by no one
    else."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            pass  # another process made it first: read theirs
        else:
            try:
                os.write(fd, secrets.token_bytes(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:  # ELOOP: a symlink
        raise KeyFileError(
            f"{path}: cannot open the job key ({exc.strerror}); it must be a "
            "regular file, not a symlink"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: the job key must be a regular file")
        if st.st_uid != os.geteuid():
            raise KeyFileError(
                f"{path}: the job key belongs to uid {st.st_uid}, not to the gateway's "
                f"uid {os.geteuid()}: chown it"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyFileError(
                f"{path}: the job key has mode {stat.S_IMODE(st.st_mode):04o}; it must be "
                "0600 (chmod 600)"
            )
        key = os.read(fd, _MAX_KEY_BYTES)
    finally:
        os.close(fd)
    if len(key) < KEY_BYTES:
        raise KeyFileError(f"{path}: a job key has at least {KEY_BYTES} bytes")
    return key


def _mac(key: bytes, tag: bytes, parts: tuple[str, ...], blobs: tuple[bytes, ...]) -> str:
    mac = hmac.new(key, tag, hashlib.sha256)
    for part in parts:
        mac.update(b"\0" + part.encode())
    for blob in blobs:
        mac.update(b"\0" + hashlib.sha256(blob).digest())
    return mac.hexdigest()


def seal(
    key: bytes,
    *,
    job_id: str,
    owner: str,
    route: str,
    model: str,
    created: float,
    cert: str,
    headers: dict[str, str],
    body: bytes,
) -> str:
    # repr round-trips a float exactly through SQLite's REAL and Redis's strings.
    parts = (job_id, owner, route, model, repr(float(created)))
    blobs = (cert.encode(), json.dumps(headers, sort_keys=True).encode(), body)
    return _mac(key, b"ztgate-job-v2", parts, blobs)


def seal_result(
    key: bytes,
    *,
    job_id: str,
    state: str,
    status: int,
    headers: dict[str, str],
    result: bytes,
    receipt_id: str | None,
) -> str:
    parts = (job_id, state, str(status), receipt_id or "")
    blobs = (json.dumps(headers, sort_keys=True).encode(), result)
    return _mac(key, b"ztgate-job-result-v1", parts, blobs)


def verify(expected: str, got: str | None) -> bool:
    return got is not None and hmac.compare_digest(expected, got)
