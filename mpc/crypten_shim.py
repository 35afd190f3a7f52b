"""The one place that imports CrypTen: the shims 0.4.1 needs on this torch, each checked.

Import ``crypten`` from here (``from mpc.crypten_shim import crypten``), never directly,
so every shim is in effect before CrypTen's own modules run. ``tests/test_mpc.py`` has one
test per shim showing that it is still needed and in effect: an upgrade that makes one
unnecessary (or breaks it) fails there, loudly, instead of somewhere in a party.

1. ``torch.onnx._internal.registration`` moved to ``...torchscript_exporter.registration``
   in torch 2.9+; ``crypten.nn.onnx_converter`` imports the old path at import time.
2. CrypTen's ``DistributedCommunicator`` and TTP provider call ``torch.distributed``
   directly (gloo: no TLS, no timeout, pickle). We never initialise torch.distributed; a
   guard replaces the ``dist`` name in those two modules so any path we did not port
   raises at once instead of silently opening a plaintext gloo group.
3. The hooks `install_communicator` / `install_ttp_client` swap in our TLS transport
   (``mpc.comm``) at the two names CrypTen looks up at call time.
4. CrypTen keeps a session's state process-wide: its PRG seeds (``crypten.generators``)
   and, while sigmoid/softmax/reciprocal run, temporary settings (``cfg.temp_override``
   swaps the one global config and puts it back). A party serves several sessions at once,
   one compute thread each (``mpc.party``), so both are made per thread here: otherwise
   one session reseeds another's generators, or ends another's override mid-reciprocal,
   and the two parties of that session silently compute different protocols. (The
   communicator and the TTP client are per thread in ``mpc.comm``.)

``crypten.nn.from_pytorch`` (which would need ``torch.onnx.export(dynamo=False)``) is never
used: parties run the model as explicit MPCTensor operations (``mpc.party``).
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


def _alias_onnx_registration() -> bool:
    """Shim 1. Returns whether the alias was needed (the old module path is gone)."""
    try:
        importlib.import_module(_OLD_REGISTRATION)
        return False
    except ModuleNotFoundError:
        pass
    new = importlib.import_module(_NEW_REGISTRATION)
    sys.modules[_OLD_REGISTRATION] = new
    torch.onnx._internal.registration = new  # type: ignore[attr-defined]
    return True


REGISTRATION_ALIASED = _alias_onnx_registration()

import crypten  # noqa: E402
import crypten.communicator as crypten_comm  # noqa: E402
import crypten.communicator.distributed_communicator as crypten_dist_comm  # noqa: E402
import crypten.mpc.provider.ttp_provider as crypten_ttp  # noqa: E402
from crypten.config.config import CrypTenConfig  # noqa: E402


class DistributedGuard:
    """Stands in for ``torch.distributed`` inside CrypTen's gloo communicator and TTP code."""

    def __getattr__(self, name: str) -> Any:
        if name in ("ReduceOp",):
            return getattr(torch.distributed, name)
        raise RuntimeError(
            f"CrypTen called torch.distributed.{name} directly; ztgate's MPC never uses "
            "torch.distributed (no TLS, no timeouts, pickle): port that path to mpc.comm"
        )


GUARD = DistributedGuard()
crypten_dist_comm.dist = GUARD
crypten_ttp.dist = GUARD

ORIGINAL_COMMUNICATOR: type = crypten_comm.DistributedCommunicator
ORIGINAL_TTP_CLIENT: type = crypten_ttp.TTPClient


class PerThreadMap(MutableMapping[Any, Any]):
    """Shim 4a: a mapping each thread sees its own copy of (one session's generators)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _own(self) -> dict[Any, Any]:
        own: dict[Any, Any] | None = getattr(self._local, "map", None)
        if own is None:
            own = self._local.map = {}
        return own

    def __getitem__(self, key: Any) -> Any:
        return self._own()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._own()[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._own()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._own()))

    def __len__(self) -> int:
        return len(self._own())


_overrides = threading.local()


class PerThreadConfig(CrypTenConfig):  # type: ignore[misc]
    """Shim 4b: ``cfg.temp_override`` applies to the calling thread only.

    The settings themselves stay process-wide (`configure` sets them once, before any
    session); only an override in progress is per thread."""

    @property
    def config(self) -> Any:
        override = getattr(_overrides, "config", None)
        return override if override is not None else self.__dict__["config"]

    @config.setter
    def config(self, value: Any) -> None:
        self.__dict__["config"] = value

    @contextmanager
    def temp_override(self, override_dict: dict[str, Any]) -> Iterator[None]:
        from omegaconf import OmegaConf

        before = getattr(_overrides, "config", None)
        update = OmegaConf.from_dotlist([f"{k}={v}" for k, v in override_dict.items()])
        _overrides.config = OmegaConf.merge(self.config, update)
        try:
            yield
        finally:
            _overrides.config = before


def _state_per_thread() -> None:
    """Shim 4, applied at import: CrypTen reads ``generators[kind][device]`` and ``cfg``
    at call time, so replacing the inner maps and the config's class reaches every use."""
    for kind in list(crypten.generators):
        if not isinstance(crypten.generators[kind], PerThreadMap):
            crypten.generators[kind] = PerThreadMap()
    crypten.cfg.__class__ = PerThreadConfig


_state_per_thread()


def install_communicator(cls: type) -> None:
    """Shim 3a: ``crypten.communicator.get()`` now returns ``cls.get()``."""
    crypten_comm.DistributedCommunicator = cls


def install_ttp_client(cls: type) -> None:
    """Shim 3b: CrypTen's TTP provider now asks ``cls.get()`` for its tuples."""
    crypten_ttp.TTPClient = cls


def configure() -> None:
    """Per-process CrypTen settings every party and the dealer use."""
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.encoder.precision_bits = 16
    crypten.cfg.communicator.verbose = False


__all__ = [
    "GUARD",
    "ORIGINAL_COMMUNICATOR",
    "ORIGINAL_TTP_CLIENT",
    "REGISTRATION_ALIASED",
    "PerThreadConfig",
    "PerThreadMap",
    "configure",
    "crypten",
    "crypten_comm",
    "crypten_dist_comm",
    "crypten_ttp",
    "install_communicator",
    "install_ttp_client",
]
