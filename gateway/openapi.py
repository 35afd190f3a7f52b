"""Keep `openapi.json` honest: the (method, path) pairs it documents against the app's routes.

`check_spec(build_api(gw), json.load(open("openapi.json")))` lists every difference; CI runs
it (tests/test_openapi.py), so a route added, removed or renamed without the spec fails there.

HEAD is left out on both sides: Starlette answers HEAD on every GET route by itself, and the
spec says so once in its description instead of documenting HEAD per path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route

__all__ = ["HTTP_METHODS", "Operation", "check_spec", "route_table", "spec_table"]

# The operation keys of an OpenAPI Path Item object (3.0 and 3.1).
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

Operation = tuple[str, str]  # (METHOD, path template), e.g. ("POST", "/v2/models/{name}/infer")


def _join(prefix: str, path: str) -> str:
    return (prefix.rstrip("/") + path) or "/"


def _routes(routes: Iterable[BaseRoute], prefix: str) -> set[Operation]:
    table: set[Operation] = set()
    for route in routes:
        if isinstance(route, Route):
            methods = set(route.methods or ())
            if "GET" in methods:
                methods.discard("HEAD")  # added by Starlette to every GET route
            path = _join(prefix, route.path)
            table.update((m.upper(), path) for m in methods)
        elif isinstance(route, Mount):
            table |= _routes(route.routes, _join(prefix, route.path))
        else:
            # A WebSocketRoute or a custom route class: not part of an HTTP API description.
            continue
    return table


def route_table(app: Starlette) -> set[Operation]:
    """Every (METHOD, path template) the app serves, from its routes (HEAD implied by GET)."""
    return _routes(app.routes, "")


def spec_table(spec: Mapping[str, Any]) -> set[Operation]:
    """Every (METHOD, path template) an OpenAPI document describes (HEAD dropped likewise)."""
    table: set[Operation] = set()
    paths = spec.get("paths")
    if not isinstance(paths, Mapping):
        return table
    for path, item in paths.items():
        if not isinstance(item, Mapping):
            continue
        methods = {m for m in item if isinstance(m, str) and m.lower() in HTTP_METHODS}
        if any(m.lower() == "get" for m in methods):
            methods = {m for m in methods if m.lower() != "head"}
        table.update((m.upper(), str(path)) for m in methods)
    return table


def check_spec(app: Starlette, spec: Mapping[str, Any]) -> list[str]:
    """Differences between the app's routes and the spec, one sentence each; empty if they agree."""
    problems: list[str] = []
    version = spec.get("openapi")
    if not isinstance(version, str) or not version.startswith("3."):
        problems.append(f"not an OpenAPI 3.x document (openapi = {version!r})")
    served, documented = route_table(app), spec_table(spec)
    for method, path in sorted(served - documented, key=_order):
        problems.append(f"{method} {path}: served by the app, missing from the spec")
    for method, path in sorted(documented - served, key=_order):
        problems.append(f"{method} {path}: in the spec, not served by the app")
    return problems


def _order(op: Operation) -> tuple[str, str]:
    return op[1], op[0]
