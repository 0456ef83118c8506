"""Seeded k-means for partitioned (SemDeDup-style) dedup, split into steps the Ray layer can distribute.

One iteration distributed: broadcast centroids, each worker runs ``assign`` + ``partial_sums`` on its
rows, the driver adds the (sums, counts) and calls ``update``. Sums are float64 so the order in which
workers' parts are added changes the result by far less than float32 rounding.
"""

from __future__ import annotations

import torch

from pipeline.model.similarity import as_float, pairwise_scores, validate_name

INIT_SAMPLE = 20_000


def init_centroids(x: torch.Tensor, k: int, seed: int, sample: int = INIT_SAMPLE) -> torch.Tensor:
    """k-means++ (D^2 sampling, squared euclidean) on at most ``sample`` rows; deterministic for a seed.

    Random draws come from a CPU generator seeded by ``seed``, so the stream does not depend on the device.
    """
    x = as_float(x)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} rows, got {k}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if n > sample:
        rows = torch.randperm(n, generator=gen)[:sample].sort().values
        x = x[rows.to(x.device)]
    chosen = [int(torch.randint(len(x), (1,), generator=gen))]
    d2 = _sq_dist(x, x[chosen[0]])
    for _ in range(1, k):
        weights = d2.to(device="cpu", dtype=torch.float64)
        if weights.sum() > 0:
            nxt = int(torch.multinomial(weights, 1, generator=gen))
        else:  # every row equals some centroid already: any row will do
            nxt = int(torch.randint(len(x), (1,), generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, _sq_dist(x, x[nxt]))
    return x[torch.tensor(chosen, device=x.device)].clone()


def assign(
    x: torch.Tensor, centroids: torch.Tensor, fn: str, block_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Most similar centroid per row under ``fn`` (int64 labels, scores); ties go to the lower centroid.

    Rows are processed in blocks so a large shard never materialises an n x k score matrix.
    """
    validate_name(fn)
    x, centroids = as_float(x), as_float(centroids)
    labels, scores = [], []
    for start in range(0, len(x), block_size):
        s = pairwise_scores(x[start : start + block_size], centroids, fn)
        lab = s.argmax(dim=1)  # documented to return the first maximal index
        labels.append(lab)
        scores.append(s.gather(1, lab[:, None])[:, 0])
    if not labels:
        return torch.zeros(0, dtype=torch.int64, device=x.device), torch.zeros(0, device=x.device)
    return torch.cat(labels), torch.cat(scores)


def partial_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster float64 sums (k, d) and int64 counts (k,) of this worker's rows."""
    x = as_float(x)
    labels = labels.to(device=x.device, dtype=torch.int64)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x.to(torch.float64))
    counts = torch.bincount(labels, minlength=k)
    return sums, counts


def update(
    sums: torch.Tensor, counts: torch.Tensor, old_centroids: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """New centroids = cluster means; an empty cluster keeps its old centroid instead of becoming NaN.

    ``normalize`` projects means back onto the unit sphere (spherical k-means, for cosine).
    """
    counts = counts.to(sums.device)
    means = sums / counts.clamp(min=1)[:, None].to(sums.dtype)
    if normalize:
        means = torch.nn.functional.normalize(means, p=2, dim=1)
    old = old_centroids.to(device=sums.device, dtype=sums.dtype)
    return torch.where((counts > 0)[:, None], means, old).to(old_centroids.dtype)


def kmeans(
    x: torch.Tensor, k: int, seed: int, iters: int = 20, fn: str = "cosine", tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process k-means composed from the distributable steps: (centroids (k, d), labels (n,)).

    Cosine runs spherical k-means on normalized rows. Stops after ``iters`` updates or once no centroid
    moves by more than ``tol`` (L2). Labels are the final assignment to the returned centroids.
    """
    validate_name(fn)
    x = as_float(x)
    normalize = fn == "cosine"
    if normalize:
        x = torch.nn.functional.normalize(x, p=2, dim=1)
    centroids = init_centroids(x, k, seed)
    for _ in range(iters):
        labels, _ = assign(x, centroids, fn)
        sums, counts = partial_sums(x, labels, k)
        new = update(sums, counts, centroids, normalize)
        shift = (new - centroids).norm(dim=1).max()
        centroids = new
        if shift <= tol:
            break
    labels, _ = assign(x, centroids, fn)
    return centroids, labels


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x - c[None, :]) ** 2).sum(1)
