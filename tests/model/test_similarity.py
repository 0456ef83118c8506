"""pipeline.model.similarity against sentence-transformers' own util functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers.util import cos_sim, dot_score, euclidean_sim, manhattan_sim

from pipeline.model.similarity import (
    SIMILARITY_FUNCTIONS,
    check_threshold,
    pairwise_scores,
    similarity,
    validate_name,
)
from tests.support.float32 import EPS16, score_error, sum_error

REFERENCE = {"cosine": cos_sim, "dot": dot_score, "euclidean": euclidean_sim, "manhattan": manhattan_sim}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _vectors(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", SIMILARITY_FUNCTIONS)
def test_matches_sentence_transformers(fn: str, device: str) -> None:
    a, b = _vectors(70, 48, 0), _vectors(130, 48, 1)
    want = REFERENCE[fn](torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = pairwise_scores(torch.from_numpy(a).to(device), torch.from_numpy(b).to(device), fn)
    assert got.shape == (70, 130)
    assert got.device.type == device
    # two float32 evaluations (theirs, ours), each within score_error of the exact score
    assert (np.abs(got.cpu().numpy() - want) <= 2 * score_error(a, b, fn)).all()


@pytest.mark.parametrize("fn", SIMILARITY_FUNCTIONS)
def test_higher_means_more_similar(fn: str) -> None:
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.5, 0.0], [-1.0, 0.0, 0.0]])
    s = pairwise_scores(a, b, fn)[0]
    assert bool((s[:-1] > s[1:]).all()), s


def test_euclidean_expansion_vs_exact_cdist() -> None:
    """The matmul expansion against cdist's direct (non-matmul) kernel, with offset, large-norm rows."""
    a = torch.from_numpy(_vectors(300, 384, 2)) + 3.0
    b = torch.from_numpy(_vectors(200, 384, 3)) + 3.0
    exact = -torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")
    # the expansion's float32 error follows the norms (|a|^2 + |b|^2 = 2 * 3840 here), not the distance
    bound = torch.from_numpy(score_error(a.numpy(), b.numpy(), "euclidean"))
    assert bool(((pairwise_scores(a, b, "euclidean").double() - exact).abs() <= bound).all())
    # Duplicates and near-duplicates (where dedup thresholds live) beat the expansion's cancellation
    # error (about 0.05 at these norms): exact 0 for duplicates (a - a is exactly 0), and for tiny
    # perturbations the relative error of a direct sum over (a - b)^2, whose differences are exact.
    assert bool((pairwise_scores(a, a, "euclidean").diagonal() == 0).all())
    near = a + 1e-3 * torch.from_numpy(_vectors(300, 384, 4))
    exact_near = -torch.cdist(a.double(), near.double(), compute_mode="donot_use_mm_for_euclid_dist")
    err = (pairwise_scores(a, near, "euclidean").double() - exact_near).abs()
    assert bool((err.diagonal() <= sum_error(384) * exact_near.diagonal().abs()).all())  # distance ~0.02
    assert bool((err <= torch.from_numpy(score_error(a.numpy(), near.numpy(), "euclidean"))).all())


def test_similarity_numpy_and_torch_inputs() -> None:
    a, b = _vectors(5, 8, 4), _vectors(6, 8, 5)
    want = cos_sim(a, b).numpy()
    float32_bound = 2 * score_error(a, b, "cosine")  # two float32 evaluations
    for x, y in [(a, b), (torch.from_numpy(a), b), (a.astype(np.float16), torch.from_numpy(b))]:
        got = similarity(x, y, "cosine")
        assert got.dtype == np.float32 and got.shape == (5, 6)
        # float16 input rounds the vectors themselves: each coordinate by up to eps16/2 relative, which
        # moves a unit vector, and so a cosine, by up to eps16
        rounding = EPS16 if x.dtype in (np.float16, torch.float16) else 0.0
        assert (np.abs(got - want) <= float32_bound + rounding).all()
    # 1-D inputs are one row, as in sentence-transformers.
    assert similarity(a[0], b, "dot").shape == (1, 6)
    bound = 2 * score_error(a[:1], b, "dot")[0]
    assert (np.abs(similarity(a[0], b, "dot")[0] - b @ a[0]) <= bound).all()


def test_validate_name() -> None:
    for fn in SIMILARITY_FUNCTIONS:
        validate_name(fn)
    with pytest.raises(ValueError, match="cosine, dot, euclidean, manhattan"):
        validate_name("cos_sim")
    with pytest.raises(ValueError, match="unknown similarity"):
        pairwise_scores(torch.ones(1, 2), torch.ones(1, 2), "l2")


@pytest.mark.parametrize(
    ("fn", "threshold", "normalized"),
    [
        ("cosine", 1.01, True),
        ("cosine", -1.5, False),
        ("euclidean", 0.5, True),
        ("manhattan", 1e-9, False),
        ("dot", 1.2, True),
        ("cosine", float("nan"), True),
        ("cosine", "high", True),
        ("jaccard", 0.5, True),
    ],
)
def test_check_threshold_rejects_unreachable(fn: str, threshold: float, normalized: bool) -> None:
    with pytest.raises(ValueError):
        check_threshold(fn, threshold, normalized)


@pytest.mark.parametrize(
    ("fn", "threshold", "normalized"),
    [
        ("cosine", 1.0, True),
        ("cosine", -1.0, True),
        ("cosine", 0.95, False),
        ("euclidean", 0.0, True),
        ("euclidean", -0.3, True),
        ("manhattan", -12.0, False),
        ("dot", 1.0, True),
        ("dot", 55.0, False),
        ("dot", np.float32(0.9), True),
    ],
)
def test_check_threshold_accepts_reachable(fn: str, threshold: float, normalized: bool) -> None:
    check_threshold(fn, threshold, normalized)


def test_check_threshold_message_suggests_negated_distance() -> None:
    with pytest.raises(ValueError, match="negated distances"):
        check_threshold("euclidean", 0.25, True)
