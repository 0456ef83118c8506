"""Dedup stage 2, pairs: the maximum spanning forest of every pair scoring at or above ``pairs_floor``.

Index actors each hold a slice of the searched vectors (one representative per identical set, see
`collapse`) and reduce what they find to its maximum spanning forest; the driver merges each query part's
edges (exact) or each cluster owner's (partitioned) into the running forest and commits, as one part
under ``.embedpipe/search/``, the edges that entered it, so a re-run skips what is committed. Once every part is
searched, the forest itself is committed as ``pairs/pairs.parquet`` (at most one edge per searched row)
and ``.embedpipe/search/`` goes. Storage and driver memory are linear in the rows whatever the size of a duplicate
cluster, and the forest still gives, at any threshold at or above the floor, exactly the groups all
pairs would give (single linkage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.compute.components import SpanningForest
from pipeline.io.dataset import PartsLoader
from pipeline.io.output import BOOKKEEPING_DIR, DatasetError, OutputFolder, receipts_folder
from pipeline.spec import DedupSpec
from pipeline.tasks.dedup.source import Source

KMEANS_SAMPLE = 20000
PAIRS_DIR = "pairs"
PAIRS_FILE = f"{PAIRS_DIR}/pairs.parquet"
SEARCH_DIR = f"{BOOKKEEPING_DIR}/search"


@dataclass(frozen=True)
class SearchSpace:
    """The rows the search runs over: the representatives, renumbered 0..R-1 in corpus order (so i < j
    means the same in both numberings)."""

    source: Source
    reps: np.ndarray  # global row of each searched row, ascending
    local: tuple[np.ndarray, ...]  # per source part, the local rows it contributes

    @classmethod
    def of(cls, source: Source, reps: np.ndarray) -> SearchSpace:
        offsets = source.offsets()
        local = tuple(
            reps[(reps >= offsets[p]) & (reps < offsets[p + 1])] - offsets[p]
            for p in range(len(source.parts))
        )
        return cls(source, reps, local)

    @property
    def rows(self) -> int:
        return len(self.reps)

    def offsets(self) -> list[int]:
        return [0, *np.cumsum([len(rows) for rows in self.local]).tolist()]

    def loader(self, parts) -> PartsLoader:
        """A picklable reader of the given parts' searched rows (for an actor)."""
        parts = list(parts)
        source = self.source
        return PartsLoader(
            source.root,
            tuple(source.parts[p] for p in parts),
            source.folder.storage_options,
            source.metadata,
            rows=tuple(self.local[p] for p in parts),
        )


def slices(space: SearchSpace, workers: int) -> list[tuple[object, list[tuple[int, int]]]]:
    """One slice per actor: every W-th part (part p goes to actor p % W), as (loader, [(global start, rows)]).

    Striped rather than contiguous: query part k is scored against parts k, k+1, ...; with contiguous
    slices the last actor works at every step while the first idles after its own range (W workers were
    about W/2 times faster than one). Striped, every step's parts are spread evenly over the actors.
    """
    offsets = space.offsets()
    parts = len(space.local)
    workers = max(1, min(workers, parts))
    result = []
    for slot in range(workers):
        picked = range(slot, parts, workers)
        runs: list[tuple[int, int]] = []
        for p in picked:
            rows = len(space.local[p])
            if not rows:
                continue
            if runs and runs[-1][0] + runs[-1][1] == offsets[p]:
                runs[-1] = (runs[-1][0], runs[-1][1] + rows)  # adjacent parts (one worker): merge
            else:
                runs.append((offsets[p], rows))
        result.append((space.loader(picked), runs))
    return result


def pairs_table(i: np.ndarray, j: np.ndarray, s: np.ndarray, ids: pa.Array) -> pa.Table:
    order = np.lexsort((j, i))
    i, j, s = i[order], j[order], s[order]
    return pa.table(
        {
            "row": pa.array(i, pa.int64()),
            "neighbor_row": pa.array(j, pa.int64()),
            "id": ids.take(pa.array(i, pa.int64())),
            "neighbor_id": ids.take(pa.array(j, pa.int64())),
            "score": pa.array(s, pa.float32()),
        }
    )


