"""The policy the gateway runs now, and how it changes: validate first, swap atomically.

The gateway never runs with no policy or a half-loaded one: a new policy set (a changed
directory in dev mode, a signed bundle in production) is loaded and checked off to the
side and swapped in whole; a rejected one leaves the last-known-good set in place and is
logged loudly, with the reason, and counted (`rejected`, the metric
ztgate_policy_rejected_reloads_total).

Editors save files in steps (truncate, write, write), so in dev mode the watcher sees
policy that is cut short. Four things keep such a state from ever deciding a request:
a cut mid-rule fails to parse; a cut between rules drops rules, and dropping a forbid is
refused unless the new set carries a `@removes` marker naming it (dropping a permit only
denies more); a directory with example requests (tests/DENY) must deny every one of them;
and the watcher judges the directory only once it has stayed unchanged for one poll and
did not change while it was read.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, ConfigError, NodeConfig
from gateway.files import atomic_write
from gateway.policy.engine import PolicyEngine
from gateway.policy.facts import ModelFacts, NodeFacts, Rate
from gateway.policy.golden import run_goldens
from gateway.policy.source import (
    Finding,
    PolicyError,
    PolicySource,
    load_policy_dir,
    removal_refusal,
    unmarked_removals,
)
from gateway.registry import ModelEntry

log = logging.getLogger(__name__)

# Under the gateway's data_dir: the last bundle accepted through /admin/reload.
ACCEPTED_BUNDLE = Path("policy") / "accepted-bundle.json"


@dataclass(frozen=True)
class Loaded:
    engine: PolicyEngine
    origin: str  # "dir:<path>" or "bundle:<path> v<N>"
    version: int = 0  # bundle version; 0 for an unsigned directory
    staleness_budget_s: float | None = None  # the bundle's revocation staleness budget
    # Run once LivePolicy has accepted this policy, never before: what a loader remembers
    # (a bundle's rollback floor, the file read at the next start) must not be a policy
    # that a later check refused.
    commit: Callable[[], None] | None = None
    # The nodes as this policy's facts say they are (signed_nodes): what routing, the
    # verifiers and receipts read a node's identity, region and provider from.
    nodes: tuple[NodeConfig, ...] = ()


def model_facts(entries: Mapping[str, ModelEntry], cfg: Config) -> dict[str, ModelFacts]:
    return {
        name: ModelFacts(
            name=name,
            classification=entry.classification,
            owner=cfg.policy.model(name).owner,
            residency=cfg.policy.model(name).residency,
            allowed_modes=tuple(entry.allowed_modes),
        )
        for name, entry in entries.items()
    }


def node_facts(nodes: Sequence[NodeConfig]) -> list[NodeFacts]:
    """Dev mode's facts: the config's own word for each node (no officer signed them)."""
    return [
        NodeFacts(n.name, n.region, n.provider, n.trust, n.dns_name, n.spiffe_id, n.site)
        for n in nodes
    ]


def unsigned_nodes(nodes: Sequence[NodeConfig]) -> tuple[NodeConfig, ...]:
    """Dev mode: the config is the facts, so it must name each node's certificate."""
    from gateway.policy.bundle import node_identity_problems

    problems = [p for n in nodes for p in node_identity_problems(node_facts([n])[0])]
    if problems:
        raise ConfigError(
            "[[nodes]] with an unsigned policy directory must give each node's dns_name "
            "and spiffe_id (its certificate's DNS SAN and SPIFFE ID): " + "; ".join(problems)
        )
    return tuple(nodes)


