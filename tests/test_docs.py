"""The docs' claims point at tests that exist, and the client error table matches the code."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.protocol.problems import PROBLEM_BASE, PROBLEM_TYPES

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
REF = re.compile(r"tests/([\w/]+\.py)(?:::(\w+))?")


def test_every_named_test_exists() -> None:
    seen = 0
    for doc in DOCS:
        for file, name in REF.findall(doc.read_text()):
            path = ROOT / "tests" / file
            assert path.is_file(), f"{doc.name} names missing {path}"
            if name:
                assert re.search(rf"^(async )?def {name}\(", path.read_text(), re.M), (
                    f"{doc.name} names {file}::{name}, which does not exist"
                )
            seen += 1
    assert seen >= 15  # SECURITY.md alone names more than this


def test_client_error_table_matches_problem_types() -> None:
    text = (ROOT / "docs" / "clients.md").read_text()
    rows = re.findall(r"^\| (\d{3}) \| (.+?) \| (yes|no|report)", text, re.M)
    documented = {}
    for status, types, retry in rows:
        for suffix in re.findall(r"`([a-z-]+)`", types):
            documented[PROBLEM_BASE + suffix] = (int(status), retry == "yes")
    actual = {t: (info.status, info.retryable) for t, info in PROBLEM_TYPES.items()}
    assert documented == actual
