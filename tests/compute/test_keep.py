"""pipeline.compute.keep: the keep policies, against brute force written here from the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.compute.keep import (
    EPS32,
    centroid_member,
    first_member,
    longest_member,
    scores_to,
    tie_tolerance,
)
from tests.support.float32 import score_error

FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")


def brute_to_mean(block: np.ndarray, fn: str) -> np.ndarray:
    """Float64 scores of each row to the rows' mean, from the definitions (matmul and all)."""
    v = block.astype(np.float64)
    m = v.mean(axis=0)
    if fn == "cosine":
        return (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (m / np.linalg.norm(m))
    if fn == "dot":
        return v @ m
    if fn == "euclidean":
        return -np.linalg.norm(v - m, axis=1)
    return -np.abs(v - m).sum(axis=1)


def test_first_and_longest() -> None:
    assert first_member([42, 7, 19]) == 7
    assert longest_member([3, 9, 9, 1], [50, 40, 30, 20]) == 30  # 40 and 30 tie on length: lower row
    assert longest_member([5], [8]) == 8
    with pytest.raises(ValueError):
        first_member([])
    with pytest.raises(ValueError):
        longest_member([1, 2], [3])


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_scores_to_matches_definitions(fn: str) -> None:
    block = np.random.default_rng(1).standard_normal((9, 33)).astype(np.float32)
    mean = block.astype(np.float64).mean(axis=0)
    got = scores_to(block, mean, fn)
    assert got.dtype == np.float64
    # float64 on both sides, other summation orders: the float32 bound with float64's epsilon
    error = score_error(block, mean[None], fn)[:, 0] * float(np.finfo(np.float64).eps) / EPS32
    assert (np.abs(got - brute_to_mean(block, fn)) <= error).all()


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_centroid_is_the_argmax_when_scores_are_apart(fn: str) -> None:
    """Random groups (no near ties): the member with the best float64 score, wherever it sits."""
    rng = np.random.default_rng(2)
    for size in (3, 5, 11):
        block = rng.standard_normal((size, 24)).astype(np.float32)
        rows = rng.choice(1000, size, replace=False).tolist()
        scores = brute_to_mean(block, fn)
        top2 = np.sort(scores)[-2:]
        assert top2[1] - top2[0] > 1e-4, "test data: a near tie"
        assert centroid_member(block, rows, fn) == rows[int(np.argmax(scores))]


@pytest.mark.parametrize("fn", ["euclidean", "manhattan"])
def test_pair_is_always_a_tie_under_distances(fn: str) -> None:
    """Both members of a pair lie at the same distance from their mean (equal in exact arithmetic, a few
    ulps apart in floats): the lower row, never the float rounding, decides."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        block = (rng.standard_normal((2, 48)) * rng.uniform(0.1, 100)).astype(np.float32)
        rows = rng.choice(1000, 2, replace=False).tolist()
        assert centroid_member(block, rows, fn) == min(rows)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_exact_copies_tie_to_the_lowest_row_in_any_order(fn: str) -> None:
    """Copies of the most central vector tie exactly; the lowest row wins, however the group is listed
    and whatever order the sums run in (coordinates permuted: same scores, other rounding)."""
    rng = np.random.default_rng(3)
    center = rng.standard_normal(64).astype(np.float32)
    others = (0.8 * center + 0.1 * rng.standard_normal((3, 64))).astype(np.float32)
    block = np.vstack([others[:1], center, others[1:], center, center])
    rows = [30, 12, 5, 50, 40, 41]  # the copies of the center are rows 12, 40 and 41
    scores = brute_to_mean(block, fn)
    assert scores[[1, 4, 5]].min() > np.delete(scores, [1, 4, 5]).max() + 1e-3, "test data: center not best"
    assert centroid_member(block, rows, fn) == 12
    for seed in range(5):
        p = np.random.default_rng(seed).permutation(len(rows))
        dims = np.random.default_rng(100 + seed).permutation(64)
        assert centroid_member(block[p][:, dims], [rows[k] for k in p], fn) == 12


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_crafted_near_tie_goes_to_the_lower_row(fn: str) -> None:
    """Two members mirror each other about the mean, one of them nudged by ``delta``: a nudge far below float32
    rounding is a tie (lower row wins, though the other scores higher in float64); a nudge well above it
    is a real difference (the better member wins, though its row is higher)."""
    for delta, tied in ((1e-9, True), (1e-2, False)):
        block = np.array(
            [[2.0, 0.3, 0.0, 0.0], [2.0, -0.3 + delta, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0], [1.0, 0.0, -2.0, 0.0]]
        )
        scores = scores_to(block, block.mean(axis=0), fn)
        tolerance = tie_tolerance(block, block.mean(axis=0), fn)
        better, worse = (1, 0) if scores[1] > scores[0] else (0, 1)
        gap = scores[better] - scores[worse]
        assert scores[2:].max() < scores[worse] - 1e-2  # the other two members are no contenders
        assert (0 < gap < tolerance) if tied else (gap > 100 * tolerance), (gap, tolerance)
        rows = [0, 0, 98, 99]
        rows[better], rows[worse] = 20, 10
        assert centroid_member(block, rows, fn) == (10 if tied else 20), (fn, delta)


def test_tie_tolerance_is_float32_sized() -> None:
    v = np.array([[3.0, 4.0], [0.0, 5.0]])
    t = np.array([0.0, 2.0])
    root2 = np.sqrt(2.0)
    assert tie_tolerance(v, t, "cosine") == pytest.approx(root2 * EPS32)
    assert tie_tolerance(v, t, "dot") == pytest.approx(root2 * EPS32 * 5 * 2)
    assert tie_tolerance(v, t, "euclidean") == pytest.approx(root2 * EPS32 * (5 + 2))
    assert tie_tolerance(v, t, "manhattan") == pytest.approx(root2 * EPS32 * (7 + 2))


def test_centroid_edge_cases() -> None:
    assert centroid_member(np.ones((1, 4), np.float32), [17], "cosine") == 17
    zero = np.zeros((3, 4), np.float32)  # all scores 0 under cosine: a three-way tie
    assert centroid_member(zero, [9, 4, 6], "cosine") == 4
    with pytest.raises(ValueError, match="one vector per row"):
        centroid_member(np.ones((2, 4)), [1, 2, 3], "dot")
    with pytest.raises(ValueError, match="at least one member"):
        centroid_member(np.ones((0, 4)), [], "dot")
    with pytest.raises(ValueError, match="unknown similarity"):
        centroid_member(np.ones((2, 4)), [1, 2], "l2")
