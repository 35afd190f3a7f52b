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

``crypten.nn.from_pytorch`` (which would need ``torch.onnx.export(dynamo=False)``) is never
used: parties run the model as explicit MPCTensor operations (``mpc.party``).
"""

from __future__ import annotations

import importlib
import sys
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
    "configure",
    "crypten",
    "crypten_comm",
    "crypten_dist_comm",
    "crypten_ttp",
    "install_communicator",
    "install_ttp_client",
]
