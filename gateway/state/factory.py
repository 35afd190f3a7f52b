"""Choose the state store from configuration."""

from __future__ import annotations

from pathlib import Path

from gateway.state import StateStore

__all__ = ["REVOCATIONS_FILE", "open_store"]

REVOCATIONS_FILE = "revocations.jsonl"


def open_store(
    redis_url: str | None, data_dir: Path, timeout_s: float = 0.5, *, processes: int = 1
) -> StateStore:
    """A `RedisStore` when a URL is configured; else, for a replica of several worker
    processes (`processes` > 1), one `SqliteStore` under `data_dir` that all of them share;
    else a `MemoryStore` whose revocations persist under `data_dir` (they must survive a
    restart; the rest is soft state).

    Does no network I/O: a Redis that is down shows up as `StoreUnavailable` on first use
    (or `ping()` False), so the gateway can start and report it rather than crash-loop.
    """
    if redis_url:
        # Imported here so that a gateway without Redis never imports redis-py.
        from gateway.state.redis import RedisStore

        return RedisStore(redis_url, timeout_s=timeout_s)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if processes > 1:
        from gateway.state.sqlite import STATE_FILE, SqliteStore

        return SqliteStore(data_dir / STATE_FILE, timeout_s=timeout_s)
    from gateway.state.memory import MemoryStore

    return MemoryStore(revocations_path=data_dir / REVOCATIONS_FILE)
