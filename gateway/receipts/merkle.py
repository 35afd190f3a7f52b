"""RFC 9162 (Certificate Transparency 2.0, same hashing as RFC 6962) Merkle trees.

Why not a library: the maintained Python Merkle packages either use their own proof
formats (pymerkle) or verify inclusion only (sigstore's internal module); transparency
logs need the exact RFC 9162 proofs that witnesses (C2SP tlog-witness) and other
verifiers speak. So this is a small transcription of the RFC, property-tested against a
naive reference in `tests/test_merkle.py` for every size 1..300.

Hashes (RFC 9162 §2.1.1)::

    MTH({})       = SHA-256()
    leaf hash     = SHA-256(0x00 || d)
    interior node = SHA-256(0x01 || left || right)

The proof algorithms (`TreeHashes`) need only one primitive: the hash of a complete,
aligned subtree (``node(level, index)``: leaves ``index*2^level`` up to
``(index+1)*2^level``), so where the hashes live is the subclass's business.
`MerkleTree` keeps every such hash in memory (2N hashes, 64 bytes per leaf): the reference,
and what verifiers rebuild from a bundle. The receipt log keeps only a `Frontier` (the
O(log n) right edge) in memory and reads the rest from its database
(`gateway.receipts.treestore`). Roots of any past size and proofs cost O(log^2 n)
look-ups at worst, O(log n) for the current size (its right edge is the frontier).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "MerkleTree",
    "TreeHashes",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion",
    "root_from_range",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """The right edge of a tree of `size` leaves: the hashes of the complete subtrees its
    RFC 9162 decomposition ends in, one per set bit of `size`, largest (leftmost) first.

    All an append needs (each new leaf merges with the smallest ones), and the root of the
    current size. Immutable: `extend` returns a new one, so a writer can compute the next
    frontier on another thread while readers keep using the current one."""

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0 or len(hashes) != size.bit_count():
            raise ValueError(f"a frontier of size {size} holds {size.bit_count()} hashes")
        self._size = size
        self._hashes = tuple(hashes)

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return self._hashes

    def subtrees(self) -> list[tuple[int, int, bytes]]:
        """(level, index, hash) of each subtree, left to right."""
        out: list[tuple[int, int, bytes]] = []
        start = 0
        for level in range(self._size.bit_length() - 1, -1, -1):
            if self._size >> level & 1:
                out.append((level, start >> level, self._hashes[len(out)]))
                start += 1 << level
        return out

    @classmethod
    def load(cls, size: int, node: Callable[[int, int], bytes]) -> Frontier:
        """The frontier of `size` from a store of complete subtree hashes: O(log n) reads."""
        hashes, start = [], 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                hashes.append(node(level, start >> level))
                start += 1 << level
        return cls(size, hashes)

    def root(self) -> bytes:
        if not self._hashes:
            return EMPTY_ROOT
        r = self._hashes[-1]
        for h in reversed(self._hashes[:-1]):
            r = node_hash(h, r)
        return r

    def extend(
        self, leaves: Iterable[bytes], min_level: int = 1
    ) -> tuple[Frontier, list[tuple[int, int, bytes]]]:
        """Append leaf hashes: the new frontier, and the (level, index, hash) of every
        subtree completed on the way at `min_level` or above (what a store keeps)."""
        hashes = list(self._hashes)
        size = self._size
        done: list[tuple[int, int, bytes]] = []
        for h in leaves:
            if len(h) != HASH_SIZE:
                raise ValueError("a leaf hash is 32 bytes")
            level, n = 0, size
            while n & 1:  # each trailing set bit: a subtree of that size completes
                h = node_hash(hashes.pop(), h)
                level += 1
                n >>= 1
                if level >= min_level:
                    done.append((level, n, h))
            hashes.append(h)
            size += 1
        return Frontier(size, hashes), done


class TreeHashes:
    """RFC 9162 roots and proofs over any store of complete subtree hashes.

    Subclasses give `size` and `_node(level, index)` (a complete, aligned subtree inside
    the first `size` leaves)."""

    @property
    def size(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.size

    def _node(self, level: int, index: int) -> bytes:
        raise NotImplementedError

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self._node(0, index)

    def _range(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]); start is aligned as in every RFC 9162 recursion."""
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        k = n.bit_length() - 1
        if n == 1 << k and start % n == 0:
            return self._node(k, start >> k)
        split = _split(n)
        return node_hash(self._range(start, start + split), self._range(start + split, end))

    def root(self, size: int | None = None) -> bytes:
        """The tree head hash of the first `size` leaves (default: all)."""
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} outside 0..{self.size}")
        return self._range(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 9162 §2.1.3.1, leaf's sibling first."""
        size = self.size if size is None else size
        if not 0 <= index < size <= self.size:
            raise ValueError(f"no leaf {index} in a tree of size {size}")
        path: list[bytes] = []
        start, end = 0, size
        # Walk down from the root, collecting siblings; reverse at the end.
        while end - start > 1:
            split = _split(end - start)
            if index < start + split:
                path.append(self._range(start + split, end))
                end = start + split
            else:
                path.append(self._range(start, start + split))
                start += split
        path.reverse()
        return path

    def left_hashes(self, start: int, size: int | None = None) -> list[bytes]:
        """The subtree hashes of the RFC 9162 decomposition of D[0:size] that lie wholly
        before `start`, left to right: with leaves start..size-1 they give the root
        (`root_from_range`), so a range can be tied to a checkpoint without every leaf."""
        size = self.size if size is None else size
        if not 0 <= start <= size <= self.size:
            raise ValueError(f"no range from {start} in a tree of size {size}")
        out: list[bytes] = []

        def walk(lo: int, hi: int) -> None:
            if hi <= start:
                out.append(self._range(lo, hi))
            elif lo < start:
                split = lo + _split(hi - lo)
                walk(lo, split)
                walk(split, hi)

        if start:
            walk(0, size)
        return out

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """PROOF(first, D[0:second]) of RFC 9162 §2.1.4.1 (empty when first is 0 or equal)."""
        second = self.size if second is None else second
        if not 0 <= first <= second <= self.size:
            raise ValueError(f"no consistency proof from {first} to {second}")
        if first == 0 or first == second:
            return []
        proof: list[bytes] = []
        start, end, m, complete = 0, second, first, True
        while True:
            n = end - start
            if m == n:
                if not complete:
                    proof.append(self._range(start, end))
                break
            split = _split(n)
            if m <= split:
                proof.append(self._range(start + split, end))
                end = start + split
            else:
                proof.append(self._range(start, start + split))
                start += split
                m -= split
                complete = False
        proof.reverse()
        return proof


class MerkleTree(TreeHashes):
    """An append-only list of leaf hashes with RFC 9162 roots and proofs, all in memory."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        # _levels[k] holds the hashes of the complete subtrees of 2^k leaves, in order.
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        for h in leaf_hashes:
            self.append(h)

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> int:
        """Append a leaf *hash*; returns its index."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("a leaf hash is 32 bytes")
        index = self._size
        self._levels[0] += leaf
        self._size += 1
        k, count, h = 0, self._size, leaf
        while count % 2 == 0:
            left = bytes(self._levels[k][-2 * HASH_SIZE : -HASH_SIZE])
            h = node_hash(left, h)
            k += 1
            count //= 2
            if len(self._levels) == k:
                self._levels.append(bytearray())
            self._levels[k] += h
        return index

    def _node(self, level: int, index: int) -> bytes:
        return bytes(self._levels[level][index * HASH_SIZE : (index + 1) * HASH_SIZE])


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes | None:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2), or None if malformed."""
    if not 0 <= index < size or any(len(p) != HASH_SIZE for p in path):
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def root_from_range(
    start: int, size: int, leaves: Sequence[bytes], left: Sequence[bytes]
) -> bytes | None:
    """MTH(D[0:size]) from the leaf hashes D[start:size] and `MerkleTree.left_hashes`
    (None if the counts do not fit). The same recursion as the RFC's, so every leaf of
    the range, and nothing else but the left hashes, goes into the root."""
    if not 0 <= start <= size or len(leaves) != size - start:
        return None
    if size == 0:
        return EMPTY_ROOT if not left else None
    if any(len(h) != HASH_SIZE for h in (*leaves, *left)):
        return None
    pending = iter(left)

    def mth(lo: int, hi: int) -> bytes | None:
        if hi <= start:
            return next(pending, None)
        if hi - lo == 1:
            return leaves[lo - start]
        split = lo + _split(hi - lo)
        a = mth(lo, split)
        b = mth(split, hi)
        return None if a is None or b is None else node_hash(a, b)

    root = mth(0, size)
    return root if next(pending, None) is None else None


def verify_inclusion(
    index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes
) -> bool:
    return root_from_inclusion(index, size, leaf, path) == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2, plus the trivial cases (first is 0, or first equals second)."""
    if not 0 <= first <= second or any(len(p) != HASH_SIZE for p in proof):
        return False
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    if first == second:
        return not proof and first_root == second_root
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
