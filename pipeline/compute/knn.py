"""Blockwise exact nearest-neighbour search: range search for dedup, top-k for hard-negative mining.

Scores are computed on (block_size x block_size) tiles, so memory stays bounded however large the
corpus slice is, and everything runs on whatever device the inputs live on.

Tie rule (everywhere): higher score first; among equal scores the lower global corpus index wins.
That makes results independent of block size, slicing and worker count, so a distributed run equals
a single-process one.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model.similarity import as_float, pairwise_scores, validate_name


def normalized_for(
    queries: torch.Tensor, corpus: torch.Tensor, fn: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Cosine on unit rows is a dot product: normalize every row once rather than once per tile."""
    if fn != "cosine":
        return queries, corpus, fn
    return F.normalize(queries, p=2, dim=-1), F.normalize(corpus, p=2, dim=-1), "dot"


def range_pairs(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    fn: str,
    threshold: float,
    *,
    query_offset: int = 0,
    corpus_offset: int = 0,
    block_size: int = 4096,
    upper_only: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair with score >= threshold, as global indices (i, j) int64 and scores float32, sorted by (i, j).

    ``upper_only`` keeps only i < j (global), for self-joins where each pair should appear once.
    """
    validate_name(fn)
    _check_block_size(block_size)
    queries, corpus = as_float(queries), as_float(corpus)
    queries, corpus, fn = normalized_for(queries, corpus, fn)
    out_i, out_j, out_s = [], [], []
    # One reused buffer for every tile's scores and one for its threshold mask: fresh tile-sized
    # temporaries per tile fragment the heap (glibc keeps the freed blocks), and RSS grows with the tiles.
    tile = min(block_size, len(queries)) * min(block_size, len(corpus))
    mask_buffer = torch.empty(tile, dtype=torch.bool, device=queries.device)
    score_buffer = torch.empty(tile if fn == "dot" else 0, dtype=queries.dtype, device=queries.device)
    for qs in range(0, len(queries), block_size):
        q = queries[qs : qs + block_size]
        for cs in range(0, len(corpus), block_size):
            c = corpus[cs : cs + block_size]
            if upper_only and corpus_offset + cs + len(c) - 1 <= query_offset + qs:
                continue  # tile lies entirely on or below the diagonal
            if fn == "dot" and q.dtype == c.dtype:
                scores = torch.matmul(q, c.T, out=score_buffer[: len(q) * len(c)].view(len(q), len(c)))
            else:
                scores = pairwise_scores(q, c, fn)
            mask = torch.ge(scores, threshold, out=mask_buffer[: scores.numel()].view(scores.shape))
            r, col = mask.nonzero(as_tuple=True)
            gi, gj = r + (query_offset + qs), col + (corpus_offset + cs)
            if upper_only and corpus_offset + cs <= query_offset + qs + len(q) - 1:
                above = gi < gj  # the tile crosses the diagonal: keep i < j only
                r, col, gi, gj = r[above], col[above], gi[above], gj[above]
            if len(r):
                out_i.append(gi.cpu().numpy())
                out_j.append(gj.cpu().numpy())
                out_s.append(scores[r, col].to(torch.float32).cpu().numpy())
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64), s[order]


def topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    fn: str,
    k: int,
    *,
    corpus_offset: int = 0,
    block_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k per query: scores (nq, k) descending and global corpus indices (nq, k) int64.

    Ties go to the lower corpus index. When the corpus has fewer than k rows, the tail is padded with
    score -inf and index -1. NaN scores count as -inf. Results live on the queries' device.
    """
    validate_name(fn)
    _check_block_size(block_size)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries, corpus = as_float(queries), as_float(corpus)
    queries, corpus, fn = normalized_for(queries, corpus, fn)
    dtype = torch.promote_types(queries.dtype, corpus.dtype)
    out_s, out_i = [], []
    for qs in range(0, len(queries), block_size):
        q = queries[qs : qs + block_size]
        best = _padding(len(q), k, q.device, dtype)
        for cs in range(0, len(corpus), block_size):
            scores = pairwise_scores(q, corpus[cs : cs + block_size], fn)
            best = merge_topk([best, _tile_topk(scores, k, corpus_offset + cs)], k)
        out_s.append(best[0])
        out_i.append(best[1])
    if not out_s:
        return _padding(0, k, queries.device, dtype)
    return torch.cat(out_s), torch.cat(out_i)


def merge_topk(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial top-k results over disjoint corpus slices (global indices) into the global top-k.

    Same ordering and tie rule as ``topk``, so merging per-worker results equals one search over the
    whole corpus. Padding entries (index -1) sort after every real entry.
    """
    if not parts:
        raise ValueError("merge_topk needs at least one part")
    dtype = functools.reduce(torch.promote_types, (p[0].dtype for p in parts))
    device = parts[0][0].device
    scores = torch.cat([p[0].to(device=device, dtype=dtype) for p in parts], dim=1)
    index = torch.cat([p[1].to(device=device, dtype=torch.int64) for p in parts], dim=1)
    # Lexicographic sort by (score desc, index asc): sort by index, then stable sort by score.
    key = torch.where(index < 0, torch.iinfo(torch.int64).max, index)
    by_index = key.argsort(dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    scores, index = scores.gather(1, by_score), index.gather(1, by_score)
    if scores.shape[1] < k:
        pad_s, pad_i = _padding(len(scores), k - scores.shape[1], device, dtype)
        scores, index = torch.cat([scores, pad_s], dim=1), torch.cat([index, pad_i], dim=1)
    return scores, index


def _tile_topk(scores: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one score tile with the lower-index tie rule, which torch.topk does not guarantee.

    torch.topk picks the set (asking for one extra value shows where ties cross the boundary); only
    those rows are redone: everything above the k-th value, then the leftmost equal ones. Sorting the
    picked columns, then stably by score, fixes the order inside the set. Costs about one torch.topk.
    """
    n, m = scores.shape
    kk = min(k, m)
    vals, cols = torch.topk(scores, min(kk + 1, m), dim=1)
    if bool(vals.isnan().any()):  # torch.topk ranks NaN above everything; rank it as -inf instead
        scores = torch.nan_to_num(scores, nan=float("-inf"))
        vals, cols = torch.topk(scores, min(kk + 1, m), dim=1)
    kth, cols = vals[:, kk - 1 : kk], cols[:, :kk].clone()
    if kk < m:
        tied = vals[:, kk] == vals[:, kk - 1]
        if bool(tied.any()):
            rows = tied.nonzero(as_tuple=True)[0]
            sub, sub_kth = scores[rows], kth[rows]
            above, equal = sub > sub_kth, sub == sub_kth
            need = kk - above.sum(1, keepdim=True)
            take = above | (equal & (equal.cumsum(1) <= need))
            cols[rows] = take.nonzero(as_tuple=True)[1].view(len(rows), kk)
    cols = cols.sort(dim=1).values
    picked = scores.gather(1, cols)
    order = picked.argsort(dim=1, descending=True, stable=True)
    return picked.gather(1, order), cols.gather(1, order) + offset


def _padding(n: int, k: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.full((n, k), float("-inf"), device=device, dtype=dtype),
        torch.full((n, k), -1, device=device, dtype=torch.int64),
    )


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