def merge(forest: SpanningForest, space: SearchSpace, found: list[tuple], ids: pa.Array) -> pa.Table:
    """Edges found in searched-row numbers -> corpus rows, merged into the forest; the table of those
    that entered it (what is committed)."""
    i, j, s = (
        np.concatenate([f[k] for f in found]) if found else np.zeros(0, dtype)
        for k, dtype in enumerate((np.int64, np.int64, np.float32))
    )
    i, j = space.reps[i.astype(np.int64)], space.reps[j.astype(np.int64)]
    entered = forest.add(i, j, s)
    return pairs_table(i[entered], j[entered], s[entered].astype(np.float32), ids)


def restore(forest: SpanningForest, output: OutputFolder, done: dict) -> None:
    """A resumed run: the committed edges rebuild the forest they came from."""
    for number in sorted(done):
        table = output.read_part(done[number], ["row", "neighbor_row", "score"])
        forest.add(
            table.column("row").to_numpy(),
            table.column("neighbor_row").to_numpy(),
            table.column("score").to_numpy(),
        )


def exact_pairs(
    pool, space: SearchSpace, ids: pa.Array, fn: str, floor: float, spec: DedupSpec, output: OutputFolder, bar
) -> SpanningForest:
    """The forest of every pair i < j with score >= floor: each query part against every part at or after it."""
    import ray

    offsets = space.offsets()
    slice_ends = [
        max((start + rows for start, rows in runs), default=0) for _, runs in slices(space, pool.size)
    ]
    done = output.committed(SEARCH_DIR)
    forest = SpanningForest()
    restore(forest, output, done)
    for index, part in enumerate(space.source.parts):
        rows = int(part["rows"])
        if index in done:
            bar.update(rows)
            continue
        found = []
        if len(space.local[index]):
            ref = ray.put(space.loader([index])())
            start = offsets[index]
            found = pool.call_each(
                "pairs",
                lambda slot, r=ref, s=start: (
                    None if slice_ends[slot] <= s else (r, s, fn, floor, spec.block_size, True, True)
                ),
            )
        table = merge(forest, space, found, ids)
        output.commit_part(f"{SEARCH_DIR}/pairs-{index:05d}.parquet", index, table)
        bar.update(rows)
    return forest


def partitioned_pairs(
    pool, space: SearchSpace, ids: pa.Array, fn: str, floor: float, spec: DedupSpec, output: OutputFolder, log
) -> tuple[SpanningForest, dict]:
    """SemDeDup: seeded k-means over the workers, then exact pairs inside each cluster."""
    centroids, k, iterations = kmeans(pool, space.rows, fn, spec)
    normalize = fn == "cosine"
    owners = pool.size
    log(f"k-means: {k} clusters after {iterations} iteration(s); exact pairs inside each cluster")
    done = output.committed(SEARCH_DIR)
    forest = SpanningForest()
    restore(forest, output, done)
    for owner, found in cluster_pairs(pool, centroids, fn, normalize, floor, spec.block_size, done):
        table = merge(forest, space, [found], ids)
        output.commit_part(f"{SEARCH_DIR}/cluster-owner-{owner:05d}-of-{owners:05d}.parquet", owner, table)
    return forest, {"clusters": k, "kmeans_iterations": iterations}


def kmeans(pool, rows: int, fn: str, spec: DedupSpec):
    """Seeded k-means over the rows the pool's actors hold (each returns partial sums):
    (centroids, k, iterations)."""
    import torch

    from pipeline.compute.kmeans import init_centroids, update

    n = rows
    k = min(n, spec.clusters or max(1, round(math.sqrt(n))))
    normalize = fn == "cosine"
    rng = np.random.default_rng(spec.seed)
    sample_index = np.sort(rng.choice(n, size=min(n, KMEANS_SAMPLE), replace=False))
    sample = gather_vectors(pool, sample_index)
    sample_t = (
        torch.nn.functional.normalize(torch.as_tensor(sample), dim=1)
        if normalize
        else torch.as_tensor(sample)
    )
    centroids = init_centroids(sample_t, k, spec.seed)
    iterations = 0
    for iterations in range(1, spec.kmeans_iterations + 1):  # noqa: B007
        results = pool.call_each("kmeans_sums", lambda slot, c=centroids: (c, fn, normalize))
        sums = sum(r[0] for r in results)
        counts = sum(r[1] for r in results)
        new = update(sums, counts, centroids, normalize)
        shift = float((new - centroids).norm(dim=1).max())
        centroids = new
        if shift <= 1e-4:
            break
    return centroids, k, iterations


