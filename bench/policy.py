"""Policy decision latency: `PolicyEngine.decide_infer` on the shipped policies.

Run: ``.venv/bin/python bench/policy.py [--requests 20000] [--dir policies]``

Every call decides 4 modes x 3 nodes (12 Cedar requests) for one inference request.

* ``hit``          the same request again: every (mode, node) comes from the cache.
* ``miss``         cache cleared before each call: every piece of the policy set asked
                   (engine.py, _pieces), without the schema per request (the default).
* ``miss-check``   the same, handing Cedar the schema with every request, for comparison.
* ``mix``          a realistic stream: 40 callers (apps, analysts, org-rule clients), each
                   with its own batch size, purpose, payload size and two models; a node
                   occasionally ejected, the hour moving through a working day, a
                   revocation bump every 5000 requests.
* ``mix-uniform``  the worst case: the same, but batch size, purpose, payload size and
                   model drawn afresh for every request.

Prints p50/p99 in microseconds and the mix's cache hit rate (per (mode, node class)).

Per node class (issue 19), ``--fleet``: the shipped policies on the 3 nodes above and on
300 simulated nodes (registry-free NodeFacts over 8 regions, 6 providers, trust 0-2),
for one mode (the client named it) and for all four:

* ``new``   a request the decision cache has not seen (a batch size new to this
            caller; every 250th request a new caller): each piece of the policy set is
            cached by what it reads, so most of these ask Cedar nothing (another caller
            had that batch size) and are the engine's bookkeeping alone.
* ``fresh``  a batch size and hour no request had before: the piece that reads them
            is asked (one Cedar request), the rest is known.
* ``caller``  a caller the engine has not seen since the last reload, whose class
            (gateway/policy/caller_class.py: its grant and the strings the policies tell
            apart) another caller had: Acme/Sales strangers, as org-rule clients are;
            the caller-reading piece's answer is the class's, so Cedar is asked nothing.
* ``class``  a new caller of a class no caller had (identities.json gives each its own
            role): its entity is built and the caller-reading piece asked once per mode.
* ``cold``  every cache cleared first, as after a policy reload or revocation bump.
* ``hit``   the same request again.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from gateway.policy import (
    Grant,
    IdentityFacts,
    InferContext,
    ModelFacts,
    NodeFacts,
    PolicyEngine,
    PolicySource,
    load_policy_dir,
)
from gateway.policy.identities import IdentityMap

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


REGIONS = (
    "eu-west-1",
    "eu-west-2",
    "eu-central-1",
    "eu-north-1",
    "eu-south-1",
    "us-east-1",
    "us-west-2",
    "ap-south-1",
)
PROVIDERS = ("prov-a", "prov-b", "prov-c", "prov-d", "prov-e", "prov-f")


def fleet(n: int, seed: int = 19) -> list[NodeFacts]:
    """`n` nodes spread over regions, providers and trust as a real fleet might be:
    most nodes trust 1, some trusted hardware (2), some untrusted (0)."""
    rng = random.Random(seed)
    return [
        NodeFacts(
            f"node-{i:03d}",
            rng.choice(REGIONS),
            rng.choice(PROVIDERS),
            rng.choices((0, 1, 2), (1, 6, 2))[0],
        )
        for i in range(n)
    ]


def with_odd_callers(source: PolicySource, n: int) -> PolicySource:
    """`source` with `n` more identities.json clients, each of its own class (a role no
    other caller has): the `class` case's callers."""
    clients = dict(source.identities.clients)
    for i in range(n):
        clients[f"{CLIENT}odd{i}"] = Grant(("apps",), (f"r{i}",), 1)
    return dataclasses.replace(source, identities=IdentityMap(clients, source.identities.rules))


