"""Render a kustomization without kubectl: exactly the kustomize features deploy/ uses.

    python deploy/kubernetes/render.py deploy/kubernetes/overlays/production > all.yaml

For machines with only Debian's apt and pip (CI): `kubectl kustomize` gives the same
objects (tests/test_deploy.py compares the two wherever kubectl is installed). Supported:
`resources` (files and directories holding a kustomization), `configMapGenerator`
(`files`, `literals`; `behavior` create, replace, merge), `generatorOptions` with
`disableNameSuffixHash: true`, `images` (`newName`, `newTag`, `digest`) and `patches`
that are JSON 6902 operation lists with a `target` of kind and name. Anything else is an
error, never silently ignored.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KNOWN_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "images",
    "patches",
}


class RenderError(Exception):
    """The kustomization uses something this renderer does not support, or is wrong."""


def _kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            unknown = sorted(set(data) - KNOWN_KEYS)
            if unknown:
                raise RenderError(f"{path}: unsupported key(s) {', '.join(unknown)}")
            return dict(data)
    raise RenderError(f"{directory}: no kustomization.yaml")


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata", {})
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


def _configmap(gen: dict[str, Any], base: Path) -> dict[str, Any]:
    data: dict[str, str] = {}
    for entry in gen.get("files", []):
        key, _, file = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        data[key] = (base / file).read_text()
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    meta: dict[str, Any] = {"name": gen["name"]}
    if "namespace" in gen:
        meta["namespace"] = gen["namespace"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with /: {path}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add, remove and replace (what kustomize patches here use)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        try:
            parent = _walk(doc, parts[:-1])
        except (KeyError, IndexError, ValueError) as exc:
            raise RenderError(f"patch path {op['path']} does not exist") from exc
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[index]
            elif kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            else:
                raise RenderError(f"unsupported patch op {kind}")
        else:
            if kind in ("remove", "replace") and last not in parent:
                raise RenderError(f"patch path {op['path']} does not exist")
            if kind == "remove":
                del parent[last]
            elif kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            else:
                raise RenderError(f"unsupported patch op {kind}")
    return doc


def _set_images(obj: dict[str, Any], images: list[dict[str, Any]]) -> None:
    pod = obj.get("spec", {}).get("template", {}).get("spec")
    if not isinstance(pod, dict):
        return
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        ref: str = container["image"]
        name = ref.split("@")[0]
        last = name.rsplit("/", 1)[-1]
        tag = ""
        if ":" in last:
            name, tag = name.rsplit(":", 1)
        for image in images:
            if image["name"] != name:
                continue
            new = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{new}@{image['digest']}"
            elif "newTag" in image:
                container["image"] = f"{new}:{image['newTag']}"
            else:
                container["image"] = f"{new}:{tag}" if tag else new


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` prints, in resource order."""
    k = _kustomization(directory)
    objects: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(obj: dict[str, Any], where: str) -> None:
        key = _key(obj)
        if key in objects:
            raise RenderError(f"{where}: {key} is defined twice")
        objects[key] = obj

    for resource in k.get("resources", []):
        path = directory / resource
        if path.is_dir():
            for obj in render(path):
                add(obj, str(path))
        else:
            for obj in yaml.safe_load_all(path.read_text()):
                if obj:
                    add(obj, str(path))
    options = k.get("generatorOptions", {})
    if k.get("configMapGenerator") and options.get("disableNameSuffixHash") is not True:
        raise RenderError(f"{directory}: only generatorOptions.disableNameSuffixHash: true")
    for gen in k.get("configMapGenerator", []):
        made = _configmap(gen, directory)
        key = _key(made)
        behavior = gen.get("behavior", "create")
        if behavior == "create":
            add(made, str(directory))
        elif key not in objects:
            raise RenderError(f"{directory}: {behavior} of {key}, which no base defines")
        elif behavior == "replace":
            objects[key] = made
        elif behavior == "merge":
            objects[key]["data"] = {**objects[key].get("data", {}), **made["data"]}
        else:
            raise RenderError(f"{directory}: unknown behavior {behavior}")
    for patch in k.get("patches", []):
        target = patch.get("target", {})
        if set(target) - {"kind", "name"} or "patch" not in patch:
            raise RenderError(f"{directory}: only inline JSON 6902 patches with kind/name")
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise RenderError(f"{directory}: only JSON 6902 patches (a list of operations)")
        hits = [
            key
            for key in objects
            if key[0] == target.get("kind", key[0]) and key[2] == target.get("name", key[2])
        ]
        if not hits:
            raise RenderError(f"{directory}: patch target {target} matches nothing")
        for key in hits:
            objects[key] = apply_json6902(objects[key], ops)
    for obj in objects.values():
        _set_images(obj, k.get("images", []))
    return list(objects.values())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        objects = render(Path(argv[0]))
    except (RenderError, OSError, yaml.YAMLError) as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
