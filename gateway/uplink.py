"""What an edge site pulls from its core: the client CA's CRL first, then the signed policy
bundle and model files; every download resumable and hash-checked (docs/ddil.md).

The core publishes a directory (`ztgate witness serve --publish DIR`) with a manifest of
its files, their sizes and SHA-256. Each round the edge fetches the manifest, then the
CRL, and only once that succeeded the rest: after a reconnection, revocations reach the
edge before anything else, and the log upload waits for them too (`revocations_current`).
A download cut by the link resumes where it stopped (HTTP Range) and is installed only
once its bytes hash to the manifest's SHA-256, by an atomic rename.

Nothing here is trusted for being fetched: the CRL counts only if the client CA signed it
(gateway.revocation), the bundle only if officers did (gateway.policy.live, which also
refuses a rollback), and a model file only once `ztgate model add` registers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from gateway.config import Config
from gateway.files import fsync_dir, sha256_file

log = logging.getLogger(__name__)

__all__ = ["Published", "Publisher", "Uplink", "UplinkError", "fetch_resumable", "role_of"]

MAX_MANIFEST = 1 << 20
MAX_FILE = 8 << 30  # a model file: bounded, so a lying manifest cannot fill the disk
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,3}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
ROLES = ("crl", "bundle", "model")


class UplinkError(Exception):
    """A pull that failed; the next round tries again."""


@dataclass(frozen=True)
class Published:
    """One entry of the core's manifest."""

    name: str  # relative path under the core's publish directory
    role: str  # crl | bundle | model
    sha256: str
    size: int

    @classmethod
    def parse(cls, doc: Any) -> Published:
        try:
            name, role, digest, size = doc["name"], doc["role"], doc["sha256"], doc["size"]
        except (KeyError, TypeError):
            raise UplinkError("malformed manifest entry") from None
        if not (isinstance(name, str) and _NAME_RE.fullmatch(name) and ".." not in name):
            raise UplinkError("manifest entry with an unusable name")
        if (
            role not in ROLES
            or not isinstance(digest, str)
            or not re.fullmatch(r"[0-9a-f]{64}", digest)
        ):
            raise UplinkError(f"manifest entry {name}: bad role or digest")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE:
            raise UplinkError(f"manifest entry {name}: bad size")
        return cls(name, role, digest, size)


def _prepare(dest: Path, part: Path, size: int, sha256: str) -> int | None:
    """None when `dest` already holds the file; else how many bytes `part` holds."""
    if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256:
        return None
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    return have


def _complete(part: Path, size: int, sha256: str, url: str) -> None:
    have = part.stat().st_size if part.is_file() else 0
    if have != size:
        raise UplinkError(f"{url}: {have} of {size} bytes")
    if sha256_file(part) != sha256:
        part.unlink()
        raise UplinkError(f"{url}: the bytes do not hash to the manifest's SHA-256")


def _install(dest: Path, part: Path) -> None:
    os.replace(part, dest)
    fsync_dir(dest.parent)


def _open(path: Path, mode: str) -> BinaryIO:
    return open(path, "ab" if mode == "ab" else "wb")  # closed by _close


def _append(fh: BinaryIO, chunk: bytes) -> None:
    fh.write(chunk)


