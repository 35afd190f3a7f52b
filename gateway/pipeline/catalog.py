"""The registered models by name and version, as the request path looks them up."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.protocol.problems import UnknownModel, UnknownVersion
from gateway.registry import ModelEntry


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
            raise UnknownModel(f"unknown model {name!r}")
        if version is None:
            return self.latest(name)
        if version not in versions:
            raise UnknownVersion(f"model {name!r} has no version {version!r}")
        return versions[version]
