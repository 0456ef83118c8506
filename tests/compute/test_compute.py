"""pipeline.compute (knn, components, kmeans) against brute-force oracles written here in numpy."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from pipeline.compute.components import connected_components
from pipeline.compute.kmeans import assign, init_centroids, kmeans, partial_sums, update
from pipeline.compute.knn import merge_topk, range_pairs, topk
from pipeline.model.similarity import SIMILARITY_FUNCTIONS
from tests.support.float32 import EPS32, score_error, sum_error
from tests.support.scores import brute_scores

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- oracles


def brute_topk(full: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: score descending, then index ascending."""
    idx = np.stack([np.lexsort((np.arange(full.shape[1]), -row))[:k] for row in full])
    return np.take_along_axis(full, idx, 1), idx


def safe_threshold(full: np.ndarray, quantile: float, error: float) -> float:
    """A threshold near the quantile but more than ``error`` (the most any float32 score may be off, from
    score_error) away from every score, so float32 rounding cannot flip a pair."""
    v = np.sort(full.ravel())
    for t in range(int(quantile * (len(v) - 1)), len(v) - 1):
        if v[t + 1] - v[t] > 2 * error:
            return float((v[t] + v[t + 1]) / 2)
    raise AssertionError("no gap found")


def bfs_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        adj[a].append(b)
        adj[b].append(a)
    label = np.full(n, -1, dtype=np.int64)
    for start in range(n):  # ascending start: the first node reached is the component's minimum
        if label[start] >= 0:
            continue
        label[start] = start
        queue = deque([start])
        while queue:
            for nb in adj[queue.popleft()]:
                if label[nb] < 0:
                    label[nb] = start
                    queue.append(nb)
    return label


