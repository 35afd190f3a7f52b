"""Lie accounting: the test of docs/reputation.md on a simulated store, and its mechanism.

The statistics run the real `Reputation` and `SpotChecks` code against a `MemoryStore`
with simulated nodes (a check's outcome drawn as docs/reputation.md models it); the bounds
asserted are the ones derived there before the code.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from gateway.config import NodeConfig, Routing
from gateway.policy import (
    InferContext,
    ModelFacts,
    NodeFacts,
    PolicyEngine,
    PolicyError,
    load_policy_dir,
)
from gateway.policy.facts import SpotCheckRate
from gateway.receipts.late import final_status, late_evidence, verify_late_evidence
from gateway.receipts.signing import KeySet, Signer
from gateway.routing.reputation import Reputation, Sampling, Sprt, node_subject
from gateway.routing.router import Router
from gateway.state.memory import MemoryStore
from gateway.verify.spotcheck import SpotChecks
from tests import test_policy


def node(name: str, provider: str) -> NodeConfig:
    return NodeConfig(name, "127.0.0.1:1", "eu-west", provider, spiffe_id=f"spiffe://t/node/{name}")


LIAR, CHECKER, TIEBREAK = node("liar", "prov-a"), node("b", "prov-b"), node("c", "prov-c")


async def simulate(
    lie_rate: float,
    requests: int,
    seed: int,
    *,
    checker_lies: bool = False,
    honest_disagreement: float = 0.0,
) -> int | None:
    """Requests answered by LIAR until it is quarantined; None if it never is.

    Each request is spot-checked at the rate LIAR's reputation sets. The check resolves as
    SpotChecks.check does: checker and answer agree -> both confirmed; else the third
    provider breaks the tie (2-against-1 is evidence; the checker may be the liar)."""
    rng = random.Random(seed)
    rep = Reputation(MemoryStore(), [LIAR, CHECKER, TIEBREAK])
    for i in range(1, requests + 1):
        if rep.quarantined(LIAR):
            return i - 1
        if rng.random() >= rep.rate(LIAR):
            continue
        answer_wrong = rng.random() < lie_rate or rng.random() < honest_disagreement
        checker_wrong = checker_lies
        if answer_wrong == checker_wrong and not answer_wrong:
            await rep.observe(LIAR, "confirmed")
            await rep.observe(CHECKER, "confirmed")
        elif not answer_wrong and checker_wrong:  # the tiebreak sides with the answer
            await rep.observe(CHECKER, "contradicted")
            await rep.observe(LIAR, "confirmed")
            await rep.observe(TIEBREAK, "confirmed")
        elif answer_wrong and not checker_wrong:
            await rep.observe(LIAR, "contradicted")
            await rep.observe(CHECKER, "confirmed")
            await rep.observe(TIEBREAK, "confirmed")
        else:  # both wrong, differently: three answers, no majority; nobody charged
            for n in (LIAR, CHECKER, TIEBREAK):
                await rep.observe(n, "disputed")
    return requests if rep.quarantined(LIAR) else None


def test_the_documented_constants() -> None:
    t = Sprt()
    assert round(t.up, 3) == 3.912 and round(t.down, 4) == -0.0503
    assert round(t.threshold, 2) == 20.72
    # Six contradictions in a row cross the threshold; five do not.
    assert 5 * t.up < t.threshold <= 6 * t.up


def test_a_node_lying_on_every_answer_is_quarantined_within_200_requests() -> None:
    got = [asyncio.run(simulate(1.0, 200, seed)) for seed in range(200)]
    assert all(g is not None and g <= 200 for g in got), got
    assert np.mean([g for g in got if g is not None]) < 60  # derived: about 24


def test_a_node_lying_on_10_percent_is_quarantined_within_2000_requests() -> None:
    got = [asyncio.run(simulate(0.1, 2000, seed)) for seed in range(60)]
    assert all(g is not None and g <= 2000 for g in got), got
    assert np.mean([g for g in got if g is not None]) < 600  # derived: about 240


def test_an_honest_node_is_never_quarantined_in_10000_requests() -> None:
    """Honest, with the assumed honest-disagreement rate p0 (1e-3) on every check."""
    for seed in range(5):
        assert asyncio.run(simulate(0.0, 10_000, seed, honest_disagreement=1e-3)) is None


def test_an_honest_node_next_to_a_lying_checker_is_never_quarantined() -> None:
    """The checker disagrees every time; the tiebreak sides with the honest node, which is
    confirmed, and the checker is the one quarantined."""

    async def run() -> tuple[bool, bool]:
        rep = Reputation(MemoryStore(), [LIAR, CHECKER, TIEBREAK])
        for _ in range(10_000):
            if rep.quarantined(CHECKER):
                break
            await rep.observe(CHECKER, "contradicted")
            await rep.observe(LIAR, "confirmed")
            await rep.observe(TIEBREAK, "confirmed")
        return rep.quarantined(LIAR), rep.quarantined(CHECKER)

    assert asyncio.run(simulate(0.0, 10_000, 1, checker_lies=True)) is None
    assert asyncio.run(run()) == (False, True)


def test_two_parties_disagreeing_charge_nobody() -> None:
    async def run() -> Reputation:
        rep = Reputation(MemoryStore(), [LIAR, CHECKER])
        for _ in range(1000):
            await rep.observe(LIAR, "disputed")
            await rep.observe(CHECKER, "disputed")
        return rep

    rep = asyncio.run(run())
    assert not rep.quarantined(LIAR) and not rep.quarantined(CHECKER)
    assert rep.records[node_subject(LIAR)].statistic == 0.0


def test_a_plain_success_never_erases_evidence_and_new_nodes_start_suspect() -> None:
    async def run() -> tuple[float, float, float]:
        rep = Reputation(MemoryStore(), [LIAR])
        new = rep.rate(LIAR)
        for _ in range(60):
            await rep.observe(LIAR, "confirmed")
        established = rep.rate(LIAR)
        await rep.observe(LIAR, "contradicted")
        for _ in range(2000):
            await rep.observe(LIAR, "confirmed")
        return new, established, rep.rate(LIAR)

    new, established, after = asyncio.run(run())
    s = Sampling()
    assert (new, established, after) == (s.suspect, s.established, s.suspect)


def test_renaming_or_re_enrolling_does_not_shed_the_record() -> None:
    """The record follows the signed identity; a new identity of the same provider is
    quarantined with the provider's record."""

    async def run() -> tuple[bool, bool, bool]:
        store = MemoryStore()
        rep = Reputation(store, [LIAR])
        for _ in range(6):
            await rep.observe(LIAR, "contradicted")
        renamed = NodeConfig(
            "other-name", "127.0.0.1:2", "eu-west", "prov-a", spiffe_id=LIAR.spiffe_id
        )
        fresh = node("liar-2", "prov-a")
        rep2 = Reputation(store, [renamed, fresh])
        await rep2.sync()
        return rep2.quarantined(renamed), rep2.quarantined(fresh), rep.quarantined(LIAR)

    assert asyncio.run(run()) == (True, True, True)


