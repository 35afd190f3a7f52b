"""RFC 9162 Merkle trees against a naive transcription of the RFC's recursive definitions."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.receipts.merkle import (
    EMPTY_ROOT,
    Frontier,
    MerkleTree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# ------------------------------------------------------------- naive reference (RFC 9162 §2.1)


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def proof(m: int, d: list[bytes]) -> list[bytes]:
    return subproof(m, d, True)


# ------------------------------------------------------------------------------- tests

DATA = [f"entry {i}".encode() for i in range(300)]
TREE = MerkleTree(leaf_hash(x) for x in DATA)


def test_known_answers() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    # RFC 6962 leaf and node prefixes.
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert (
        node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    )
    # Test vector from the Go transparency-dev/merkle and CT test suites (8 leaves).
    leaves = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ]
    t = MerkleTree(leaf_hash(x) for x in leaves)
    assert t.root().hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    assert t.root(1).hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert t.root(3).hex() == "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"


def test_every_size_every_index_against_the_reference() -> None:
    for n in range(1, 301):
        d = DATA[:n]
        root = mth(d)
        assert TREE.root(n) == root
        # every index for small trees, a spread for large ones (the suite stays fast)
        indexes = range(n) if n <= 64 else sorted({0, 1, n // 3, n // 2, n - 2, n - 1})
        for m in indexes:
            p = TREE.inclusion_proof(m, n)
            assert p == path(m, d)
            assert verify_inclusion(m, n, leaf_hash(d[m]), p, root)
        firsts = range(1, n + 1) if n <= 64 else sorted({1, 2, n // 3, n // 2, n - 1, n})
        for m in firsts:
            c = TREE.consistency_proof(m, n)
            assert c == (proof(m, d) if m < n else [])
            assert verify_consistency(m, n, mth(d[:m]), root, c)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_inclusion_property(nm: tuple[int, int]) -> None:
    n, m = nm
    p = TREE.inclusion_proof(m, n)
    assert p == path(m, DATA[:n])
    assert verify_inclusion(m, n, leaf_hash(DATA[m]), p, TREE.root(n))
    # Any other index, size, leaf or a shortened / lengthened path fails.
    assert not verify_inclusion(m, n, leaf_hash(b"other"), p, TREE.root(n))
    if n > 1:
        assert not verify_inclusion((m + 1) % n, n, leaf_hash(DATA[m]), p, TREE.root(n))
        assert not verify_inclusion(m, n, leaf_hash(DATA[m]), p[:-1], TREE.root(n))
    assert not verify_inclusion(m, n, leaf_hash(DATA[m]), [*p, b"\0" * 32], TREE.root(n))
    if n < 300:
        assert not verify_inclusion(m, n + 1, leaf_hash(DATA[m]), p, TREE.root(n + 1))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))))
def test_consistency_property(mn: tuple[int, int]) -> None:
    m, n = mn
    c = TREE.consistency_proof(m, n)
    assert c == (proof(m, DATA[:n]) if m < n else [])
    old, new = TREE.root(m), TREE.root(n)
    assert verify_consistency(m, n, old, new, c)
    if m < n:
        # A different old root (a truncated or reordered history) never verifies.
        assert not verify_consistency(m, n, TREE.root(m - 1) if m > 1 else b"x" * 32, new, c)
        assert not verify_consistency(m, n, old, TREE.root(n - 1), c)
        for i in range(len(c)):
            bad = list(c)
            bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
            assert not verify_consistency(m, n, old, new, bad)


def test_reordered_or_truncated_history_is_inconsistent() -> None:
    honest = MerkleTree(leaf_hash(x) for x in DATA[:20])
    reordered = DATA[:20]
    reordered[3], reordered[4] = reordered[4], reordered[3]
    forked = MerkleTree(leaf_hash(x) for x in [*reordered, *DATA[20:30]])
    assert not verify_consistency(
        10, 30, honest.root(10), forked.root(30), forked.consistency_proof(10)
    )
    truncated = MerkleTree(leaf_hash(x) for x in [*DATA[:15], *DATA[100:115]])
    assert not verify_consistency(
        20, 30, honest.root(20), truncated.root(30), truncated.consistency_proof(20)
    )
    # Positive control: the honest history grown to 30 the same way is consistent.
    grown = MerkleTree(leaf_hash(x) for x in DATA[:30])
    for m in (10, 20):
        assert verify_consistency(m, 30, honest.root(m), grown.root(30), grown.consistency_proof(m))


def test_trivial_cases_and_bad_inputs() -> None:
    # Positive controls: the right proofs for the same sizes and indexes verify.
    assert verify_consistency(5, 5, TREE.root(5), TREE.root(5), [])
    assert verify_consistency(3, 5, TREE.root(3), TREE.root(5), TREE.consistency_proof(3, 5))
    assert verify_inclusion(4, 5, leaf_hash(DATA[4]), TREE.inclusion_proof(4, 5), TREE.root(5))
    assert verify_inclusion(0, 2, leaf_hash(DATA[0]), TREE.inclusion_proof(0, 2), TREE.root(2))
    assert TREE.inclusion_proof(299, 300) == path(299, DATA)
    assert TREE.consistency_proof(5, 300) == proof(5, DATA)
    grown = MerkleTree()
    grown.append(leaf_hash(b"x"))
    assert grown.root() == leaf_hash(b"x")
    # ... and the wrong ones do not.
    assert verify_consistency(0, 5, EMPTY_ROOT, TREE.root(5), [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, TREE.root(5), [b"\0" * 32])
    assert not verify_consistency(5, 5, TREE.root(5), TREE.root(5), [b"\0" * 32])
    assert not verify_consistency(6, 5, TREE.root(5), TREE.root(5), [])
    assert not verify_consistency(3, 5, TREE.root(3), TREE.root(5), [])
    assert not verify_inclusion(5, 5, leaf_hash(DATA[4]), [], TREE.root(5))
    assert not verify_inclusion(0, 2, leaf_hash(DATA[0]), [b"short"], TREE.root(2))
    with pytest.raises(ValueError):
        TREE.inclusion_proof(300, 300)
    with pytest.raises(ValueError):
        TREE.consistency_proof(5, 301)
    with pytest.raises(ValueError):
        MerkleTree().append(b"short")
    assert MerkleTree().root() == EMPTY_ROOT


# --------------------------------------------------- the frontier (the log's in-memory part)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 6))
def test_frontier_appends_like_the_tree(a: int, b: int, min_level: int) -> None:
    """Two batches onto a frontier: its root, its subtrees and every subtree it reports
    completed (what the log stores) are the reference tree's; loading it back from
    stored subtree hashes gives the same frontier."""
    first, second = DATA[:a], DATA[a : a + b]
    f1, done1 = Frontier().extend((leaf_hash(x) for x in first), min_level)
    f2, done2 = f1.extend((leaf_hash(x) for x in second), min_level)
    n = len(first) + len(second)
    assert f2.size == n and len(f2.hashes) == n.bit_count()
    assert f2.root() == TREE.root(n) == mth(DATA[:n])
    done = done1 + done2
    # every complete subtree of >= 2^min_level leaves, exactly once, with its hash
    assert sorted((lv, i) for lv, i, _ in done) == sorted(
        (lv, i) for lv in range(min_level, n.bit_length()) for i in range(n >> lv)
    )
    for lv, i, h in done:
        assert h == TREE._range(i << lv, (i + 1) << lv)
    for lv, i, h in f2.subtrees():
        assert h == TREE._node(lv, i)
    assert Frontier.load(n, TREE._node).hashes == f2.hashes
    assert f1.size == len(first)  # immutable: extending made a new one


def test_frontier_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        Frontier(3, [b"\0" * 32])  # size 3 has two subtrees
    with pytest.raises(ValueError):
        Frontier().extend([b"short"])
    assert Frontier().root() == EMPTY_ROOT
