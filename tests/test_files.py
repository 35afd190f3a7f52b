"""The one atomic writer (gateway/files.py) and the strict JSON parser (gateway/jsonstrict.py)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from gateway import jsonstrict
from gateway.files import atomic_write, sha256_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_old_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o755])
def test_atomic_write_mode_is_exact(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "f"
    old = os.umask(0o077)  # an exact mode is not narrowed by the umask
    try:
        atomic_write(target, b"x", mode)
    finally:
        os.umask(old)
    assert _mode(target) == mode


def test_atomic_write_default_mode_is_private_and_none_follows_umask(tmp_path: Path) -> None:
    atomic_write(tmp_path / "key", b"secret")
    assert _mode(tmp_path / "key") == 0o600
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "pub", b"public", mode=None)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "pub") == 0o640  # what open(path, "w") would have made


def test_atomic_write_failure_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "key.pem"
    atomic_write(target, b"old", 0o600)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, b"new", 0o600)
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # more than one read block
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_strict_json_accepts_plain_json() -> None:
    assert jsonstrict.loads(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    assert jsonstrict.loads("[1]", want_object=False) == [1]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"x": {"b": 1, "b": 1}}', "duplicate key 'b'"),
        (b'{"a": NaN}', "non-standard constant NaN"),
        (b'{"a": -Infinity}', "non-standard constant -Infinity"),
        (b"[1, 2]", "the top level must be a JSON object"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8 at byte 0"),
        (b"[" * 100_000, "nesting too deep"),
        (b'{"a": 1', "Expecting"),
    ],
)
def test_strict_json_refuses(raw: bytes, reason: str) -> None:
    with pytest.raises(jsonstrict.StrictJSONError) as info:
        jsonstrict.loads(raw)
    assert info.value.reason.startswith(reason)
    assert isinstance(info.value, ValueError)


def test_strict_json_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "identities.json"
    path.write_text('{\n  "clients": {},\n  "clients": {}\n}\n')
    with pytest.raises(jsonstrict.StrictJSONError) as info:
        jsonstrict.load(path)
    assert str(info.value) == f"{path}: duplicate key 'clients'"
    assert info.value.key == "clients" and info.value.source == str(path)
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(jsonstrict.StrictJSONError, match=f"^{path}: Expecting value") as info:
        jsonstrict.load(path)
    assert (info.value.lineno, info.value.colno) == (2, 7)
