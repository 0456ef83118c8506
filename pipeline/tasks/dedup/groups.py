"""Dedup stage 3, groups: connected components of the pairs at the threshold, and the kept row of each
group by the keep policy. Pure: arrays in, arrays out, so it is tested against brute force without Ray."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.compute import keep as policies
from pipeline.compute.components import connected_components


@dataclass(frozen=True)
class Groups:
    """Every row's component label at one threshold, and the pairs that made them."""

    labels: np.ndarray  # component label per row
    sizes: np.ndarray  # component size per label
    pairs_at_threshold: pa.Table

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


def group(rows: int, pairs: pa.Table, threshold: float) -> Groups:
    at = pairs.filter(pc.greater_equal(pairs.column("score"), threshold))
    i = at.column("row").to_numpy().astype(np.int64)
    j = at.column("neighbor_row").to_numpy().astype(np.int64)
    labels = connected_components(rows, i, j)
    return Groups(labels, np.bincount(labels, minlength=rows), at)


def choose_kept(
    policy: str,
    members: dict[int, list[int]],
    fn: str,
    vectors: dict[int, np.ndarray],
    lengths: dict[int, int] | None = None,
) -> dict[int, int]:
    """The kept row of each group (label -> row): ``first`` in corpus order, the ``longest`` text, or the
    member nearest the group's ``centroid`` (float64, near-ties to the lowest row: the same on every CPU)."""
    kept: dict[int, int] = {}
    for label, rows in members.items():
        if policy == "first":
            kept[label] = policies.first_member(rows)
        elif policy == "longest":
            kept[label] = policies.longest_member([(lengths or {})[r] for r in rows], rows)
        elif policy == "centroid":
            kept[label] = policies.centroid_member(np.stack([vectors[r] for r in rows]), rows, fn)
        else:
            raise ValueError(f"keep policy must be first, longest or centroid, got {policy!r}")
    return kept