def signed_nodes(nodes: Sequence[NodeConfig], facts: Sequence[NodeFacts]) -> tuple[NodeConfig, ...]:
    """Each configured node as the signed facts say it is: ConfigError where they disagree.

    gateway.toml is not signed, so it only says where a node is (address, mpc_address)
    and what it serves (models, labels). Its name must be in the facts, and a dns_name or
    spiffe_id it gives must be the signed one; region, provider and trust are always taken
    from the facts (a disagreement there is logged, the signed value wins). A node the
    facts do not list is refused rather than left out: a config the officer never saw
    should stop the gateway, not quietly shrink it.
    """
    signed = {f.name: f for f in facts}
    out = []
    problems = []
    for i, node in enumerate(nodes):
        where = f"nodes[{i}] ({node.name})"
        fact = signed.get(node.name)
        if fact is None:
            problems.append(
                f"{where}: the signed policy bundle has no node {node.name!r}; have the "
                "officer sign facts for it (ztgate policy bundle sign --nodes) or remove "
                "the entry (signed nodes: " + (", ".join(sorted(signed)) or "none") + ")"
            )
            continue
        for key in ("dns_name", "spiffe_id"):
            mine, theirs = getattr(node, key), getattr(fact, key)
            if mine and mine != theirs:
                problems.append(
                    f"{where}: {key} {mine!r} disagrees with the signed {theirs!r}; set it "
                    f"to {theirs!r} or remove it (the bundle decides which certificate "
                    "answers for a node), or have the officer re-sign the facts"
                )
        for key in ("region", "provider", "trust"):
            mine, theirs = getattr(node, key), getattr(fact, key)
            if mine != theirs:
                log.warning(
                    "node %s: gateway.toml says %s %r, the signed bundle %r: using the bundle's",
                    node.name,
                    key,
                    mine,
                    theirs,
                )
        out.append(
            dataclasses.replace(
                node,
                dns_name=fact.dns_name,
                spiffe_id=fact.spiffe_id,
                region=fact.region,
                provider=fact.provider,
                trust=fact.trust,
                site=fact.site,
            )
        )
    if problems:
        raise ConfigError(
            "[[nodes]] disagree with the signed policy bundle: " + "; ".join(problems)
        )
    return tuple(out)


def pin_changes(old: Sequence[NodeConfig], new: Sequence[NodeConfig]) -> list[str]:
    """What a reload would change in the node set or its pins (empty: nothing).

    Node channels are pinned once, at start; a bundle that names other nodes or other
    certificates is loaded by a restart, so no channel is ever half re-pinned.
    """
    before = {n.name: (n.dns_name, n.spiffe_id) for n in old}
    after = {n.name: (n.dns_name, n.spiffe_id) for n in new}
    out = [f"node {name} is no longer configured" for name in sorted(set(before) - set(after))]
    out += [f"node {name} is new" for name in sorted(set(after) - set(before))]
    out += [
        f"node {name}: dns_name/spiffe_id {before[name]} -> {after[name]}"
        for name in sorted(set(before) & set(after))
        if before[name] != after[name]
    ]
    return out


