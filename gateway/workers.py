"""What every worker process the gateway spawns does first: ignore Ctrl-C (the gateway shuts
its pools down, after their in-flight work) and exit when the gateway is gone."""

from __future__ import annotations

import os
import signal
import threading
import time

# How often a worker checks that the gateway that spawned it is still there.
ORPHAN_POLL_S = 0.5


def exit_when_orphaned(parent: int) -> None:
    # When the gateway dies without shutting a pool down (SIGKILL, OOM killer), workers
    # would wait on the call queue forever: each holds the queue's write end itself, so
    # they never see EOF. Reparenting is the one sign that always comes. (Not
    # PR_SET_PDEATHSIG: it fires when the forking *thread* ends, and the executor forks
    # from whichever thread submits.)
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    os._exit(1)


def init_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=exit_when_orphaned, args=(parent,), name="orphan-watch", daemon=True
    ).start()
