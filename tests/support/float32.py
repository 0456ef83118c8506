"""How far one float32 evaluation of a similarity score may lie from the exact value.

Tests compare float32 scores and embeddings (ours, sentence-transformers', BLAS's) with each other or with
a float64 oracle. A fixed tolerance measured on one CPU breaks on another whose BLAS sums in another order, so the
tolerances here follow the arithmetic instead: a d-term float32 sum of products errs by about
sqrt(d) * eps32 times the sum of the terms' magnitudes (rounding errors add up like a random walk; the
worst case, d * eps32, is never approached in practice); the bound takes twice that. Every bound is
per entry, in score units, from the data's norms only (never from a result on this machine).
"""

from __future__ import annotations

import json
from pathlib import Path

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
    a, b = _rows(a), _rows(b)
    diff = a[:, None, :] - b[None, :, :] if fn == "euclidean" else None
    return _bound(a[:, None, :], b[None, :, :], diff, fn)


def pairwise_score_error(a: np.ndarray, b: np.ndarray, fn: str) -> np.ndarray:
    """The bound of :func:`score_error` for row i of ``a`` against row i of ``b`` only (length n)."""
    a, b = _rows(a), _rows(b)
    return _bound(a, b, a - b, fn)


def _rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])


def _bound(a: np.ndarray, b: np.ndarray, diff: np.ndarray | None, fn: str) -> np.ndarray:
    """The bounds for ``a`` and ``b`` broadcast against each other (the last axis is the dimension)."""
    k = sum_error(a.shape[-1])
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    if fn == "cosine":
        return np.full(shape, k)
    if fn == "dot":
        return k * np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    if fn == "manhattan":
        return k * (np.abs(a).sum(-1) + np.abs(b).sum(-1))
    if fn == "euclidean":
        e2 = k * ((a * a).sum(-1) + (b * b).sum(-1))
        d = np.sqrt((diff * diff).sum(-1))
        with np.errstate(divide="ignore"):
            spread = np.minimum(np.where(d > 0, e2 / np.maximum(d, 1e-300), np.inf), np.sqrt(e2))
        return spread + EPS32 * d
    raise ValueError(f"unknown similarity function {fn!r}")


def forward_error(reference: np.ndarray, model_dir: str | Path) -> np.ndarray:
    """Per-row bound (shape n x 1) on |a - b| for two float32 forward passes of one model on the same texts
    (other batches, padding or implementation, so other summation orders): every stage (the embeddings and
    each of the ``num_hidden_layers`` layers of ``config.json``) sums up to ``width`` products
    (max(hidden_size, intermediate_size)), so it errs by sum_error(width) of its output's scale, which
    LayerNorm keeps at the output's; independent stages add up like a random walk; two evaluations.
    That is 2 * sqrt(layers + 1) * sum_error(width) * |row|_2 (|row|_2 = 1 for normalized models)."""
    reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    settings: dict = {}
    for config in [Path(model_dir) / "config.json", *sorted(Path(model_dir).glob("*/config.json"))]:
        if config.exists() and "num_hidden_layers" in (found := json.loads(config.read_text())):
            settings = found  # the backbone's config (a Transformer module may sit in a subfolder)
            break
    layers = int(settings.get("num_hidden_layers", 1))
    width = max(
        int(settings.get("hidden_size", reference.shape[1])), int(settings.get("intermediate_size", 0))
    )
    return 2 * np.sqrt(layers + 1) * sum_error(width) * np.linalg.norm(reference, axis=1, keepdims=True)


def encoded_cosine_error(model_dir: str | Path, dim: int | None = None) -> float:
    """Bound on how far two float32 cosine scores of the same pair of texts may lie apart when each side
    encodes the texts with the same model on its own (other batches or implementation) and scores them:
    the two encodings of each text differ by at most the forward_error of a unit row, which moves the
    cosine by at most as much per text (two texts), and each side's cosine errs by sum_error(dim) (dim: the
    embedding's, by default the backbone's hidden_size)."""
    if dim is None:
        config = Path(model_dir) / "config.json"
        dim = int(json.loads(config.read_text()).get("hidden_size", 1)) if config.exists() else 1
    moved = float(forward_error(np.ones((1, 1)), model_dir)[0, 0])
    return 2 * moved + 2 * sum_error(dim)