class LivePolicy:
    """Holds the current engine; `reload()` replaces it only with one that loaded cleanly."""

    def __init__(
        self,
        load: Callable[[bytes | None], Loaded],
        watch: Sequence[Path] = (),
    ) -> None:
        self._load = load
        self._watch = tuple(watch)
        self._stamp = self._stat()  # the directory as last judged
        self._seen = self._stamp  # the directory at the last poll
        self.current = load(None)  # at start a bad policy is fatal: never serve without one
        if self.current.commit is not None:
            self.current.commit()
        # Called with each policy that replaced the current one (the runtime hands the
        # new signed node facts to routing); never with one that was refused.
        self.listeners: list[Callable[[Loaded], None]] = []
        self.rejected = 0
        self.last_error: str | None = None
        # What kind of refusal the last rejected reload was: a bundle Reason such as
        # "rollback" (gateway/policy/bundle.py), or "refused" / "invalid-policy" for the
        # rest. None after a reload that took effect. The admin API maps it to a problem.
        self.last_rejection: str | None = None
        log.warning("policy loaded: %s (hash %s)", self.current.origin, self.engine.source.hash)

    @property
    def engine(self) -> PolicyEngine:
        return self.current.engine

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        stamps = []
        for root in self._watch:
            paths = sorted(root.rglob("*")) if root.is_dir() else [root]
            for p in paths:
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                stamps.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def changed(self) -> bool:
        """True once per settled change: the watched files differ from when they were
        last judged and are the same as at the previous poll. A save under way usually
        changes them from one poll to the next, so it is waited out rather than refused;
        whatever settles half-written is still judged by everything `reload` checks."""
        stamp = self._stat()
        settled, self._seen = stamp == self._seen, stamp
        if stamp == self._stamp or not settled:
            return False
        self._stamp = stamp
        return True

    def reload(self, bundle: bytes | None = None) -> bool:
        """Load anew (from `bundle` if given); True when the new policy took effect."""
        try:
            before = self._stat()
            fresh = self._load(bundle)
            if bundle is None and self._stat() != before:
                # Files changed while they were read: what loaded may mix old and new.
                # The watcher sees the change and judges the directory again.
                raise ReloadRefused("the policy files changed while they were read")
            missing = unmarked_removals(self.engine.source, fresh.engine.source)
            if missing:
                raise ReloadRefused(removal_refusal(missing))
            repinned = pin_changes(self.current.nodes, fresh.nodes)
            if repinned:
                raise ReloadRefused(
                    "the node set or a node's certificate identity changed ("
                    + "; ".join(repinned)
                    + "): node channels are pinned at start, so restart the gateway with it"
                )
            if fresh.commit is not None:
                fresh.commit()
        except (PolicyError, ReloadRefused, OSError, ValueError, ConfigError) as exc:
            self.rejected += 1
            self.last_error = str(exc)
            self.last_rejection = (
                exc.reason
                if isinstance(exc, ReloadRefused)
                else "invalid-policy"
                if isinstance(exc, PolicyError)
                else "refused"
            )
            log.error(
                "policy reload REJECTED, keeping %s (hash %s): %s",
                self.current.origin,
                self.engine.source.hash,
                exc,
            )
            return False
        self.current = fresh
        self.last_rejection = None
        log.warning("policy reloaded: %s (hash %s)", fresh.origin, fresh.engine.source.hash)
        for listener in self.listeners:
            listener(fresh)
        return True


