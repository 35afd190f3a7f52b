"""`ztgate serve`: run the gateway from its TOML config."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from gateway.cli import UsageError
from gateway.config import ConfigError, load_config


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gateway (mTLS API + admin listener)")
    p.add_argument("--config", type=Path, required=True, help="gateway TOML config")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from gateway import runtime

    try:
        cfg = load_config(args.config)
        if args.check:
            runtime.build_gateway(cfg)
            print(f"{args.config}: OK ({cfg.mode} mode, {len(cfg.nodes)} nodes)")
            return 0
        # Logs, evidence and state hold clients' data: nothing the gateway writes is
        # readable by another user of the host.
        os.umask(0o077)
        runtime.run(cfg)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    return 0