def test_deleting_the_store_record_readmits_nothing(tmp_path: Path) -> None:
    async def run() -> tuple[bool, bool, bool]:
        store = MemoryStore()
        rep = Reputation(store, [LIAR], path=tmp_path / "q.jsonl")
        for _ in range(6):
            await rep.observe(LIAR, "contradicted")
        store._quarantine.clear()  # an operator deletes the key from the store
        again = Reputation(store, [LIAR], path=tmp_path / "q.jsonl")  # a restart
        await again.sync()
        republished = bool(await store.quarantine_records())
        held = again.quarantined(LIAR)
        await again.release("liar", "spiffe://t/officer")
        by_provider = again.quarantined(LIAR)  # its provider's record crossed too
        await again.release("provider:prov-a", "spiffe://t/officer")
        third = Reputation(store, [LIAR], path=tmp_path / "q.jsonl")
        return held and by_provider, republished, third.quarantined(LIAR)

    held, republished, after_release = asyncio.run(run())
    assert held and republished and not after_release


def test_late_evidence_is_signed_and_derives_the_final_status(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    signer = Signer(key)  # type: ignore[arg-type]
    keys = KeySet()
    keys.add(key.public_key(), dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    raw = late_evidence(signer, receipt_id="r1", verdict="contradicted", kind="spot_check")
    doc = verify_late_evidence(raw, keys, "r1")
    assert final_status({"spot_check": "scheduled"}, []) == "pending"
    assert final_status({}, []) is None
    assert final_status({"spot_check": "scheduled"}, [doc]) == "contradicted"
    forged = json.loads(raw)
    forged["verdict"] = "confirmed"
    from gateway.receipts.canonical import canonical_json

    with pytest.raises(ValueError):
        verify_late_evidence(canonical_json(forged), keys, "r1")
    with pytest.raises(ValueError):
        verify_late_evidence(raw, keys, "r2")


def test_evidence_and_quarantine_records_on_redis(redis_server: str) -> None:
    """The same records on Redis (one Lua script per update): counts, the floored
    statistic, a reset that keeps the counts, and quarantine events."""
    from gateway.state.redis import RedisStore

    async def run() -> None:
        store = RedisStore(redis_server, prefix=f"rep-{random.random()}:", timeout_s=3.0)
        try:
            have, stat = await store.add_evidence("node:x", {"checked": 1, "confirmed": 1}, -0.05)
            assert (have, stat) == ({"checked": 1, "confirmed": 1}, 0.0)  # floored at 0
            have, stat = await store.add_evidence("node:x", {"checked": 1, "contradicted": 1}, 3.9)
            assert have == {"checked": 2, "confirmed": 1, "contradicted": 1} and stat == 3.9
            await store.reset_statistic("node:x")
            assert await store.evidence(["node:x", "node:y"]) == {"node:x": (have, 0.0)}
            await store.put_quarantine("node:x", '{"state": "quarantined"}')
            assert await store.quarantine_records() == {"node:x": '{"state": "quarantined"}'}
        finally:
            await store.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- policy's rate

SPOT_POLICIES = """
@id("none-5")
@spot_check("5%")
permit (principal, action == Ztgate::Action::"infer", resource) when { context.mode == "none" };

@id("none-by-standing")
@spot_check("suspect=50%, established=1%, trusted=1%")
permit (principal, action == Ztgate::Action::"infer", resource) when { context.mode == "none" };

@id("zk-all")
@spot_check("100%")
permit (principal, action == Ztgate::Action::"infer", resource) when { context.mode == "zk" };
"""


def _spot_engine(tmp_path: Path, text: str) -> PolicyEngine:
    tmp_path.mkdir()
    source = load_policy_dir(test_policy.policy_dir(tmp_path, {"10-spot.cedar": text}, only=True))
    model = ModelFacts("m", "public", "", ("*",), ("none", "zk"))
    nodes = [NodeFacts("a", "eu-west", "p1"), NodeFacts("b", "eu-west", "p2")]
    return PolicyEngine(source, models={"m": model}, nodes=nodes)


def test_the_strictest_spot_check_of_the_permits_allowing_mode_none_wins(tmp_path: Path) -> None:
    """Per standing, the highest rate among the permits behind an allowed `none` pair; a
    permit that allows only another mode (zk-all) sets nothing for `none`."""
    ctx = InferContext(1, 10, "", test_policy.NOON)
    d = _spot_engine(tmp_path / "a", SPOT_POLICIES).decide_infer(
        test_policy.who("x"), "m", ctx, ["a", "b"]
    )
    assert d.modes == ("none", "zk")
    assert d.spot_check == SpotCheckRate(0.5, 0.05, 0.05)
    # Control, built the same way: without the annotations no floor is set.
    plain = re.sub(r'@spot_check\("[^"]*"\)\n', "", SPOT_POLICIES)
    d = _spot_engine(tmp_path / "b", plain).decide_infer(test_policy.who("x"), "m", ctx, ["a"])
    assert d.modes == ("none", "zk") and d.spot_check is None


@pytest.mark.parametrize(
    "annotation",
    ['@spot_check("0%")', '@spot_check("5")', '@spot_check("suspect=5%")', "FORBID"],
)
def test_bad_spot_checks_are_refused(annotation: str, tmp_path: Path) -> None:
    """Never zero, a percentage, every standing or one for all, on a permit only."""
    rule = '@id("r")\n{}\n{} (principal, action == Ztgate::Action::"infer", resource);\n'
    effect = "permit"
    if annotation == "FORBID":
        annotation, effect = '@spot_check("5%")', "forbid"
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(
            test_policy.policy_dir(
                tmp_path / "bad", {"50-r.cedar": rule.format(annotation, effect)}
            )
        )
    assert [f.policy_id for f in exc.value.findings] == ["r"]
    assert "@spot_check" in str(exc.value)
    # Positive control: a good annotation on a permit loads, with that floor.
    good = load_policy_dir(
        test_policy.policy_dir(
            tmp_path / "good",
            {
                "50-r.cedar": rule.format(
                    '@spot_check("suspect=25%, established=5%, trusted=2%")', "permit"
                )
            },
        )
    )
    assert good.policy("r").spot_check == SpotCheckRate(0.25, 0.05, 0.02)  # type: ignore[union-attr]


def test_config_raises_the_policys_spot_check_rate_but_never_lowers_or_disables_it() -> None:
    """An attacker holding gateway.toml can turn `[reputation] spot_checks` off and set the
    lowest rates; answers are still checked at the rate a signed permit demands."""
    floor = SpotCheckRate(0.5, 0.05, 0.05)
    low = Sampling(suspect=1e-9, established=1e-9, trusted=1e-9)
    high = Sampling(suspect=0.9, established=0.9, trusted=0.9)

    def spot(sampling: Sampling, configured: bool) -> SpotChecks:
        router = Router({}, MemoryStore(), Routing())
        router.reputation = Reputation(MemoryStore(), [LIAR], sampling=sampling)
        return SpotChecks(router, configured=configured, rng=random.Random(7))

    assert spot(low, configured=False).rate(LIAR, floor) == 0.5  # suspect: new node
    assert spot(low, configured=True).rate(LIAR, floor) == 0.5
    assert spot(high, configured=True).rate(LIAR, floor) == 0.9  # config may raise it
    # Control: without a policy floor the config decides, off means off.
    assert spot(low, configured=False).rate(LIAR) == 0.0
    assert not any(spot(high, configured=False).sample(LIAR) for _ in range(100))
    sampled = spot(low, configured=False)
    assert 20 < sum(sampled.sample(LIAR, floor) for _ in range(100)) < 80
