"""Score oracles straight from the definitions, in float64: what the code under test is compared with."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_scores(a: np.ndarray, b: np.ndarray, fn: str) -> np.ndarray:
    """The full score matrix (higher = more similar: euclidean and manhattan are negated distances)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if fn == "cosine":
        return unit(a) @ unit(b).T
    if fn == "dot":
        return a @ b.T
    diff = a[:, None, :] - b[None, :, :]
    if fn == "euclidean":
        return -np.sqrt((diff**2).sum(-1))
    return -np.abs(diff).sum(-1)
