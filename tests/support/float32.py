"""How far one float32 evaluation of a similarity score may lie from the exact value.

Tests compare float32 scores (ours, sentence-transformers', BLAS's) with each other or with a float64
oracle. A fixed tolerance measured on one CPU breaks on another whose BLAS sums in another order, so the
tolerances here follow the arithmetic instead: a d-term float32 sum of products errs by about
sqrt(d) * eps32 times the sum of the terms' magnitudes (rounding errors add up like a random walk; the
worst case, d * eps32, is never approached in practice); the bound takes twice that. Every bound is
per entry, in score units, from the data's norms only (never from a result on this machine).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
EPS16 = float(np.finfo(np.float16).eps)


def sum_error(dim: int) -> float:
    """Relative error bound of a dim-term float32 sum of products: 2 * sqrt(dim) * eps32."""
    return 2.0 * float(np.sqrt(max(dim, 1))) * EPS32


def score_error(a: np.ndarray, b: np.ndarray, fn: str) -> np.ndarray:
    """n x m bound on |float32 score - exact score| for the rows of ``a`` against the rows of ``b``.

    cosine: terms of unit vectors, so k = sum_error(dim) absolute. dot: k * |a||b| (Cauchy-Schwarz on
    the terms). manhattan: k * (|a|_1 + |b|_1). euclidean, computed as |a|^2 + |b|^2 - 2ab (torch.cdist
    and ours): the squared distance errs by e2 = k * (|a|^2 + |b|^2), and the square root turns that into
    min(e2 / d, sqrt(e2)) at distance d (large near d = 0: the cancellation), plus eps32 * d for the
    final rounding. A direct sum over (a - b)^2 is within this bound too.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, dtype=np.float64).reshape(-1, np.shape(b)[-1])
    k = sum_error(a.shape[1])
    if fn == "cosine":
        return np.full((len(a), len(b)), k)
    if fn == "dot":
        return k * np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    if fn == "manhattan":
        return k * (np.abs(a).sum(1)[:, None] + np.abs(b).sum(1)[None, :])
    if fn == "euclidean":
        e2 = k * ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :])
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
        with np.errstate(divide="ignore"):
            spread = np.minimum(np.where(d > 0, e2 / np.maximum(d, 1e-300), np.inf), np.sqrt(e2))
        return spread + EPS32 * d
    raise ValueError(f"unknown similarity function {fn!r}")