def fleet_cases(
    engine: PolicyEngine, names: list[str], modes: tuple[str, ...] | None, n: int
) -> list[tuple[str, list[float]]]:
    """new / cold / hit for one engine and mode choice (see the docstring)."""
    who = [IdentityFacts(f"{CLIENT}demo", "demo")] + [
        IdentityFacts(f"{CLIENT}svc{i}", f"svc{i}", "Acme", "Sales", "", str(i)) for i in range(40)
    ]
    ctx0 = InferContext(1, 1024, "", NOON)

    def new(i: int) -> object:
        ctx = InferContext(1 + i % 250, 1024, "", NOON)
        return engine.decide_infer(who[(i // 250) % len(who)], "iris", ctx, names, modes=modes)

    def cold(_: int) -> object:
        engine.clear_cache()
        return engine.decide_infer(who[0], "iris", ctx0, names, modes=modes)

    def hit(_: int) -> object:
        return engine.decide_infer(who[0], "iris", ctx0, names, modes=modes)

    strangers = [
        IdentityFacts(f"{CLIENT}new{i}", f"new{i}", "Acme", "Sales", "", str(i)) for i in range(n)
    ]

    def caller(i: int) -> object:
        return engine.decide_infer(strangers[i], "iris", ctx0, names, modes=modes)

    odd = [IdentityFacts(f"{CLIENT}odd{i}", f"odd{i}", "", "", "", str(i)) for i in range(n)]

    def klass(i: int) -> object:
        return engine.decide_infer(odd[i], "iris", ctx0, names, modes=modes)

    def fresh(i: int) -> object:
        # Hours 0-7 (the other cases use noon): 2048 (batch size, hour) pairs never seen.
        ctx = InferContext(1 + i % 256, 1024, "", NOON.replace(hour=(i // 256) % 8))
        return engine.decide_infer(who[0], "iris", ctx, names, modes=modes)

    new(-1)  # the classes' own answers, as any running gateway has them
    rows = [("new", timed(n, new)), ("fresh", timed(n, fresh)), ("caller", timed(n, caller))]
    rows.append(("class", timed(n, klass)))
    rows.append(("cold", timed(max(n // 10, 50), cold)))
    hit(0)
    rows.append(("hit", timed(n, hit)))
    return rows


def per_node_miss(engine: PolicyEngine, names: list[str]) -> Callable[[int], object]:
    ctx = InferContext(1, 1024, "", NOON)
    demo = IdentityFacts(f"{CLIENT}demo", "demo")

    def call(_: int) -> object:
        engine.clear_cache()
        return engine.decide_infer(demo, "iris", ctx, names)

    return call


def fleet_rows(n: int, directory: Path) -> None:
    """Misses on 3 and on 300 nodes, one mode and all modes (see the docstring)."""
    source = with_odd_callers(load_policy_dir(directory), n)
    print(f"policy per node class, {len(source.policies)} policies, model iris")
    print(f"python {platform.python_version()} on {platform.machine()}\n")
    print(f"{'case':<26}{'nodes':>6}{'classes':>8}{'calls':>7}{'p50 us':>9}{'p99 us':>9}")
    for nodes in (NODES, fleet(300)):
        names = [x.name for x in nodes]
        for label, modes in (("one mode (none)", ("none",)), ("all modes", None)):
            engine = PolicyEngine(source, models=MODELS, nodes=nodes)
            for case, samples in fleet_cases(engine, names, modes, n):
                p50, p99 = percentiles(samples)
                name = f"{case}, {label}"
                print(
                    f"{name:<26}{len(nodes):>6}{engine.class_count:>8}{len(samples):>7}"
                    f"{p50:>9.1f}{p99:>9.1f}"
                )
        # Before issue 19: every node decided on its own, every mode, nothing shared, the
        # schema handed to Cedar with every request.
        before = PolicyEngine(
            source, models=MODELS, nodes=nodes, node_classes=False, check_requests=True
        )
        samples = timed(10 if len(nodes) > 10 else 200, per_node_miss(before, names))
        p50, p99 = percentiles(samples)
        name = "per node (before), all"
        print(f"{name:<26}{len(nodes):>6}{len(nodes):>8}{len(samples):>7}{p50:>9.1f}{p99:>9.1f}")


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
    ap.add_argument("--fleet", action="store_true", help="only the node-class figures")
    args = ap.parse_args()
    n = args.requests
    if args.fleet:
        fleet_rows(min(n, 2000), args.dir)
        return
    source = load_policy_dir(args.dir)
    engine = PolicyEngine(source, models=MODELS, nodes=NODES)
    check = PolicyEngine(source, models=MODELS, nodes=NODES, check_requests=True)
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
    rows.append(("miss-check", timed(max(n // 20, 200), miss(check))))
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
            f"{name} cache: {stats.hits} hits, {stats.misses} misses (per mode x node class), "
            f"hit rate {stats.hit_rate:.1%}, {stats.size} entries"
        )


if __name__ == "__main__":
    main()
