"""The dealer's plan: what the gateway hands its dealer process on stdin (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DealerPlan:
    session: str
    trust_domain: str
    parties: tuple[str, ...]  # SPIFFE ID by rank
    cert: Path
    key: Path
    node_ca: Path
    host: str
    port: int
    message_timeout_s: float
    setup_timeout_s: float
    record_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "trust_domain": self.trust_domain,
            "parties": list(self.parties),
            "cert": str(self.cert),
            "key": str(self.key),
            "node_ca": str(self.node_ca),
            "host": self.host,
            "port": self.port,
            "message_timeout_s": self.message_timeout_s,
            "setup_timeout_s": self.setup_timeout_s,
            "record_dir": str(self.record_dir) if self.record_dir else None,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DealerPlan:
        return cls(
            session=str(raw["session"]),
            trust_domain=str(raw["trust_domain"]),
            parties=tuple(str(p) for p in raw["parties"]),
            cert=Path(raw["cert"]),
            key=Path(raw["key"]),
            node_ca=Path(raw["node_ca"]),
            host=str(raw["host"]),
            port=int(raw["port"]),
            message_timeout_s=float(raw["message_timeout_s"]),
            setup_timeout_s=float(raw["setup_timeout_s"]),
            record_dir=Path(raw["record_dir"]) if raw.get("record_dir") else None,
        )
