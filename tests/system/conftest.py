"""The system suite: one production deployment of real processes, shared by its scenarios.

`make test` runs it (marker `system`; `-m "not system"` leaves it out locally). Nothing in
it may skip under CI=true (tests/conftest.py turns a skip into a failure there).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.cluster import ProductionCluster, start_cluster
from tests.system.figures import FIGURES, say
from tests.system.processes import Services

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="package")
def production_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionCluster]:
    """The whole deployment (tests/system/cluster.py), started once for every scenario of
    this package and stopped after its last test (not at the end of the whole session, so
    the rest of `make test` does not share two cores with it); every process group it
    started must be gone afterwards."""
    services = Services()
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("system"), services)
        say("\n[system] set-up times (s): " + ", ".join(
            f"{k}={v:.1f}" for k, v in cluster.setup_s.items()
        ))  # fmt: skip
        yield cluster
    finally:
        left = services.stop_all()
    assert not left, f"processes outlived the system suite: {left}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("system suite figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
