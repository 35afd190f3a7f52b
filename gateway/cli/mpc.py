"""`ztgate mpc party|dealer`: the two MPC processes (torch/CrypTen load only when run).

``ztgate mpc party --name N --pki DIR --listen host:port`` runs a node's party worker
with the node's own certificate; sessions come from the site's gateway only.
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
    from mpc.party import run_worker
    from mpc.worker_args import config_from_args

    return run_worker(config_from_args(args))


def _dealer(args: argparse.Namespace) -> int:
    from mpc.dealer import main

    return main([])
