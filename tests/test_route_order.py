"""/infer is the API app's first route (gateway/app.py, `api_routes`): Starlette tries
routes in order, so that ordering is only safe while no other route takes a URL an
/infer route takes, or the reverse. Checked on the real app, every route included."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.routing import Match, Route

from gateway.pki import PKI
from tests.conftest import TritonCluster
from tests.gateway_harness import RunningGateway, gateway_config, running_gateway
from tests.test_gateway import node_table

# Names a client could put in a path parameter, the other routes' literal segments among them.
NAMES = ("iris", "infer", "stats", "ready", "versions", "jobs", "generate", "1")


@pytest.fixture(scope="module")
def gateway(
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    registry = triton_repository.parent / "registry"
    cfg = gateway_config(pki, registry, tmp_path_factory.mktemp("gw"), node_table(triton_cluster))
    with running_gateway(cfg) as gw:
        yield gw


def _urls(path: str) -> Iterator[str]:
    """`path` with every combination of NAMES in its parameters."""
    params = path.count("{")
    for values in itertools.product(NAMES, repeat=params):
        url, rest = "", path
        for v in values:
            head, _, tail = rest.partition("{")
            url, rest = url + head + v, tail.partition("}")[2]
        yield url + rest


def _match(route: Route, url: str, method: str) -> Match:
    scope = {"type": "http", "path": url, "method": method, "root_path": ""}
    return route.matches(scope)[0]


def test_no_other_route_takes_an_infer_url_nor_the_reverse(gateway: RunningGateway) -> None:
    assert gateway.gw.jobs is not None and gateway.gw.jobs.app is not None
    routes = [r for r in gateway.gw.jobs.app.routes if isinstance(r, Route)]
    infer = [r for r in routes if (r.name or "").startswith("infer:")]
    assert [routes.index(r) for r in infer] == [0, 1]
    others = routes[2:]
    assert len(others) > 30
    for route in infer:
        for url in _urls(route.path):
            assert _match(route, url, "POST") is Match.FULL  # the positive control
            taken = [o.path for o in others if _match(o, url, "POST") is not Match.NONE]
            assert taken == [], url
    for other in others:
        for url in _urls(other.path):
            for method in other.methods or {"GET"}:
                assert all(_match(r, url, method) is Match.NONE for r in infer), url
