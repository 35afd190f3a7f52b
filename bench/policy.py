"""Policy decision latency: `PolicyEngine.decide_infer` on the shipped policies.

Run: ``.venv/bin/python bench/policy.py [--requests 20000] [--dir policies]``

Every call decides 4 modes x 3 nodes (12 Cedar requests) for one inference request.

* ``hit``          the same request again: every (mode, node) comes from the cache.
* ``miss``         cache cleared before each call: one batched Cedar call (plus a second
                   when redundant/mpc must re-count providers), with the schema checking
                   each request (the default).
* ``miss-nocheck`` the same without handing Cedar the schema per call, for comparison.
* ``mix``          a realistic stream: 40 callers (apps, analysts, org-rule clients), each
                   with its own batch size, purpose, payload size and two models; a node
                   occasionally ejected, the hour moving through a working day, a
                   revocation bump every 5000 requests.
* ``mix-uniform``  the worst case: the same, but batch size, purpose, payload size and
                   model drawn afresh for every request.

Prints p50/p99 in microseconds and the mix's cache hit rate (per (mode, node) pair).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from gateway.policy import (
    IdentityFacts,
    InferContext,
    ModelFacts,
    NodeFacts,
    PolicyEngine,
    load_policy_dir,
)

NODES = [
    NodeFacts("n1", "eu-west", "prov-a", 1),
    NodeFacts("n2", "eu-central", "prov-b", 1),
    NodeFacts("n3", "eu-north", "prov-c", 0),
]
MODELS = {
    "iris": ModelFacts("iris", "public", "", ("eu-",), ("none", "redundant", "zk", "mpc")),
    "mnist": ModelFacts("mnist", "internal", "", ("*",), ("none", "redundant")),
    "credit": ModelFacts("credit", "confidential", "", ("eu-",), ("redundant", "zk", "mpc")),
    "health": ModelFacts("health", "restricted", "", ("eu-",), ("mpc",)),
}
CLIENT = "spiffe://ztgate.local/client/"
NOON = dt.datetime(2025, 1, 1, 12, tzinfo=dt.UTC)


def percentiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49], q[98]


def timed(n: int, call: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter_ns()
        call(i)
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def callers(rng: random.Random) -> list[IdentityFacts]:
    named = ["demo", "alice", "carol"]
    out = [IdentityFacts(CLIENT + n, n) for n in named]
    for i in range(37):  # org-rule clients: Acme apps, some in Risk (analysts)
        unit = "Risk" if i % 4 == 0 else "Sales"
        out.append(IdentityFacts(f"{CLIENT}svc{i}", f"svc{i}", "Acme", unit, "", str(i)))
    rng.shuffle(out)
    return out


def mix(engine: PolicyEngine, n: int, rng: random.Random, profiles: bool) -> list[float]:
    """`profiles`: each caller keeps its own batch size, purpose, payload size and
    models (how services behave); otherwise every attribute is drawn per request."""
    who = callers(rng)
    weights = [1 / (k + 1) for k in range(len(who))]  # a few busy callers, a long tail
    models = list(MODELS)
    sizes = [512, 2048, 16_384, 16_384, 60_000, 300_000, 3_000_000]
    batches = [1, 1, 1, 4, 8, 16, 32]
    purposes = ["", "", "", "fraud review"]
    profile = {
        c.spiffe_id: (
            rng.choice(batches),
            rng.choice(purposes),
            rng.choice(sizes),
            rng.sample(models, 2),
        )
        for c in who
    }
    all_nodes = [x.name for x in NODES]
    plan = []
    for i in range(n):
        caller = rng.choices(who, weights)[0]
        batch, purpose, size, mine = profile[caller.spiffe_id]
        if not profiles:
            batch, purpose, size = rng.choice(batches), rng.choice(purposes), rng.choice(sizes)
            mine = models
        nodes = all_nodes if rng.random() > 0.05 else rng.sample(all_nodes, 2)
        hour = 8 + (i * 10) // n  # 08:00 to 17:59 over the run
        now = dt.datetime(2025, 1, 1, hour, rng.randrange(60), tzinfo=dt.UTC)
        ctx = InferContext(batch_size=batch, payload_bytes=size, purpose=purpose, now=now)
        model = rng.choices(mine, [8, 4, 2, 1][: len(mine)])[0]
        plan.append((caller, model, ctx, nodes, i // 5000))
    engine.clear_cache()
    return timed(n, lambda i: engine.decide_infer(*plan[i]))


def many_policies(root: Path, n: int) -> tuple[Path, Path]:
    """Two policy directories of `n` rules (the shipped set plus generated per-team
    permits over groups, models, modes and regions); the second widens one of them."""
    import json as _json
    import shutil as _shutil

    src = Path(__file__).resolve().parent.parent / "policies"
    out = []
    for name in ("old", "new"):
        d = root / name
        _shutil.copytree(src, d, ignore=_shutil.ignore_patterns("tests", "README.md"))
        ids = _json.loads((d / "identities.json").read_text())
        rules = []
        shipped = sum(t.count("@id(") for t in (p.read_text() for p in src.glob("*.cedar")))
        for i in range(max(0, n - shipped)):
            team, mode = f"team{i % 40}", ("none", "redundant", "zk", "mpc")[i % 4]
            limit = 64 if (name == "new" and i == 7) else 32
            rules.append(
                f'@id("gen-{i}")\npermit (principal in Ztgate::Group::"{team}", '
                'action == Ztgate::Action::"infer", resource)\n'
                f'when {{ resource.classification == "{("public", "internal")[i % 2]}" && '
                f'context.mode == "{mode}" && context.batch_size < {limit} && '
                f'context.node.region like "r{i % 7}-*" }};\n'
            )
            ids["organizations"].append({"organization": f"Org{i % 40}", "groups": [team]})
        (d / "60-generated.cedar").write_text("\n".join(rules))
        (d / "identities.json").write_text(_json.dumps(ids))
        out.append(d)
    return out[0], out[1]


def diff_figure(n: int = 200) -> float:
    """Seconds `ztgate policy diff`'s analysis takes on `n` rules with one widening."""
    import tempfile

    from gateway.policy import load_policy_dir
    from gateway.policy.semantic import semantic_diff

    with tempfile.TemporaryDirectory() as tmp:
        old, new = many_policies(Path(tmp), n)
        a, b = load_policy_dir(old), load_policy_dir(new)
        start = time.perf_counter()
        diff = semantic_diff(a, b)
        took = time.perf_counter() - start
        assert diff.newly_allowed and diff.complete
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--dir", type=Path, default=Path("policies"))
    args = ap.parse_args()
    n = args.requests
    source = load_policy_dir(args.dir)
    engine = PolicyEngine(source, models=MODELS, nodes=NODES)
    nocheck = PolicyEngine(source, models=MODELS, nodes=NODES, check_requests=False)
    demo = IdentityFacts(CLIENT + "demo", "demo")
    ctx = InferContext(1, 1024, "", NOON)
    nodes = [x.name for x in NODES]

    def miss(e: PolicyEngine) -> Callable[[int], object]:
        def call(_: int) -> object:
            e.clear_cache()
            return e.decide_infer(demo, "iris", ctx, nodes)

        return call

    rows = []
    engine.decide_infer(demo, "iris", ctx, nodes)
    rows.append(("hit", timed(n, lambda _: engine.decide_infer(demo, "iris", ctx, nodes))))
    rows.append(("miss", timed(max(n // 20, 200), miss(engine))))
    rows.append(("miss-nocheck", timed(max(n // 20, 200), miss(nocheck))))
    rates = []
    for name, profiles in (("mix", True), ("mix-uniform", False)):
        rows.append((name, mix(engine, n, random.Random(7), profiles)))
        rates.append((name, engine.stats()))

    print(f"policy decide_infer, {len(source.policies)} policies, 4 modes x {len(nodes)} nodes")
    print(f"python {platform.python_version()} on {platform.machine()}, {n} requests\n")
    print(f"{'case':<14}{'calls':>8}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}")
    for name, samples in rows:
        p50, p99 = percentiles(samples)
        print(
            f"{name:<14}{len(samples):>8}{p50:>10.1f}{p99:>10.1f}{statistics.fmean(samples):>10.1f}"
        )
    print()
    for name, stats in rates:
        print(
            f"{name} cache: {stats.hits} hits, {stats.misses} misses (per mode x node pair), "
            f"hit rate {stats.hit_rate:.1%}, {stats.size} entries"
        )


if __name__ == "__main__":
    main()
