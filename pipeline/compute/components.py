"""Connected components over pair lists (dedup clusters), numpy only.

Vectorised union-find: each round hooks every root onto the smallest root it shares an edge with, then
compresses paths by pointer jumping until every node points at its root. Parents only ever point to
smaller indices, so each root is its component's smallest member: labels do not depend on edge order.
Rounds are O(log n) in practice (a chain of n nodes takes one); each round is a few numpy passes.
"""

from __future__ import annotations

import numpy as np


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Label (int64, length n) of each node = the smallest node index in its component."""
    i = np.asarray(i, dtype=np.int64).ravel()
    j = np.asarray(j, dtype=np.int64).ravel()
    if i.shape != j.shape:
        raise ValueError(f"i and j must have the same length, got {len(i)} and {len(j)}")
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    parent = np.arange(n, dtype=np.int64)
    while len(i):
        ri, rj = parent[i], parent[j]
        cross = ri != rj
        i, j, ri, rj = i[cross], j[cross], ri[cross], rj[cross]  # drop edges already inside a component
        if not len(i):
            break
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        np.minimum.at(parent, hi, lo)  # hi is a root, so this only hooks roots onto smaller roots
        parent = _compress(parent)
    return parent


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping: halves every path each pass until all nodes point straight at their root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand
