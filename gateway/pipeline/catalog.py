"""The registered models by name and version, as the request path looks them up."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.protocol.problems import UnknownModel, UnknownVersion
from gateway.registry import NAME_RE, VERSION_RE, ModelEntry


def unknown_model(name: str) -> UnknownModel:
    """Triton's wording, which clients match on ("Request for unknown model"). The name is
    quoted only when it could be a registered one: never arbitrary client text."""
    shown = repr(name) if NAME_RE.fullmatch(name) else "the requested model"
    return UnknownModel(f"Request for unknown model: {shown} is not found")


def unknown_version(name: str, version: str) -> UnknownVersion:
    shown = version if VERSION_RE.fullmatch(version) else "(invalid)"
    return UnknownVersion(f"Request for unknown model: {name!r} version {shown} is not found")


class Catalog:
    def __init__(self, models: Mapping[str, Mapping[str, ModelEntry]]) -> None:
        self.models = models

    def latest(self, name: str) -> ModelEntry:
        versions = self.models[name]
        return versions[max(versions, key=int)]

    def known(self, name: str | None) -> ModelEntry | None:
        """The latest entry of a registered name, else None (never raises)."""
        return self.latest(name) if name is not None and name in self.models else None

    def entry(self, name: str, version: str | None) -> ModelEntry:
        versions = self.models.get(name)
        if not versions:
            raise unknown_model(name)
        if version is None:
            return self.latest(name)
        if version not in versions:
            raise unknown_version(name, version)
        return versions[version]