class ReloadRefused(Exception):
    """A policy that loaded but must not replace the current one (older, untrusted, ...).

    `reason` says which kind: a bundle refusal Reason ("rollback", "untrusted-key",
    "too-few-signatures", ...) or "refused" for the other checks."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


def engine_for(
    source: PolicySource,
    models: Mapping[str, ModelFacts],
    nodes: Sequence[NodeFacts],
    cfg: Config,
) -> PolicyEngine:
    return PolicyEngine(
        source, models=models, nodes=nodes, default_rate=Rate.parse(cfg.policy.default_rate)
    )


def load_checked_dir(directory: Path) -> PolicySource:
    """`load_policy_dir`, then the directory's DENY example requests (tests/DENY/*.json,
    if there are any): a set that allows one of them never loads.

    Only DENY failures refuse: an example under ALLOW that the new set denies is logged,
    because refusing would keep the old set, which may lack a forbid the edit just added.
    """
    source = load_policy_dir(directory)
    if not (directory / "tests").is_dir():
        return source
    report = run_goldens(source)
    findings = [
        Finding(f"tests/{c.file}", 1, None, None, f"example request: {c.problem}")
        for c in report.cases
        if not c.ok and c.expected == "DENY"
    ]
    if findings:
        raise PolicyError(findings)
    for c in report.cases:
        if not c.ok:
            log.warning("policy %s: example tests/%s fails: %s", directory, c.file, c.problem)
    return source


def dir_loader(cfg: Config, entries: Mapping[str, ModelEntry]) -> Callable[[bytes | None], Loaded]:
    """Dev mode: an unsigned directory; facts from the registry and the config."""
    assert cfg.policy.dir is not None
    directory = cfg.policy.dir

    def load(bundle: bytes | None) -> Loaded:
        if bundle:
            raise ReloadRefused("this gateway reads an unsigned policy directory (dev mode)")
        log.warning("DEV-ONLY: loading UNSIGNED policy directory %s", directory)
        nodes = unsigned_nodes(cfg.nodes)
        source = load_checked_dir(directory)
        engine = engine_for(source, model_facts(entries, cfg), node_facts(nodes), cfg)
        return Loaded(engine, f"dir:{directory}", nodes=nodes)

    return load


def bundle_loader(
    cfg: Config, entries: Mapping[str, ModelEntry]
) -> Callable[[bytes | None], Loaded]:
    """Signed bundles: the policy AND the facts it decides on come from the bundle,
    including each node's certificate identity, region and provider (signed_nodes).

    Only bundles signed by `policy.signatures_required` distinct configured officer
    keys load, never one older than the running one (rollback), never one that needs a
    newer gateway.

    The officer's file (`policy.bundle`) is only ever read. A bundle posted to
    /admin/reload and accepted is kept in the gateway's own data dir
    (`<data_dir>/policy/accepted-bundle.json`, ACCEPTED_BUNDLE), so a restart keeps it:
    at start the gateway loads whichever of the two verifies with the higher version.
    """
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from gateway import __version__
    from gateway.keyid import signing_key_id
    from gateway.policy.bundle import BundleResult, verify_bundle

    assert cfg.policy.bundle is not None
    path = cfg.policy.bundle
    keys: dict[str, Ed25519PublicKey] = {}
    for key_path in cfg.policy.officer_keys:
        key = load_pem_public_key(Path(key_path).read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ReloadRefused(f"{key_path} is not an Ed25519 public key")
        keys[signing_key_id(key)] = key
    state: dict[str, object] = {"version": 0, "hash": ""}
    required = getattr(cfg.policy, "signatures_required", 1)
    accepted = Path(cfg.data_dir) / ACCEPTED_BUNDLE

    def verify(data: bytes) -> BundleResult:
        return verify_bundle(
            data,
            keys,
            now=dt.datetime.now(dt.UTC),
            running_version=__version__,
            min_version=int(str(state["version"])),
            required=required,
        )

    def load(bundle: bytes | None) -> Loaded:
        data = path.read_bytes() if bundle is None else bundle
        result = verify(data)
        if bundle is None and accepted.is_file():
            # A bundle pushed earlier: it wins over the officer's file when it verifies
            # and is newer (an expired or refused one is skipped, never fatal).
            pushed = verify(accepted.read_bytes())
            if (
                pushed.ok
                and pushed.bundle is not None
                and (
                    not result.ok
                    or result.bundle is None
                    or pushed.bundle.version > result.bundle.version
                )
            ):
                result = pushed
            elif not pushed.ok:
                log.warning("ignoring %s: %s", accepted, pushed)
        if not result.ok or result.bundle is None or result.source is None:
            raise ReloadRefused(f"{result.reason}: {result.message}", result.reason or "refused")
        b = result.bundle
        if b.version == state["version"] and result.source.hash != state["hash"]:
            raise ReloadRefused(
                f"version {b.version} is already loaded with other content", "rollback"
            )
        missing = sorted(set(entries) - {m.name for m in b.facts.models})
        if missing:
            log.warning("models without facts in the bundle are denied: %s", ", ".join(missing))
        nodes = signed_nodes(cfg.nodes, b.facts.nodes)
        engine = engine_for(result.source, {m.name: m for m in b.facts.models}, b.facts.nodes, cfg)
        policy_hash = result.source.hash

        def commit() -> None:
            if bundle is not None:
                # Survive a restart, in the gateway's own data dir: the officer's file
                # is never written (it may be on a read-only mount, and it is theirs).
                accepted.parent.mkdir(parents=True, exist_ok=True)
                # A replica's workers share the file (gateway/supervisor.py), each judging
                # a push by its own running version: under the lock, an older bundle (or
                # another one of the same version) never replaces the one kept there.
                lock = accepted.with_name(".accepted.lock")
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    kept = verify(accepted.read_bytes()) if accepted.is_file() else None
                    if kept is not None and kept.bundle is not None and kept.source is not None:
                        v, same = kept.bundle.version, kept.source.hash == policy_hash
                        if v > b.version or (v == b.version and not same):
                            raise ReloadRefused(
                                f"this replica keeps version {v} (pushed to another worker)",
                                "rollback",
                            )
                    atomic_write(accepted, data, mode=None)
                finally:
                    os.close(fd)  # releases the lock
            state["version"], state["hash"] = b.version, policy_hash

        return Loaded(
            engine,
            f"bundle:{path} v{b.version} by {b.signer_key_id}",
            b.version,
            float(b.staleness_budget_s),
            commit,
            nodes,
        )

    return load
