"""Dedup stage 3, groups: connected components at the threshold, the kept row of each group, and the
threshold curve. Pure: arrays in, arrays out, so it is tested against brute force without Ray.

The edges are the stored forest (see `pairs`) plus one identity edge from each identical copy to its
representative (see `collapse`). A copy's identity edge weighs the larger of the representative's
self-score and its best edge: a copy scores with others exactly what its representative scores, so at
any threshold it belongs with the representative precisely when one of those reaches the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.compute import keep as policies
from pipeline.compute.components import connected_components, max_spanning_forest

CURVE_POINTS = 41


@dataclass(frozen=True)
class Edges:
    """Every edge the groups come from: stored pairs and identity edges, as arrays."""

    i: np.ndarray
    j: np.ndarray
    w: np.ndarray
    stored: int  # the first ``stored`` edges are stored pairs, the rest identity edges

    @classmethod
    def of(
        cls, pairs: pa.Table, rep_of: np.ndarray | None = None, self_score: np.ndarray | None = None
    ) -> Edges:
        i = pairs.column("row").to_numpy().astype(np.int64)
        j = pairs.column("neighbor_row").to_numpy().astype(np.int64)
        w = pairs.column("score").to_numpy().astype(np.float32)
        if rep_of is None:
            return cls(i, j, w, len(i))
        members = np.flatnonzero(rep_of != np.arange(len(rep_of)))
        reps = rep_of[members]
        best = np.full(len(rep_of), -np.inf, dtype=np.float32)
        np.maximum.at(best, i, w)
        np.maximum.at(best, j, w)
        weight = np.maximum(self_score[members], best[reps]).astype(np.float32)
        return cls(
            np.concatenate([i, members]), np.concatenate([j, reps]), np.concatenate([w, weight]), len(i)
        )


@dataclass(frozen=True)
class Groups:
    """Every row's component label at one threshold."""

    labels: np.ndarray  # component label per row (its smallest row)
    sizes: np.ndarray  # component size per label
    pairs_at_threshold: int  # stored pairs scoring at or above the threshold

    @property
    def grouped(self) -> np.ndarray:
        """Rows that belong to a group of two or more, in corpus order."""
        return np.flatnonzero(self.sizes[self.labels] > 1)

    def members(self) -> dict[int, list[int]]:
        """label -> its rows in corpus order, for every group of two or more."""
        out: dict[int, list[int]] = {}
        for row in self.grouped:
            out.setdefault(int(self.labels[row]), []).append(int(row))
        return out


def group(rows: int, edges: Edges, threshold: float) -> Groups:
    at = edges.w.astype(np.float64) >= threshold  # in float64, as before: a float32 threshold would round
    labels = connected_components(rows, edges.i[at], edges.j[at])
    return Groups(labels, np.bincount(labels, minlength=rows), int(at[: edges.stored].sum()))


def forest_weights(edges: Edges) -> np.ndarray:
    """The weights of a maximum spanning forest of all the edges, descending: at threshold t, the rows
    removed number exactly those of weight >= t (each forest edge joins two groups)."""
    keep = max_spanning_forest(edges.i, edges.j, edges.w)
    return np.sort(edges.w[keep])[::-1]


def threshold_curve(
    edges: Edges, floor: float, top: float | None = None, points: int = CURVE_POINTS
) -> list[dict]:
    """Rows removed and groups at evenly spaced thresholds from the floor up, exactly (from the forest)."""
    keep = max_spanning_forest(edges.i, edges.j, edges.w)
    i, j, w = edges.i[keep], edges.j[keep], edges.w[keep]
    high = float(top if top is not None else (w.max() if len(w) else floor))
    if high <= floor:
        high = floor
    curve = []
    for t in np.unique(np.round(np.linspace(floor, high, points if high > floor else 1), 6)):
        at = w.astype(np.float64) >= t
        removed = int(at.sum())
        touched = len(np.unique(np.concatenate([i[at], j[at]]))) if removed else 0
        curve.append({"threshold": round(float(t), 6), "rows_removed": removed, "groups": touched - removed})
    return curve


def threshold_for(weights: np.ndarray, rows: int, target_rows: int, floor: float) -> float:
    """The highest threshold at which at most ``target_rows`` rows remain (``weights`` from
    `forest_weights`); a ValueError saying what the floor reaches when the target is out of reach."""
    need = rows - target_rows
    if need <= 0:
        return float(np.nextafter(np.float32(weights[0]), np.float32(np.inf))) if len(weights) else floor
    if need > len(weights):
        raise ValueError(
            f"{target_rows} rows cannot be reached at or above the pairs floor {floor}: the lowest is "
            f"{rows - len(weights)} rows there (lower --pairs-floor to go further)"
        )
    return float(weights[need - 1])


def target_rows(rows: int, target: int | None, fraction: float | None) -> int | None:
    """--target-rows, or --target-fraction of the rows (rounded down), or None."""
    if target is not None:
        return target
    if fraction is not None:
        return math.floor(fraction * rows)
    return None


def centroid_member(vectors: np.ndarray, rows: list[int], counts: np.ndarray, fn: str) -> int:
    """The member nearest the group's mean (``counts``: copies of each vector), in float64, near-ties (float32
    rounding) to the lowest row: the same on every CPU, and a 100,000-copy set weighs in as one vector."""
    block = np.asarray(vectors, dtype=np.float64)
    mean = (block * counts[:, None]).sum(axis=0) / counts.sum()
    scores = policies.scores_to(block, mean, fn)
    tolerance = policies.tie_tolerance(block, mean, fn)
    tied = np.flatnonzero(scores >= scores.max() - tolerance)
    return int(min(rows[k] for k in tied))


def choose_kept(
    policy: str,
    members: dict[int, list[int]],
    fn: str,
    vectors: dict[int, np.ndarray],
    lengths: dict[int, int] | None = None,
    rep_of: np.ndarray | None = None,
) -> dict[int, int]:
    """The kept row of each group (label -> row): ``first`` in corpus order, the ``longest`` text, or the
    member nearest the group's ``centroid``. ``vectors`` holds the representatives' vectors (every
    row's, without ``rep_of``)."""
    kept: dict[int, int] = {}
    for label, rows in members.items():
        if policy == "first":
            kept[label] = policies.first_member(rows)
        elif policy == "longest":
            kept[label] = policies.longest_member([(lengths or {})[r] for r in rows], rows)
        elif policy == "centroid":
            reps = np.asarray(rows) if rep_of is None else rep_of[np.asarray(rows)]
            unique, counts = np.unique(reps, return_counts=True)
            kept[label] = centroid_member(
                np.stack([vectors[int(r)] for r in unique]), unique.tolist(), counts, fn
            )
        else:
            raise ValueError(f"keep policy must be first, longest or centroid, got {policy!r}")
    return kept


def pairs_at(pairs: pa.Table, threshold: float) -> pa.Table:
    return pairs.filter(pc.greater_equal(pairs.column("score"), threshold))
