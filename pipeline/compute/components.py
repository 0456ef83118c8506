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


def edge_ranks(i: np.ndarray, j: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each edge's place in one strict order: higher weight first, then lower (i, j). With every tie
    broken, the maximum spanning forest is unique, so it does not depend on edge order or slicing."""
    order = np.lexsort((j, i, -np.asarray(w, dtype=np.float64)))
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order), dtype=np.int64)
    return ranks


def max_spanning_forest(i: np.ndarray, j: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Indices of the edges of the maximum spanning forest (Borůvka, vectorised; ties by ``edge_ranks``).

    Why it is enough to keep: at any threshold t, the forest's edges scoring >= t connect exactly the
    components that all the edges scoring >= t connect (single linkage). So dedup stores at most
    nodes - 1 edges however large a duplicate cluster is, and can still re-group at any threshold.
    """
    i = np.asarray(i, dtype=np.int64).ravel()
    j = np.asarray(j, dtype=np.int64).ravel()
    if not len(i):
        return np.zeros(0, dtype=np.int64)
    nodes, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)
    a, b = inverse[: len(i)], inverse[len(i) :]
    ranks = edge_ranks(i, j, w)
    by_rank = np.argsort(ranks)
    label = np.arange(len(nodes), dtype=np.int64)
    alive = np.flatnonzero(a != b)
    chosen: list[np.ndarray] = []
    none = np.iinfo(np.int64).max
    while len(alive):
        la, lb = label[a[alive]], label[b[alive]]
        cross = la != lb
        alive, la, lb = alive[cross], la[cross], lb[cross]
        if not len(alive):
            break
        best = np.full(len(nodes), none, dtype=np.int64)  # each component's best edge (lowest rank)
        np.minimum.at(best, la, ranks[alive])
        np.minimum.at(best, lb, ranks[alive])
        picked = by_rank[np.unique(best[best != none])]
        chosen.append(picked)
        merged = connected_components(len(nodes), label[a[picked]], label[b[picked]])
        label = merged[label]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


class SpanningForest:
    """The maximum spanning forest of every edge added so far, kept as arrays (at most nodes - 1 edges).

    ``add`` merges a batch of edges and returns which of them entered the forest. Committing only
    those keeps storage linear in the rows, and the union of everything committed always contains the
    forest of all edges seen (the forest is unique under ``edge_ranks``), so a resumed run that re-adds
    the committed edges gets the same forest back.
    """

    def __init__(self) -> None:
        self.i = np.zeros(0, dtype=np.int64)
        self.j = np.zeros(0, dtype=np.int64)
        self.w = np.zeros(0, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.i)

    def add(self, i: np.ndarray, j: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Merge the edges (i, j, w); returns the indices of those that are now forest edges."""
        old = len(self.i)
        ci = np.concatenate([self.i, np.asarray(i, dtype=np.int64)])
        cj = np.concatenate([self.j, np.asarray(j, dtype=np.int64)])
        cw = np.concatenate([self.w, np.asarray(w, dtype=np.float32)])
        keep = max_spanning_forest(ci, cj, cw)
        self.i, self.j, self.w = ci[keep], cj[keep], cw[keep]
        return keep[keep >= old] - old
