"""Choose the state store from configuration."""

from __future__ import annotations

from pathlib import Path

from gateway.state import StateStore

__all__ = ["REVOCATIONS_FILE", "open_store"]

REVOCATIONS_FILE = "revocations.jsonl"


def open_store(redis_url: str | None, data_dir: Path, timeout_s: float = 0.5) -> StateStore:
    """A `RedisStore` when a URL is configured, else a `MemoryStore` whose revocations
    persist under `data_dir` (they must survive a restart; the rest is soft state).

    Does no network I/O: a Redis that is down shows up as `StoreUnavailable` on first use
    (or `ping()` False), so the gateway can start and report it rather than crash-loop.
    """
    if redis_url:
        # Imported here so that a gateway without Redis never imports redis-py.
        from gateway.state.redis import RedisStore

        return RedisStore(redis_url, timeout_s=timeout_s)
    from gateway.state.memory import MemoryStore

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return MemoryStore(revocations_path=data_dir / REVOCATIONS_FILE)