def cluster_pairs(pool, centroids, fn: str, normalize: bool, floor: float, block_size: int, done):
    """(owner, pairs) for every owner not in ``done``: each actor splits its rows by cluster owner, and
    each owner scores the pairs inside its clusters. An actor lost on the way is re-created (from its
    slice) and the splits are made again, since the bundles it held went with it; committed owners are
    not redone."""
    import ray

    from pipeline.runtime.pool import INFRASTRUCTURE_ERRORS

    owners = pool.size
    finished = set(done)
    while True:
        try:
            split_refs = [
                actor.split_by_cluster.options(num_returns=owners).remote(centroids, fn, normalize, owners)
                for actor in pool.actors
            ]
            if owners == 1:
                split_refs = [[ref] for ref in split_refs]
            for owner in range(owners):
                if owner in finished:
                    continue
                bundles = [refs[owner] for refs in split_refs]
                result = ray.get(
                    pool.actors[owner].cluster_pairs.remote(fn, floor, block_size, True, *bundles)
                )
                finished.add(owner)
                yield owner, result
            return
        except INFRASTRUCTURE_ERRORS:
            replaced = pool.stats.actors_replaced
            pool.call_each("size", lambda slot: ())  # re-creates every lost actor from its slice
            if pool.stats.actors_replaced == replaced:
                raise  # every actor is alive: not a lost worker


def gather_vectors(pool, index: np.ndarray) -> np.ndarray:
    results = pool.call_each("rows", lambda slot: (index,))
    rows = np.concatenate([r[0] for r in results])
    vectors = np.concatenate([r[1] for r in results])
    return vectors[np.argsort(rows, kind="stable")]


def estimate_recall(
    pool, space: SearchSpace, fn: str, threshold: float, spec: DedupSpec, labels: np.ndarray
) -> dict:
    """Recall of partitioned mode against exact search, for the pairs touching a seeded sample of searched
    rows: an exact pair counts as found when partitioned mode put both rows in one group."""
    import ray

    rng = np.random.default_rng(spec.seed + 1)
    sample = np.sort(rng.choice(space.rows, size=min(space.rows, spec.recall_sample), replace=False))
    ref = ray.put(gather_vectors(pool, sample))
    results = pool.call_each("pairs", lambda slot: (ref, 0, fn, threshold, spec.block_size, False))
    exact = set()
    for i, j, _ in results:
        for a, b in zip(sample[i], j, strict=True):
            if a != b:
                exact.add((min(a, b), max(a, b)))
    rows = space.reps
    hit = sum(1 for a, b in exact if labels[rows[a]] == labels[rows[b]])
    return {
        "sample_rows": int(len(sample)),
        "exact_pairs": len(exact),
        "found_pairs": hit,
        "recall": round(hit / len(exact), 4) if exact else 1.0,
    }


def commit_forest(output: OutputFolder, forest: SpanningForest, ids: pa.Array) -> None:
    """The search is complete: its forest becomes ``pairs/pairs.parquet``; the per-part results go."""
    output.commit_part(PAIRS_FILE, 0, pairs_table(forest.i, forest.j, forest.w, ids))
    output.remove(SEARCH_DIR)
    output.remove(receipts_folder(SEARCH_DIR))


def searched(output: OutputFolder) -> bool:
    """Whether an earlier run of this plan finished the search (its forest is committed)."""
    return 0 in output.committed(PAIRS_DIR)


def read_pairs(output: OutputFolder, columns: list[str] | None = None) -> pa.Table:
    """The committed forest (checksum verified); a DatasetError when the search never finished."""
    receipts = output.committed(PAIRS_DIR)
    if 0 not in receipts:
        raise DatasetError(
            f"{output.url}: no {PAIRS_FILE}: its search did not finish (re-running that dedup resumes it)"
        )
    return output.read_part(receipts[0], columns)
