"""Similarity functions with sentence-transformers' convention: higher always means more similar.

Euclidean and manhattan are negated distances, so one ">= threshold" rule and one "largest first" order
serve every function (dedup, mining and k-means all rely on that). Pure torch/numpy, device-agnostic.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")


def validate_name(fn: str) -> None:
    """Fail early, naming the allowed values, rather than deep inside a distributed job."""
    if fn not in SIMILARITY_FUNCTIONS:
        raise ValueError(
            f"unknown similarity function {fn!r}; expected one of {', '.join(SIMILARITY_FUNCTIONS)}"
        )


def as_float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Batch tensor in float32 or float64, on the input's device.

    Half precision and integer embeddings are upcast (as sentence-transformers does): fp16 matmul
    rounds scores into spurious ties and threshold misses, and int matmul/cdist fail on CUDA.
    """
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()  # arrays from Ray's object store are read-only; torch wants writable memory
    t = torch.as_tensor(x)
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t.unsqueeze(0) if t.dim() == 1 else t


# Entries with |a-b|^2 below this fraction of the squared norms are recomputed directly (see below).
_REFINE_FRACTION = 1e-3
_REFINE_CHUNK = 65536


def _neg_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-|a-b| via |a|^2 + |b|^2 - 2ab: one matmul instead of cdist's pairwise kernel.

    torch.cdist (and so sentence-transformers) uses the same expansion, whose cancellation leaves an
    error of about sqrt(eps * |a|^2) in the distance: exact duplicates of norm-60 rows come out at
    distance 0.05 instead of 0. Dedup lives exactly there, so near pairs are recomputed as |a-b|,
    which is exact for duplicates; they are few, except in corpora that are mostly duplicates.
    """
    sq_a = (a * a).sum(1, keepdim=True)
    sq_b = (b * b).sum(1)
    d2 = a @ b.T
    d2.mul_(-2.0).add_(sq_a).add_(sq_b[None, :])
    if len(b):
        near = d2 <= _REFINE_FRACTION * (sq_a + sq_b.max())
        rows, cols = near.nonzero(as_tuple=True)
        for s in range(0, len(rows), _REFINE_CHUNK):
            r, c = rows[s : s + _REFINE_CHUNK], cols[s : s + _REFINE_CHUNK]
            d2[r, c] = ((a[r] - b[c]) ** 2).sum(1)
    return d2.clamp_(min=0.0).sqrt_().neg_()


def pairwise_scores(a: torch.Tensor, b: torch.Tensor, fn: str) -> torch.Tensor:
    """n x m score matrix between rows of ``a`` and rows of ``b`` (sentence-transformers' util semantics)."""
    validate_name(fn)
    a, b = as_float(a), as_float(b)
    if a.dtype != b.dtype:
        a, b = a.to(torch.float64), b.to(torch.float64)
    if fn == "cosine":
        return torch.nn.functional.normalize(a, p=2, dim=-1) @ torch.nn.functional.normalize(b, p=2, dim=-1).T
    if fn == "dot":
        return a @ b.T
    if fn == "euclidean":
        return _neg_euclidean(a, b)
    return -torch.cdist(a, b, p=1.0)


def similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, fn: str) -> np.ndarray:
    """Convenience wrapper for callers holding numpy arrays (or CUDA tensors): float32 numpy scores."""
    return pairwise_scores(as_float(a), as_float(b), fn).to(torch.float32).cpu().numpy()


def check_threshold(fn: str, threshold: float, normalized: bool) -> None:
    """Reject thresholds no pair can reach, so a typo does not silently produce an empty dedup.

    Cosine lies in [-1, 1]; negated distances are <= 0; dot of unit vectors is <= 1.
    """
    validate_name(fn)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, got nan")
    if fn == "cosine" and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"cosine threshold {threshold} is outside [-1, 1]")
    if fn in ("euclidean", "manhattan") and threshold > 0:
        raise ValueError(
            f"{fn} scores are negated distances (<= 0); threshold {threshold} > 0 can never be reached "
            f"(use e.g. {-threshold} for 'distance <= {threshold}')"
        )
    if fn == "dot" and normalized and threshold > 1.0:
        raise ValueError(f"dot threshold {threshold} > 1 can never be reached on normalized embeddings")
