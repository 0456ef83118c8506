"""Dedup stage 2, pairs: every pair scoring at or above ``pairs_floor``, computed by index actors that each
hold a slice of the vectors, committed as one part per query part (exact) or per cluster owner
(partitioned) under ``pairs/``, so a re-run skips what is committed."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from pipeline.io.output import OutputFolder
from pipeline.spec import DedupSpec
from pipeline.tasks.dedup.source import Source

KMEANS_SAMPLE = 20000
PAIRS_DIR = "pairs"
PAIR_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("neighbor_row", pa.int64()),
        ("id", pa.string()),
        ("neighbor_id", pa.string()),
        ("score", pa.float32()),
    ]
)


def slices(source: Source, workers: int) -> list[tuple[object, list[tuple[int, int]]]]:
    """One slice per actor: every W-th part (part p goes to actor p % W), as (loader, [(global start, rows)]).

    Striped rather than contiguous: query part k is scored against parts k, k+1, ...; with contiguous
    slices the last actor works at every step while the first idles after its own range (W workers were
    about W/2 times faster than one). Striped, every step's parts are spread evenly over the actors.
    """
    offsets = source.offsets()
    workers = max(1, min(workers, len(source.parts)))
    result = []
    for slot in range(workers):
        picked = range(slot, len(source.parts), workers)
        runs: list[tuple[int, int]] = []
        for p in picked:
            rows = int(source.parts[p]["rows"])
            if runs and runs[-1][0] + runs[-1][1] == offsets[p]:
                runs[-1] = (runs[-1][0], runs[-1][1] + rows)  # adjacent parts (one worker): merge
            else:
                runs.append((offsets[p], rows))
        result.append((source.loader(picked), runs))
    return result


def pairs_table(i: np.ndarray, j: np.ndarray, s: np.ndarray, ids: list) -> pa.Table:
    order = np.lexsort((j, i))
    i, j, s = i[order], j[order], s[order]
    id_type = pa.array(ids[:1]).type
    return pa.table(
        {
            "row": pa.array(i, pa.int64()),
            "neighbor_row": pa.array(j, pa.int64()),
            "id": pa.array([ids[k] for k in i], id_type),
            "neighbor_id": pa.array([ids[k] for k in j], id_type),
            "score": pa.array(s, pa.float32()),
        }
    )


def exact_pairs(
    pool, source: Source, ids: list, fn: str, floor: float, spec: DedupSpec, output: OutputFolder, bar
) -> int:
    """Every pair i < j with score >= floor: each query part against every part at or after it."""
    import ray

    offsets = source.offsets()
    slice_ends = [max(start + rows for start, rows in runs) for _, runs in slices(source, pool.size)]
    done = output.committed(PAIRS_DIR)
    found = 0
    for index, part in enumerate(source.parts):
        rows = int(part["rows"])
        if index in done:
            bar.update(rows)
            continue
        ref = ray.put(source.loader([index])())
        start = offsets[index]
        results = pool.call_each(
            "pairs",
            lambda slot, r=ref, s=start: (
                None if slice_ends[slot] <= s else (r, s, fn, floor, spec.block_size, True)
            ),
        )
        i, j, s = (np.concatenate([r[k] for r in results]) if results else np.zeros(0) for k in range(3))
        table = pairs_table(i.astype(np.int64), j.astype(np.int64), s.astype(np.float32), ids)
        output.commit_part(f"{PAIRS_DIR}/pairs-{index:05d}.parquet", index, table)
        found += table.num_rows
        bar.update(rows)
    return found


def partitioned_pairs(
    pool, source: Source, ids: list, fn: str, floor: float, spec: DedupSpec, output: OutputFolder, log
) -> dict:
    """SemDeDup: seeded k-means over the workers, then exact pairs inside each cluster."""
    import torch

    from pipeline.compute.kmeans import init_centroids, update

    n = source.rows
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
    owners = pool.size
    log(f"k-means: {k} clusters after {iterations} iteration(s); exact pairs inside each cluster")
    found = 0
    for owner, (i, j, s) in cluster_pairs(
        pool, centroids, fn, normalize, floor, spec.block_size, output.committed(PAIRS_DIR)
    ):
        table = pairs_table(i, j, s, ids)
        output.commit_part(f"{PAIRS_DIR}/cluster-owner-{owner:05d}-of-{owners:05d}.parquet", owner, table)
        found += table.num_rows
    return {"clusters": k, "kmeans_iterations": iterations, "pairs_found": found}


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
                result = ray.get(pool.actors[owner].cluster_pairs.remote(fn, floor, block_size, *bundles))
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
    pool, source: Source, fn: str, threshold: float, spec: DedupSpec, found: pa.Table
) -> dict:
    """Recall of partitioned mode against exact search, for the pairs touching a seeded sample of rows."""
    import ray

    rng = np.random.default_rng(spec.seed + 1)
    sample = np.sort(rng.choice(source.rows, size=min(source.rows, spec.recall_sample), replace=False))
    ref = ray.put(gather_vectors(pool, sample))
    results = pool.call_each("pairs", lambda slot: (ref, 0, fn, threshold, spec.block_size, False))
    exact = set()
    for i, j, _ in results:
        for a, b in zip(sample[i], j, strict=True):
            if a != b:
                exact.add((min(a, b), max(a, b)))
    at = found.filter(pa.compute.greater_equal(found.column("score"), threshold))
    in_sample = set(sample.tolist())
    partitioned = {
        (a, b)
        for a, b in zip(at.column("row").to_pylist(), at.column("neighbor_row").to_pylist(), strict=True)
        if a in in_sample or b in in_sample
    }
    hit = len(exact & partitioned)
    return {
        "sample_rows": int(len(sample)),
        "exact_pairs": len(exact),
        "found_pairs": hit,
        "recall": round(hit / len(exact), 4) if exact else 1.0,
    }


def expected_pairs_parts(mode: str, source: Source, names: list[str]) -> set[str]:
    """The pairs parts a finished run has: one per source part (exact) or per owner (partitioned, the
    owner count read from the names themselves)."""
    if mode == "exact":
        return {f"pairs-{index:05d}.parquet" for index in range(len(source.parts))}
    owners = {
        int(n[: -len(".parquet")].rsplit("-of-", 1)[1])
        for n in names
        if n.startswith("cluster-owner-") and n.endswith(".parquet")
    }
    return {f"cluster-owner-{o:05d}-of-{count:05d}.parquet" for count in owners for o in range(count)}


def read_pairs(output: OutputFolder, mode: str, source: Source) -> pa.Table:
    """Every committed pairs part, checksums verified, in part order; a DatasetError if any is missing."""
    receipts = output.committed(PAIRS_DIR)
    names = [r.part.rsplit("/", 1)[-1] for r in receipts.values()]
    missing = sorted(expected_pairs_parts(mode, source, names) - set(names)) or (
        [] if names else ["pairs/*.parquet"]
    )
    if missing:
        from pipeline.io.output import DatasetError

        raise DatasetError(
            f"{output.url}: the pairs are incomplete (missing {missing[0]}); finish that dedup first "
            "(re-running it resumes)"
        )
    tables = [output.read_part(receipts[number]) for number in sorted(receipts)]
    return pa.concat_tables(tables, promote_options="default")
