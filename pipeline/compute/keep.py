"""Which member of a duplicate group to keep: ``first``, ``longest`` and ``centroid``. numpy only.

Every policy must give the same row on every machine for the same input. ``first`` and ``longest`` are
integer comparisons. ``centroid`` (the member most similar to the group's mean vector) is a float
comparison: in float32, with BLAS choosing the summation order per CPU, exact copies in a group score
a few ulps apart and a different copy wins on another machine. So the mean and the scores are computed
here in float64 without BLAS, and scores within a float32-sized tolerance of the best count as ties,
which go to the lowest row (corpus order), as everywhere else in the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
EPS32 = float(np.finfo(np.float32).eps)


def first_member(rows: Sequence[int]) -> int:
    """The member earliest in the corpus (the lowest row), whatever order the rows come in."""
    if not len(rows):
        raise ValueError("a group needs at least one member")
    return int(min(rows))


def longest_member(lengths: Sequence[int], rows: Sequence[int]) -> int:
    """The member with the longest text (``lengths[k]`` belongs to ``rows[k]``); ties go to the lowest row."""
    if len(lengths) != len(rows):
        raise ValueError(f"{len(lengths)} lengths for {len(rows)} rows")
    if not len(rows):
        raise ValueError("a group needs at least one member")
    return int(max(zip(lengths, rows, strict=True), key=lambda pair: (int(pair[0]), -int(pair[1])))[1])


def scores_to(vectors: np.ndarray, target: np.ndarray, fn: str) -> np.ndarray:
    """Float64 score of each row of ``vectors`` against one ``target`` vector (higher = more similar).

    Elementwise products and numpy sums, not a matmul, so no BLAS kernel picks the summation order.
    Cosine treats a zero vector as scoring 0, as torch's normalize (and so sentence-transformers) does.
    """
    v = np.asarray(vectors, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if fn == "cosine":
        v = v / np.maximum(np.sqrt((v * v).sum(axis=1, keepdims=True)), 1e-12)
        t = t / max(math.sqrt(float((t * t).sum())), 1e-12)
        return (v * t).sum(axis=1)
    if fn == "dot":
        return (v * t).sum(axis=1)
    diff = v - t
    if fn == "euclidean":
        return -np.sqrt((diff * diff).sum(axis=1))
    if fn == "manhattan":
        return -np.abs(diff).sum(axis=1)
    raise ValueError(f"unknown similarity function {fn!r}; expected one of {', '.join(SIMILARITY_FUNCTIONS)}")


def tie_tolerance(vectors: np.ndarray, target: np.ndarray, fn: str) -> float:
    """How far apart two scores can be and still only reflect float32 rounding: sqrt(dim) * eps32 times
    the scale of the score's terms (1 for cosine; max |v| * |t| for dot; max |v| + |t| for euclidean;
    max |v|_1 + |t|_1 for manhattan). A float32 evaluation of the same scores errs by about that much,
    so members closer than this are equally central for every practical purpose."""
    v = np.asarray(vectors, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if fn == "cosine":
        scale = 1.0
    elif fn == "manhattan":
        scale = float(np.abs(v).sum(axis=1).max(initial=0.0)) + float(np.abs(t).sum())
    else:
        longest = float(np.sqrt((v * v).sum(axis=1)).max(initial=0.0))
        length = math.sqrt(float((t * t).sum()))
        scale = longest * length if fn == "dot" else longest + length
    return math.sqrt(max(v.shape[-1], 1)) * EPS32 * scale


def centroid_member(vectors: np.ndarray, rows: Sequence[int], fn: str) -> int:
    """The member most similar (under ``fn``) to the group's mean vector; ``vectors[k]`` is the
    embedding of corpus row ``rows[k]``. Mean and scores in float64; scores within
    :func:`tie_tolerance` of the best are ties, won by the lowest row. The result does not depend on
    the order of ``rows`` or on the machine."""
    block = np.asarray(vectors)
    if block.ndim != 2 or block.shape[0] != len(rows):
        raise ValueError(f"expected one vector per row ({len(rows)}), got an array of shape {block.shape}")
    if not len(rows):
        raise ValueError("a group needs at least one member")
    order = np.argsort(np.asarray(rows, dtype=np.int64), kind="stable")
    ordered_rows = [int(rows[k]) for k in order]
    block = block[order].astype(np.float64)
    mean = block.mean(axis=0)
    scores = scores_to(block, mean, fn)
    best = float(scores.max())
    tolerance = tie_tolerance(block, mean, fn)
    return ordered_rows[int(np.flatnonzero(scores >= best - tolerance)[0])]