def _vectors(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def assert_topk_matches(
    scores: torch.Tensor, idx: torch.Tensor, full: np.ndarray, k: int, error: np.ndarray
) -> None:
    """Against the float64 oracle; ``error``: score_error of the float32 scores. The data must leave the
    order to the float64 scores: neighbours in each row's top k + 1 differ by more than twice the error,
    or are exactly equal (small-integer data, exact in float32 too: then the lower index comes first)."""
    s, i = scores.cpu().numpy(), idx.cpu().numpy()
    want_s, want_i = brute_topk(full, k)
    top_s, top_i = brute_topk(full, min(k + 1, full.shape[1]))
    gaps = top_s[:, :-1] - top_s[:, 1:]
    margin = 2 * np.maximum(
        np.take_along_axis(error, top_i[:, :-1], 1), np.take_along_axis(error, top_i[:, 1:], 1)
    )
    assert ((gaps == 0) | (gaps > margin)).all(), (
        "test data: a near tie that float32 rounding may order either way"
    )
    assert (np.abs(s - want_s) <= np.take_along_axis(error, want_i, 1)).all()
    np.testing.assert_array_equal(i, want_i)


# ---------------------------------------------------------------- knn: range search


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", SIMILARITY_FUNCTIONS)
@pytest.mark.parametrize("block_size", [17, 64, 4096])
def test_range_pairs_vs_brute_force(fn: str, block_size: int, device: str) -> None:
    q, c = _vectors(90, 24, 1), _vectors(130, 24, 2)
    full, error = brute_scores(q, c, fn), score_error(q, c, fn)
    t = safe_threshold(full, 0.97, error.max())
    i, j, s = range_pairs(
        torch.from_numpy(q).to(device),
        torch.from_numpy(c).to(device),
        fn,
        t,
        query_offset=1000,
        corpus_offset=50,
        block_size=block_size,
    )
    wi, wj = np.nonzero(full >= t)  # row-major: sorted by (i, j)
    assert i.dtype == np.int64 and j.dtype == np.int64 and s.dtype == np.float32
    np.testing.assert_array_equal(i, wi + 1000)
    np.testing.assert_array_equal(j, wj + 50)
    assert (np.abs(s - full[wi, wj]) <= error[wi, wj]).all()
    assert len(i) > 100  # the threshold selects a real set, not an empty one


@pytest.mark.parametrize("fn", ["cosine", "euclidean"])
def test_range_pairs_upper_only_sharded_self_join(fn: str) -> None:
    """Sharded self-join (each worker: its query rows vs the whole corpus) = all pairs i < j, once."""
    x = _vectors(150, 16, 3)
    x[40] = x[7]  # an exact duplicate must come out at the top score
    full, error = brute_scores(x, x, fn), score_error(x, x, fn)
    t = safe_threshold(full[np.triu_indices(150, 1)][None, :], 0.95, error.max())
    corpus = torch.from_numpy(x)
    parts = [
        range_pairs(corpus[a:b], corpus, fn, t, query_offset=a, block_size=16, upper_only=True)
        for a, b in [(0, 50), (50, 120), (120, 150)]
    ]
    i, j, s = (np.concatenate(p) for p in zip(*parts, strict=True))
    wi, wj = np.nonzero(np.triu(full >= t, k=1))
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(j, wj)
    assert (np.abs(s - full[wi, wj]) <= error[wi, wj]).all()
    assert (i < j).all()
    k = np.nonzero((i == 7) & (j == 40))[0]
    # a vector with itself: cosine 1 up to the rounding of its 16 terms; distance exactly 0 (x - x == 0)
    want, allowed = (1.0, sum_error(16)) if fn == "cosine" else (0.0, 0.0)
    assert len(k) == 1 and abs(s[k[0]] - want) <= allowed


def test_range_pairs_empty_and_all() -> None:
    x = torch.from_numpy(_vectors(20, 8, 4))
    i, j, s = range_pairs(x, x, "cosine", 1.5)
    assert len(i) == len(j) == len(s) == 0 and i.dtype == np.int64 and s.dtype == np.float32
    i, j, _ = range_pairs(x, x, "cosine", -1.5, block_size=6, upper_only=True)
    assert len(i) == 20 * 19 // 2
    i, j, _ = range_pairs(x, x[:0], "dot", 0.0)
    assert len(i) == 0


# ---------------------------------------------------------------- knn: top-k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", SIMILARITY_FUNCTIONS)
@pytest.mark.parametrize("block_size", [13, 64, 4096])
def test_topk_vs_brute_force(fn: str, block_size: int, device: str) -> None:
    q, c = _vectors(70, 24, 5), _vectors(160, 24, 6)
    scores, idx = topk(
        torch.from_numpy(q).to(device),
        torch.from_numpy(c).to(device),
        fn,
        10,
        corpus_offset=0,
        block_size=block_size,
    )
    assert scores.shape == idx.shape == (70, 10) and idx.dtype == torch.int64
    assert scores.device.type == idx.device.type == device
    assert_topk_matches(scores, idx, brute_scores(q, c, fn), 10, score_error(q, c, fn))


def test_topk_corpus_offset() -> None:
    q, c = _vectors(10, 8, 7), _vectors(40, 8, 8)
    s0, i0 = topk(torch.from_numpy(q), torch.from_numpy(c), "dot", 5)
    s1, i1 = topk(torch.from_numpy(q), torch.from_numpy(c), "dot", 5, corpus_offset=1000, block_size=7)
    error = score_error(q, c, "dot")
    assert_topk_matches(s0, i0, brute_scores(q, c, "dot"), 5, error)
    assert torch.equal(i1, i0 + 1000)
    assert (
        np.abs(s1.numpy() - s0.numpy()) <= 2 * np.take_along_axis(error, i0.numpy(), 1)
    ).all()  # other tiles


def test_topk_ties_go_to_lower_index() -> None:
    """Small integer vectors give exact, heavily tied scores; the oracle's order is exact too."""
    rng = np.random.default_rng(9)
    q = rng.integers(-1, 2, (40, 4)).astype(np.float32)
    c = rng.integers(-1, 2, (300, 4)).astype(np.float32)
    full = brute_scores(q, c, "dot")
    for block_size in (1, 7, 50, 4096):
        scores, idx = topk(torch.from_numpy(q), torch.from_numpy(c), "dot", 25, block_size=block_size)
        assert_topk_matches(scores, idx, full, 25, score_error(q, c, "dot"))
    # Fully tied: every score equal, so the answer is the first k indices.
    _, idx = topk(torch.ones(3, 4), torch.ones(50, 4), "cosine", 6, block_size=8)
    assert idx.tolist() == [list(range(6))] * 3


def test_topk_pads_when_k_exceeds_corpus() -> None:
    q, c = _vectors(5, 8, 10), _vectors(4, 8, 11)
    scores, idx = topk(
        torch.from_numpy(q), torch.from_numpy(c), "euclidean", 7, corpus_offset=20, block_size=3
    )
    assert_topk_matches(
        scores[:, :4], idx[:, :4] - 20, brute_scores(q, c, "euclidean"), 4, score_error(q, c, "euclidean")
    )
    assert (idx[:, 4:] == -1).all() and torch.isinf(scores[:, 4:]).all() and (scores[:, 4:] < 0).all()
    scores, idx = topk(torch.from_numpy(q), torch.zeros(0, 8), "dot", 3)
    assert (idx == -1).all() and scores.shape == (5, 3)
    scores, idx = topk(torch.zeros(0, 8), torch.from_numpy(c), "dot", 3)
    assert scores.shape == idx.shape == (0, 3)


@pytest.mark.parametrize("integer_data", [False, True])
@pytest.mark.parametrize("cuts", [[], [100], [37, 150], [0, 60, 60, 199]])
def test_merge_slices_equals_single_topk(cuts: list[int], integer_data: bool) -> None:
    rng = np.random.default_rng(12)
    q = rng.integers(-2, 3, (30, 6)) if integer_data else rng.standard_normal((30, 6))
    c = rng.integers(-2, 3, (200, 6)) if integer_data else rng.standard_normal((200, 6))
    q, c = torch.from_numpy(q.astype(np.float32)), torch.from_numpy(c.astype(np.float32))
    whole = topk(q, c, "dot", 12)
    bounds = [0, *cuts, 200]
    parts = [
        topk(q, c[a:b], "dot", 12, corpus_offset=a, block_size=32)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    merged = merge_topk(parts, 12)
    error = score_error(q.numpy(), c.numpy(), "dot")
    assert_topk_matches(*merged, brute_scores(q.numpy(), c.numpy(), "dot"), 12, error)
    assert torch.equal(merged[1], whole[1])
    if integer_data:  # small integers: every float32 score is exact
        assert torch.equal(merged[0], whole[0])
    else:  # the slices' tiles have other shapes: two float32 evaluations
        allowed = 2 * np.take_along_axis(error, whole[1].numpy(), 1)
        assert (np.abs(merged[0].numpy() - whole[0].numpy()) <= allowed).all()


def test_merge_padding_sorts_after_real_entries() -> None:
    real = (torch.tensor([[float("-inf"), float("-inf")]]), torch.tensor([[5, 9]]))
    pad = (torch.tensor([[float("-inf"), float("-inf")]]), torch.tensor([[-1, -1]]))
    s, i = merge_topk([pad, real], 3)
    assert i.tolist() == [[5, 9, -1]]
    assert torch.isinf(s).all()


# ---------------------------------------------------------------- components


@pytest.mark.parametrize("seed", range(4))
def test_components_vs_bfs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, e = 3000, [500, 1500, 2900, 6000][seed]
    i, j = rng.integers(0, n, e), rng.integers(0, n, e)
    labels = connected_components(n, i, j)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    np.testing.assert_array_equal(labels, bfs_components(n, i, j))


def test_components_edge_order_invariance() -> None:
    rng = np.random.default_rng(5)
    n = 2000
    i, j = rng.integers(0, n, 1800), rng.integers(0, n, 1800)
    want = connected_components(n, i, j)
    for seed in range(3):
        p = np.random.default_rng(100 + seed).permutation(len(i))
        swap = np.random.default_rng(200 + seed).random(len(i)) < 0.5
        a, b = np.where(swap, j[p], i[p]), np.where(swap, i[p], j[p])
        np.testing.assert_array_equal(connected_components(n, a, b), want)


def test_components_structured_graphs() -> None:
    n = 10_000
    chain = np.arange(n - 1)
    assert (connected_components(n, chain[::-1], chain[::-1] + 1) == 0).all()
    star = connected_components(n, np.full(n - 1, n - 1), np.arange(n - 1))
    assert (star == 0).all()
    assert connected_components(5, np.array([3, 2]), np.array([3, 2])).tolist() == [0, 1, 2, 3, 4]
    no_edges = np.array([], dtype=np.int64)
    assert connected_components(4, no_edges, no_edges).tolist() == [0, 1, 2, 3]
    # Two interleaved chains (odd / even) on a large graph, edges in random order.
    m = 200_000
    i = np.arange(m - 2)
    p = np.random.default_rng(6).permutation(len(i))
    labels = connected_components(m, i[p] + 2, i[p])
    np.testing.assert_array_equal(labels, np.arange(m) % 2)


def test_components_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        connected_components(3, np.array([0, 3]), np.array([1, 1]))
    with pytest.raises(ValueError):
        connected_components(3, np.array([0]), np.array([1, 2]))


# ---------------------------------------------------------------- k-means


def _planted(k: int, per: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    truth = np.repeat(np.arange(k), per)
    x = centers[truth] + noise * rng.standard_normal((k * per, d))
    p = rng.permutation(len(x))
    return torch.from_numpy(x[p].astype(np.float32)), truth[p]


def _same_partition(labels: np.ndarray, truth: np.ndarray) -> bool:
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


@pytest.mark.parametrize("fn", ["cosine", "euclidean", "dot"])
def test_kmeans_recovers_planted_clusters(fn: str) -> None:
    x, truth = _planted(k=6, per=40, d=32, noise=0.02, seed=1)
    centroids, labels = kmeans(x, 6, seed=3, fn=fn)
    assert centroids.shape == (6, 32) and labels.dtype == torch.int64
    assert _same_partition(labels.numpy(), truth)
    if fn == "cosine":  # unit rows up to the rounding of 32 float32 components
        np.testing.assert_allclose(centroids.double().norm(dim=1).numpy(), 1.0, rtol=0, atol=sum_error(32))


def test_kmeans_is_deterministic() -> None:
    x = torch.from_numpy(_vectors(800, 16, 13))
    c1, l1 = kmeans(x, 12, seed=7, iters=5)
    c2, l2 = kmeans(x, 12, seed=7, iters=5)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert not torch.equal(init_centroids(x, 12, seed=7), init_centroids(x, 12, seed=8))


def test_init_centroids_sampled_rows() -> None:
    x = torch.from_numpy(_vectors(500, 8, 14))
    c = init_centroids(x, 5, seed=1, sample=100)
    assert torch.equal(c, init_centroids(x, 5, seed=1, sample=100))
    rows = [int(torch.nonzero((x == row).all(1))[0]) for row in c]  # centroids are rows of x
    assert len(set(rows)) == 5
    assert init_centroids(torch.ones(10, 3), 4, seed=0).shape == (4, 3)  # all duplicates: no crash
    with pytest.raises(ValueError):
        init_centroids(x[:3], 4, seed=0)


def test_distributed_sums_equal_single_process_update() -> None:
    x = torch.from_numpy(_vectors(600, 12, 15))
    centroids = init_centroids(x, 8, seed=2)
    labels, _ = assign(x, centroids, "euclidean")
    single = update(*partial_sums(x, labels, 8), centroids, normalize=False)
    chunks = [(0, 150), (150, 420), (420, 600)]
    parts = [partial_sums(x[a:b], labels[a:b], 8) for a, b in chunks]
    sums = sum(p[0] for p in parts)
    counts = sum(p[1] for p in parts)
    distributed = update(sums, counts, centroids, normalize=False)
    # Both are the plain per-cluster means of a numpy oracle, each up to float32 rounding: a sum of n terms
    # errs by sum_error(n) times the sum of their magnitudes, then the division rounds once more.
    lab = labels.numpy()
    rows = [x.numpy()[lab == c].astype(np.float64) for c in range(8)]
    means = np.stack([r.mean(0) for r in rows])
    error = np.stack([sum_error(len(r)) * np.abs(r).mean(0) for r in rows]) + EPS32 * np.abs(means)
    assert (np.abs(single.numpy() - means) <= error).all()
    assert (np.abs(distributed.numpy() - single.numpy()) <= 2 * error).all()  # other summation order


def test_update_empty_cluster_keeps_centroid_and_normalizes() -> None:
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    x = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    sums, counts = partial_sums(x, torch.tensor([0, 0, 1]), 3)
    assert counts.tolist() == [2, 1, 0]
    new = update(sums, counts, old, normalize=False)
    assert torch.equal(new, torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.6, 0.8]]))
    assert torch.equal(
        update(sums, counts, old, normalize=True), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    )


@pytest.mark.parametrize("fn", SIMILARITY_FUNCTIONS)
def test_assign_vs_brute_force_and_ties(fn: str) -> None:
    x, c = _vectors(300, 10, 16), _vectors(9, 10, 17)
    labels, scores = assign(torch.from_numpy(x), torch.from_numpy(c), fn, block_size=64)
    full, error = brute_scores(x, c, fn), score_error(x, c, fn)
    top2 = np.sort(full, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 2 * error.max(1)).all(), "test data: a near tie in the argmax"
    best = full.argmax(1)
    np.testing.assert_array_equal(labels.numpy(), best)
    assert (np.abs(scores.numpy() - full.max(1)) <= error[np.arange(len(x)), best]).all()
    dup = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # centroids 1 and 2 identical
    labels, _ = assign(torch.tensor([[1.0, 0.1], [2.0, 0.0]]), dup, fn)
    assert labels.tolist() == [1, 1]