def _close(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


async def fetch_resumable(
    http: httpx.AsyncClient,
    url: str,
    dest: Path,
    sha256: str,
    size: int,
    check: Callable[[Path], Awaitable[bool]] | None = None,
) -> bool:
    """`dest` made to hold exactly the bytes hashing to `sha256`; True if it changed.

    A partial download is kept beside it (`.<name>.part`) and resumed with a Range
    request; bytes past `size` are refused; a complete file that does not hash right is
    deleted (the next round starts over) and raises. File work runs off the loop."""
    part = dest.with_name(f".{dest.name}.part")
    have = await asyncio.to_thread(_prepare, dest, part, size, sha256)
    if have is None:
        return False
    if have < size:
        headers = {"range": f"bytes={have}-"} if have else {}
        async with http.stream("GET", url, headers=headers) as r:
            if r.status_code == 200:
                have, mode = 0, "wb"  # the server ignored the range: start over
            elif r.status_code == 206:
                mode = "ab"
            else:
                raise UplinkError(f"GET {url}: HTTP {r.status_code}")
            fh = await asyncio.to_thread(_open, part, mode)
            try:
                async for chunk in r.aiter_bytes():
                    have += len(chunk)
                    if have > size:
                        raise UplinkError(f"{url}: more bytes than the manifest says")
                    await asyncio.to_thread(_append, fh, chunk)
            finally:
                await asyncio.to_thread(_close, fh)
    await asyncio.to_thread(_complete, part, size, sha256, url)
    # What the file is (a CRL the client CA signed, a bundle the officers signed) is
    # checked before it replaces the one in use: a bad one never lands where a restart
    # would load it.
    if check is not None and not await check(part):
        await asyncio.to_thread(part.unlink)
        raise UplinkError(f"{url}: refused by its check; the file in use is kept")
    await asyncio.to_thread(_install, dest, part)
    return True


class Uplink:
    """The edge's pulls, one round per `uplink.interval_s`, in order: CRL, then the rest."""

    def __init__(self, cfg: Config, http: httpx.AsyncClient | None = None) -> None:
        u = cfg.uplink
        if u.core_url is None:
            raise ValueError("uplink.core_url is not set")
        self.base = u.core_url.rstrip("/")
        self.cfg = cfg
        self.interval_s = u.interval_s
        verify: ssl.SSLContext | bool = True
        if u.ca is not None:
            verify = ssl.create_default_context(cafile=str(u.ca))
        self._http = http or httpx.AsyncClient(timeout=u.timeout_s, verify=verify)
        self.crl_at: float | None = None  # monotonic time of the last CRL pull that succeeded
        self.rounds = 0
        self.failures = 0
        # dest -> (sha256, mtime_ns, size) of what this edge installed or last hashed: an
        # unchanged file is not hashed again every round (model files run to gigabytes).
        self._known: dict[Path, tuple[str, int, int]] = {}
        # role -> check of a downloaded file before it is installed (gateway.runtime).
        self.checks: dict[str, Callable[[Path], Awaitable[bool]]] = {}

    def destination(self, item: Published) -> Path | None:
        """Where an entry goes on this edge, or None when this edge takes no such file."""
        if item.role == "crl":
            return self.cfg.tls.crl
        if item.role == "bundle":
            return self.cfg.policy.bundle
        models = self.cfg.uplink.models_dir
        return None if models is None else models / item.name.split("/")[-1]

    def revocations_current(self, within_s: float | None = None) -> bool:
        """Whether the CRL was pulled in the last round's time (what the log upload waits
        for after a reconnection: revocations first)."""
        if self.crl_at is None:
            return False
        return time.monotonic() - self.crl_at <= (within_s or 2 * self.interval_s + 5)

    async def manifest(self) -> list[Published]:
        r = await self._http.get(f"{self.base}/manifest.json")
        if r.status_code != 200 or len(r.content) > MAX_MANIFEST:
            raise UplinkError(f"manifest: HTTP {r.status_code}")
        try:
            files = r.json()["files"]
        except (ValueError, KeyError, TypeError):
            raise UplinkError("manifest: not JSON with a files list") from None
        if not isinstance(files, list):
            raise UplinkError("manifest: files is not a list")
        return [Published.parse(f) for f in files]

    async def pull(self) -> list[str]:
        """One round; the names installed. The CRL comes first and must succeed before
        anything else is fetched."""
        self.rounds += 1
        items = await self.manifest()
        ordered = sorted(items, key=lambda i: ROLES.index(i.role))
        installed = []
        for item in ordered:
            dest = self.destination(item)
            if dest is None:
                continue
            if self._unchanged(dest, item.sha256):
                if item.role == "crl":
                    self.crl_at = time.monotonic()
                continue
            if await fetch_resumable(
                self._http,
                f"{self.base}/{item.name}",
                dest,
                item.sha256,
                item.size,
                self.checks.get(item.role),
            ):
                installed.append(item.name)
                log.warning("uplink: installed %s (%s) from the core", item.name, item.role)
            with contextlib.suppress(OSError):
                st = dest.stat()
                self._known[dest] = (item.sha256, st.st_mtime_ns, st.st_size)
            if item.role == "crl":
                self.crl_at = time.monotonic()
        return installed

    def _unchanged(self, dest: Path, sha256: str) -> bool:
        known = self._known.get(dest)
        try:
            st = dest.stat()
        except OSError:
            return False
        return known == (sha256, st.st_mtime_ns, st.st_size)

    async def aclose(self) -> None:
        await self._http.aclose()


def role_of(name: str) -> str | None:
    """What a published file is, by the core's naming convention (docs/ddil.md)."""
    if name.endswith(".crl"):
        return "crl"
    if name.endswith("bundle.json") and "/" not in name:
        return "bundle"
    if name.startswith("models/") and name.count("/") == 1:
        return "model"
    return None


class Publisher:
    """The core's side: the manifest of a directory (hashes cached by mtime and size)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, tuple[tuple[int, int], str]] = {}

    def path(self, name: str) -> Path | None:
        """The file for a published name, or None (unknown, or not a plain file here)."""
        if not _NAME_RE.fullmatch(name) or ".." in name or role_of(name) is None:
            return None
        path = self.directory / name
        try:
            inside = path.resolve(strict=True).is_relative_to(self.directory.resolve())
        except OSError:
            return None
        return path if inside and path.is_file() and not path.is_symlink() else None

    def manifest(self) -> dict[str, Any]:
        files = []
        for path in sorted(self.directory.rglob("*")):
            name = path.relative_to(self.directory).as_posix()
            role = role_of(name)
            if role is None or self.path(name) is None:
                continue
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._cache.get(name)
            if cached is None or cached[0] != stamp:
                cached = (stamp, sha256_file(path))
                self._cache[name] = cached
            files.append({"name": name, "role": role, "sha256": cached[1], "size": st.st_size})
        return {"files": files}
