"""Cedar policy: who may call which model, in which verification mode, on which nodes.

`load_policy_dir` reads and checks a policy directory (`policies/` ships one);
`PolicyEngine` decides requests from it. See policies/README.md for the officer's view.
"""

from __future__ import annotations

from gateway.policy.engine import (
    DEFAULT_RATE,
    AuthzDecision,
    CacheStats,
    InferDecision,
    PairResult,
    PolicyEngine,
    decision_record,
)
from gateway.policy.facts import (
    MODES,
    Grant,
    IdentityFacts,
    InferContext,
    ModelFacts,
    NodeFacts,
    Rate,
    ResourceFacts,
)
from gateway.policy.source import Finding, PolicyError, PolicyInfo, PolicySource, load_policy_dir

__all__ = [
    "DEFAULT_RATE",
    "MODES",
    "AuthzDecision",
    "CacheStats",
    "Finding",
    "Grant",
    "IdentityFacts",
    "InferContext",
    "InferDecision",
    "ModelFacts",
    "NodeFacts",
    "PairResult",
    "PolicyEngine",
    "PolicyError",
    "PolicyInfo",
    "PolicySource",
    "Rate",
    "ResourceFacts",
    "decision_record",
    "load_policy_dir",
]
