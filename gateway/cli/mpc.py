"""`ztgate mpc party|dealer`: the two MPC processes (torch/CrypTen load only when run).

``ztgate mpc party --name N --cert C --key K --node-ca PEM --gateway-ca PEM --listen
host:port`` runs a node's party worker with the node's own certificate (or ``--pki DIR``,
the development PKI, instead of the four files); sessions come from the site's gateway
only, at most ``--max-sessions`` at once.
``ztgate mpc dealer`` is what the gateway's `MpcSession` starts (plan on stdin); it is
listed for operators who run the dealer under their own supervisor.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    noun = sub.add_parser("mpc", help="MPC party worker (nodes) and dealer (gateway side)")
    verbs = noun.add_subparsers(dest="verb", required=True, metavar="VERB")
    from mpc.worker_args import build_parser

    party = verbs.add_parser("party", help="run this node's MPC party worker")
    build_parser(parser=party)
    party.set_defaults(func=_party)
    dealer = verbs.add_parser("dealer", help="run an MPC dealer (plan as one JSON line on stdin)")
    dealer.set_defaults(func=_dealer)


def _party(args: argparse.Namespace) -> int:
    from gateway.cli import UsageError
    from mpc.worker_args import PartyArgsError, config_from_args

    try:
        config = config_from_args(args)
    except PartyArgsError as exc:
        raise UsageError(str(exc)) from exc
    # Only now torch and CrypTen: a usage error is reported without loading them.
    from mpc.party import run_worker

    return run_worker(config)


def _dealer(args: argparse.Namespace) -> int:
    from mpc.dealer import main

    return main([])
