"""Decontamination (``--against``): remove every input row whose score to any reference row (an evaluation
set, say) is at or above the threshold, and say for each which reference row it matched.

Index actors hold the reference vectors; each input part's rows (one per identical set) ask for their
best reference row (exact: every reference row; partitioned: the reference rows in their own k-means
cluster). Every input row whose best score reaches ``pairs_floor`` is kept in ``matches/matches.parquet``
(one row per input row at most: linear storage), so a stricter threshold or a target needs no rescoring.
The reference set is only read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.io.output import DatasetError, OutputFolder, receipts_folder
from pipeline.spec import DedupSpec
from pipeline.tasks.dedup.pairs import SEARCH_DIR, SearchSpace, kmeans
from pipeline.tasks.dedup.source import Source

MATCHES_DIR = "matches"
MATCHES_FILE = f"{MATCHES_DIR}/matches.parquet"
CONTAMINATED_FILE = "contaminated.parquet"


def best_matches(pool, space: SearchSpace, fn: str, spec: DedupSpec, output: OutputFolder, bar, log) -> dict:
    """Per searched input part, every row's best reference row and score, committed under ``.embedpipe/search/``."""
    import ray
    import torch

    from pipeline.compute.kmeans import assign
    from pipeline.compute.knn import merge_topk

    extra: dict = {}
    centroids = None
    if spec.mode == "partitioned":
        centroids, k, iterations = kmeans(pool, pool_rows(pool), fn, spec)
        extra = {"clusters": k, "kmeans_iterations": iterations}
        log(f"k-means over the reference: {k} clusters after {iterations} iteration(s)")
    normalize = fn == "cosine"
    done = output.committed(SEARCH_DIR)
    for index, part in enumerate(space.source.parts):
        if index not in done:
            queries = space.loader([index])()
            scores = np.full(len(queries), -np.inf, dtype=np.float32)
            rows = np.full(len(queries), -1, dtype=np.int64)
            if len(queries):
                ref = ray.put(queries)
                if centroids is None:
                    found = pool.call_each("topk", lambda slot, r=ref: (r, fn, 1, spec.block_size))
                else:
                    q = torch.as_tensor(queries)
                    x = torch.nn.functional.normalize(q, dim=1) if normalize else q
                    labels = assign(x, centroids, fn)[0].numpy()
                    found = pool.call_each(
                        "cluster_topk",
                        lambda slot, r=ref, lab=labels: (
                            r,
                            lab,
                            centroids,
                            fn,
                            normalize,
                            1,
                            spec.block_size,
                        ),
                    )
                best, where = merge_topk([(torch.as_tensor(s), torch.as_tensor(i)) for s, i in found], 1)
                scores, rows = best[:, 0].numpy().astype(np.float32), where[:, 0].numpy()
            table = pa.table(
                {
                    "row": pa.array(space.reps[space.offsets()[index] + np.arange(len(queries))], pa.int64()),
                    "reference_row": pa.array(rows, pa.int64()),
                    "score": pa.array(scores, pa.float32()),
                }
            )
            output.commit_part(f"{SEARCH_DIR}/best-{index:05d}.parquet", index, table)
        bar.update(int(part["rows"]))
    return extra


def pool_rows(pool) -> int:
    return int(sum(pool.call_each("size", lambda slot: ())))


def commit_matches(
    output: OutputFolder, rep_of: np.ndarray, floor: float, ids: pa.Array, reference_ids: pa.Array
) -> None:
    """Every input row (identical copies take their representative's match) whose best score reaches the
    floor, as ``matches/matches.parquet``; the per-part results go."""
    done = output.committed(SEARCH_DIR)
    best = np.full(len(rep_of), -np.inf, dtype=np.float32)
    match = np.full(len(rep_of), -1, dtype=np.int64)
    for number in sorted(done):
        part = output.read_part(done[number])
        rows = part.column("row").to_numpy()
        best[rows] = part.column("score").to_numpy()
        match[rows] = part.column("reference_row").to_numpy()
    best, match = best[rep_of], match[rep_of]
    rows = np.flatnonzero((best.astype(np.float64) >= floor) & (match >= 0))
    output.commit_part(
        MATCHES_FILE,
        0,
        pa.table(
            {
                "row": pa.array(rows, pa.int64()),
                "reference_row": pa.array(match[rows], pa.int64()),
                "id": ids.take(pa.array(rows, pa.int64())),
                "reference_id": reference_ids.take(pa.array(match[rows], pa.int64())),
                "score": pa.array(best[rows], pa.float32()),
            }
        ),
    )
    output.remove(SEARCH_DIR)
    output.remove(receipts_folder(SEARCH_DIR))


def read_matches(output: OutputFolder) -> pa.Table:
    receipts = output.committed(MATCHES_DIR)
    if 0 not in receipts:
        raise DatasetError(
            f"{output.url}: no {MATCHES_FILE}: its search did not finish (re-running resumes it)"
        )
    return output.read_part(receipts[0])


def match_weights(matches: pa.Table) -> np.ndarray:
    """The matched rows' scores, descending: at threshold t, the rows removed are those scoring >= t."""
    return np.sort(matches.column("score").to_numpy())[::-1]


def curve(matches: pa.Table, floor: float, points: int = 41) -> list[dict]:
    scores = matches.column("score").to_numpy().astype(np.float64)
    high = max(float(scores.max()) if len(scores) else floor, floor)
    return [
        {"threshold": float(t), "rows_removed": int((scores >= t).sum()), "groups": 0}
        for t in np.unique(np.round(np.linspace(floor, high, points if high > floor else 1), 6))
    ]


def write_decontaminated(source: Source, matches: pa.Table, threshold: float, output: OutputFolder) -> tuple:
    """``contaminated.parquet`` (each removed row, its closest reference row and score) and ``kept/``."""
    from pipeline.tasks.dedup.outputs import write_kept

    removed = matches.filter(pa.compute.greater_equal(matches.column("score"), threshold))
    contaminated = removed.select(["id", "reference_id", "score"])
    receipts = [output.commit_part(CONTAMINATED_FILE, 0, contaminated)]
    receipts += write_kept(source, set(removed.column("row").to_pylist()), output)
    return receipts, removed.column("score").to_numpy()
