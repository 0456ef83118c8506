"""The dedup job: find every pair scoring at or above a threshold, group them, keep one per group.

Stages, each resumable: (1) the source embeddings (an embed output, or a raw corpus embedded first);
(2) pairs at or above ``pairs_floor``, one committed file per query part (exact) or per cluster owner
(partitioned), computed by IndexShardActors that each hold a slice of the vectors; (3) groups =
connected components of the pairs at ``threshold``, the keep policy, and the outputs: ``kept/``,
``duplicates.parquet``, ``pairs/`` and ``report.json``, then ``_SUCCESS``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.compute.components import connected_components
from pipeline.io import corpus
from pipeline.io.dataset import (
    MANIFEST_FILE,
    PLAN_FILE,
    SUCCESS_FILE,
    DatasetError,
    PartsLoader,
    claim_output,
    dataset_metadata,
    float_vectors,
    is_complete,
    join,
    read_json_file,
    write_json_file,
)
from pipeline.io.storage import commit_bytes, filesystem, parse_storage_options, with_retries
from pipeline.model.similarity import check_threshold, similarity
from pipeline.spec import DedupSpec, EmbedSpec

KMEANS_SAMPLE = 20000
PAIR_COLUMNS = ("row", "neighbor_row", "id", "neighbor_id", "score")


class DedupError(RuntimeError):
    """The dedup cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Source:
    """The embedding dataset dedup works on."""

    root: str
    metadata: dict
    parts: tuple[tuple[str, int], ...]  # (part name, rows) in corpus order
    raw: bool  # embedded from a raw corpus by this job
    storage_options: dict

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.parts)

    def offsets(self) -> list[int]:
        return [0, *np.cumsum([rows for _, rows in self.parts]).tolist()]


# -- stage 1: the source ----------------------------------------------------------------------------


def resolve_source(spec: DedupSpec, storage_options: dict, log) -> Source:
    """An embed output as it is, or a raw corpus embedded into <output>/embeddings first."""
    url = spec.input[0].rstrip("/") if len(spec.input) == 1 else None
    if url and read_json_file(url, PLAN_FILE, storage_options) is not None and not is_complete(url, storage_options):
        raise DatasetError(f"{url}: an embed output that is not complete (no _SUCCESS); finish the embed first")
    if url and is_complete(url, storage_options):
        metadata = dataset_metadata(url, storage_options)
        if spec.model:
            check_same_model(spec, metadata, storage_options, url)
        return load_source(url, metadata, storage_options, raw=False)
    if not spec.model:
        raise DedupError(f"{', '.join(spec.input)}: not an embedpipe dataset; pass --model to embed it first")
    from pipeline.model.config import load_model_config
    from pipeline.model.files import local_model_dir
    from pipeline.tasks.embed import run_embed

    config = load_model_config(local_model_dir(spec.model, storage_options))
    fn = spec.similarity or config.similarity_fn_name
    check_threshold(fn, spec.threshold, config.normalized)

    target = join(spec.output.rstrip("/"), "embeddings")
    sources = corpus.list_sources(spec.input, storage_options)
    if not sources:
        raise DedupError(f"{', '.join(spec.input)}: the corpus is empty")
    names = corpus.source_schema(sources[0], storage_options).names
    id_column = spec.id_column or ("id" if "id" in names else None)
    log(f"embedding the raw corpus into {target}")
    run_embed(EmbedSpec(
        model=spec.model, input=list(spec.input), output=target, text_column=spec.text_column,
        id_column=spec.id_column, keep_columns=[n for n in names if n != id_column],
        rows_per_shard=spec.rows_per_shard, workers=spec.workers, ray_address=spec.ray_address,
        storage_option=list(spec.storage_option), progress=spec.progress, overwrite=spec.overwrite,
    ), log=log)
    return load_source(target, dataset_metadata(target, storage_options), storage_options, raw=True)


def check_same_model(spec: DedupSpec, metadata: dict, storage_options: dict, url: str) -> None:
    from pipeline.model.files import fingerprint, local_model_dir

    expected = fingerprint(local_model_dir(spec.model, storage_options), {"truncate_dim": None})
    if metadata.get("fingerprint") != expected:
        raise DatasetError(
            f"{url}: was embedded with model fingerprint {metadata.get('fingerprint')}, but --model {spec.model} "
            f"has {expected}; drop --model to use the dataset's own embeddings, or re-embed"
        )


def load_source(root: str, metadata: dict, storage_options: dict, raw: bool) -> Source:
    manifest = read_json_file(root, MANIFEST_FILE, storage_options) or {}
    parts = tuple((p["part"], int(p["rows"])) for p in manifest.get("parts", []))
    source = Source(root, metadata, parts, raw, storage_options)
    if source.rows == 0:
        raise DatasetError(f"{root}: the corpus is empty (0 rows); nothing to deduplicate")
    return source


def read_ids(source: Source, storage_options: dict, column: str = "id") -> list:
    fs, path = filesystem(source.root, storage_options)
    ids: list = []
    for name, _ in source.parts:
        with fs.open(join(path, name), "rb") as handle:
            ids.extend(pq.read_table(handle, columns=[column]).column(column).to_pylist())
    return ids


# -- stage 2: pairs ---------------------------------------------------------------------------------


def slices(source: Source, workers: int) -> list[tuple[PartsLoader, list[tuple[int, int]]]]:
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
            if runs and runs[-1][0] + runs[-1][1] == offsets[p]:
                runs[-1] = (runs[-1][0], runs[-1][1] + source.parts[p][1])  # adjacent parts (one worker): merge
            else:
                runs.append((offsets[p], source.parts[p][1]))
        names = tuple(source.parts[p][0] for p in picked)
        result.append((PartsLoader(source.root, names, source.storage_options, source.metadata), runs))
    return result


class IndexPool:
    """The index actors and their slices; a dead actor is restarted from its loader and the call retried."""

    def __init__(self, loaders: list[tuple[PartsLoader, list]], num_gpus: float, num_cpus: float) -> None:
        from pipeline.runtime.actors import start_index_actors

        self.loaders, self.num_gpus, self.num_cpus = loaders, num_gpus, num_cpus
        self.actors = start_index_actors(loaders, num_gpus, num_cpus)
        self.replaced = 0

    def call_all(self, method: str, args_for) -> list:
        """Call ``method`` on every actor (``args_for(slot)`` gives its arguments; None skips it)."""
        import ray
        from ray.exceptions import RayActorError

        from pipeline.runtime.actors import start_index_actors

        pending = {slot: args_for(slot) for slot in range(len(self.actors))}
        pending = {slot: args for slot, args in pending.items() if args is not None}
        results: dict[int, object] = {}
        while pending:
            refs = {slot: getattr(self.actors[slot], method).remote(*args) for slot, args in pending.items()}
            retry = {}
            for slot, ref in refs.items():
                try:
                    results[slot] = ray.get(ref)
                except RayActorError:
                    if self.replaced >= 4 * len(self.actors):
                        raise
                    self.replaced += 1
                    self.actors[slot] = start_index_actors([self.loaders[slot]], self.num_gpus, self.num_cpus)[0]
                    retry[slot] = pending[slot]
            pending = retry
        return [results[slot] for slot in sorted(results)]

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def pairs_table(i: np.ndarray, j: np.ndarray, s: np.ndarray, ids: list) -> pa.Table:
    order = np.lexsort((j, i))
    i, j, s = i[order], j[order], s[order]
    id_type = pa.array(ids[:1]).type
    return pa.table({
        "row": pa.array(i, pa.int64()), "neighbor_row": pa.array(j, pa.int64()),
        "id": pa.array([ids[k] for k in i], id_type), "neighbor_id": pa.array([ids[k] for k in j], id_type),
        "score": pa.array(s, pa.float32()),
    })


def commit_table(root: str, name: str, table: pa.Table, storage_options: dict, metadata: dict | None = None) -> None:
    if metadata:
        table = table.replace_schema_metadata({b"embedpipe": json.dumps(metadata, sort_keys=True).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    fs, path = filesystem(root, storage_options)
    with_retries(lambda: commit_bytes(fs, join(path, name), data), what=join(root, name))


def exists(root: str, name: str, storage_options: dict) -> bool:
    fs, path = filesystem(root, storage_options)
    return bool(with_retries(lambda: fs.exists(join(path, name)), what=join(root, name)))


def exact_pairs(pool: IndexPool, source: Source, ids: list, fn: str, floor: float, spec: DedupSpec,
                output: str, storage_options: dict, bar) -> int:
    """Every pair i < j with score >= floor: each query part against every part at or after it."""
    import ray

    offsets = source.offsets()
    slice_ends = [max(start + rows for start, rows in runs) for _, runs in pool.loaders]
    found = 0
    for index, (name, rows) in enumerate(source.parts):
        target = f"pairs/pairs-{index:05d}.parquet"
        if exists(output, target, storage_options):
            bar.update(rows)
            continue
        queries = PartsLoader(source.root, (name,), storage_options, source.metadata)()
        ref = ray.put(queries)
        start = offsets[index]
        results = pool.call_all("pairs", lambda slot, r=ref, s=start: None if slice_ends[slot] <= s else
                                (r, s, fn, floor, spec.block_size, True))
        i, j, s = (np.concatenate([r[k] for r in results]) if results else np.zeros(0) for k in range(3))
        table = pairs_table(i.astype(np.int64), j.astype(np.int64), s.astype(np.float32), ids)
        commit_table(output, target, table, storage_options)
        found += table.num_rows
        bar.update(rows)
    return found


def partitioned_pairs(pool: IndexPool, source: Source, ids: list, fn: str, floor: float, spec: DedupSpec,
                      output: str, storage_options: dict, log) -> dict:
    """SemDeDup: seeded k-means over the workers, then exact pairs inside each cluster."""
    import ray
    import torch

    from pipeline.compute.kmeans import init_centroids, update

    n = source.rows
    k = min(n, spec.clusters or max(1, round(math.sqrt(n))))
    normalize = fn == "cosine"
    rng = np.random.default_rng(spec.seed)
    sample_index = np.sort(rng.choice(n, size=min(n, KMEANS_SAMPLE), replace=False))
    sample = gather_vectors(pool, sample_index)
    sample_t = torch.nn.functional.normalize(torch.as_tensor(sample), dim=1) if normalize else torch.as_tensor(sample)
    centroids = init_centroids(sample_t, k, spec.seed)
    iterations = 0
    for iterations in range(1, spec.kmeans_iterations + 1):  # noqa: B007
        results = pool.call_all("kmeans_sums", lambda slot, c=centroids: (c, fn, normalize))
        sums = sum(r[0] for r in results)
        counts = sum(r[1] for r in results)
        new = update(sums, counts, centroids, normalize)
        shift = float((new - centroids).norm(dim=1).max())
        centroids = new
        if shift <= 1e-4:
            break
    owners = len(pool.actors)
    log(f"k-means: {k} clusters after {iterations} iteration(s); exact pairs inside each cluster")
    split_refs = [actor.split_by_cluster.options(num_returns=owners).remote(centroids, fn, normalize, owners)
                  for actor in pool.actors]
    if owners == 1:
        split_refs = [[ref] for ref in split_refs]
    found = 0
    for owner in range(owners):
        target = f"pairs/cluster-owner-{owner:05d}-of-{owners:05d}.parquet"
        if exists(output, target, storage_options):
            continue
        bundles = [refs[owner] for refs in split_refs]
        i, j, s = ray.get(pool.actors[owner].cluster_pairs.remote(fn, floor, spec.block_size, *bundles))
        table = pairs_table(i, j, s, ids)
        commit_table(output, target, table, storage_options)
        found += table.num_rows
    return {"clusters": k, "kmeans_iterations": iterations, "pairs_found": found}


def gather_vectors(pool: IndexPool, index: np.ndarray) -> np.ndarray:
    results = pool.call_all("rows", lambda slot: (index,))
    rows = np.concatenate([r[0] for r in results])
    vectors = np.concatenate([r[1] for r in results])
    return vectors[np.argsort(rows, kind="stable")]


def estimate_recall(pool: IndexPool, source: Source, fn: str, threshold: float, spec: DedupSpec,
                    found: pa.Table) -> dict:
    """Recall of partitioned mode against exact search, for the pairs touching a seeded sample of rows."""
    import ray

    rng = np.random.default_rng(spec.seed + 1)
    sample = np.sort(rng.choice(source.rows, size=min(source.rows, spec.recall_sample), replace=False))
    ref = ray.put(gather_vectors(pool, sample))
    results = pool.call_all("pairs", lambda slot: (ref, 0, fn, threshold, spec.block_size, False))
    exact = set()
    for i, j, _ in results:
        for a, b in zip(sample[i], j, strict=True):
            if a != b:
                exact.add((min(a, b), max(a, b)))
    at = found.filter(pa.compute.greater_equal(found.column("score"), threshold))
    in_sample = set(sample.tolist())
    partitioned = {(a, b) for a, b in zip(at.column("row").to_pylist(), at.column("neighbor_row").to_pylist(),
                                          strict=True) if a in in_sample or b in in_sample}
    hit = len(exact & partitioned)
    return {"sample_rows": int(len(sample)), "exact_pairs": len(exact), "found_pairs": hit,
            "recall": round(hit / len(exact), 4) if exact else 1.0}


# -- stage 3: groups and outputs --------------------------------------------------------------------


def read_pairs(root: str, storage_options: dict) -> pa.Table:
    fs, path = filesystem(root, storage_options)
    folder = join(path, "pairs")
    names = sorted(n for n in fs.ls(folder, detail=False) if n.endswith(".parquet")
                   and not n.rsplit("/", 1)[-1].startswith(("_", ".")))
    tables = [pq.read_table(pa.BufferReader(fs.cat_file(n))) for n in names]
    if not tables:
        return pa.table({c: pa.array([], t) for c, t in zip(PAIR_COLUMNS, (pa.int64(), pa.int64(), pa.string(),
                                                                              pa.string(), pa.float32()), strict=True)})
    return pa.concat_tables(tables, promote_options="default")


def choose_kept(policy: str, labels: np.ndarray, grouped: np.ndarray, source: Source, fn: str,
                storage_options: dict, text_column: str) -> tuple[dict[int, int], dict[int, np.ndarray]]:
    """The kept row of each group (label -> row) and the vectors of every grouped row."""
    vectors = rows_from_parts(source, grouped, storage_options, "embedding")
    kept: dict[int, int] = {}
    members_of: dict[int, list[int]] = {}
    for row in grouped:
        members_of.setdefault(int(labels[row]), []).append(int(row))
    lengths = {}
    if policy == "longest":
        column = source.metadata.get("text_column") or text_column
        texts = rows_from_parts(source, grouped, storage_options, column)
        lengths = {row: len(text or "") for row, text in texts.items()}
    for label, members in members_of.items():
        if policy == "first":
            kept[label] = members[0]
        elif policy == "longest":
            kept[label] = max(members, key=lambda r: (lengths[r], -r))
        else:
            block = np.stack([vectors[r] for r in members])
            scores = similarity(block, block.mean(axis=0, keepdims=True), fn)[:, 0]
            kept[label] = members[int(np.argmax(scores))]
    return kept, vectors


def rows_from_parts(source: Source, rows: np.ndarray, storage_options: dict, column: str) -> dict:
    """The given global rows' values of one column (embeddings as float32), streaming part by part."""
    fs, path = filesystem(source.root, storage_options)
    offsets = source.offsets()
    wanted = np.asarray(sorted(rows), dtype=np.int64)
    out: dict = {}
    for index, (name, _) in enumerate(source.parts):
        local = wanted[(wanted >= offsets[index]) & (wanted < offsets[index + 1])] - offsets[index]
        if not len(local):
            continue
        with fs.open(join(path, name), "rb") as handle:
            table = pq.read_table(handle)
        if column not in table.column_names:
            raise DedupError(f"{join(source.root, name)}: no column {column!r} (embed with --keep-columns {column})")
        picked = table.take(pa.array(local))
        if column == "embedding":
            values = float_vectors(picked, source.metadata, join(source.root, name))
        else:
            values = picked.column(column).to_pylist()
        for row, value in zip(local + offsets[index], values, strict=True):
            out[int(row)] = value
    return out


def histogram(values: np.ndarray, bins: int = 10) -> dict:
    if not len(values):
        return {"edges": [], "counts": []}
    # float64: float32 scores a few ulps apart (copies at 1.0 and 0.99999994) make float32 bin edges collide
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def size_histogram(sizes: np.ndarray) -> dict:
    buckets = {"2": 0, "3": 0, "4": 0, "5-9": 0, "10-99": 0, "100+": 0}
    for size in sizes:
        key = str(size) if size < 5 else "5-9" if size < 10 else "10-99" if size < 100 else "100+"
        buckets[key] += 1
    return buckets


def write_outputs(spec: DedupSpec, source: Source, ids: list, pairs: pa.Table, fn: str, threshold: float,
                  output: str, storage_options: dict, report: dict) -> dict:
    """Groups at ``threshold``, the keep policy, then kept/, duplicates.parquet, report.json, _SUCCESS."""
    started = time.perf_counter()
    n = source.rows
    at = pairs.filter(pa.compute.greater_equal(pairs.column("score"), threshold))
    i = at.column("row").to_numpy().astype(np.int64)
    j = at.column("neighbor_row").to_numpy().astype(np.int64)
    labels = connected_components(n, i, j)
    sizes = np.bincount(labels, minlength=n)
    grouped = np.flatnonzero(sizes[labels] > 1)
    kept, vectors = choose_kept(spec.keep, labels, grouped, source, fn, storage_options, spec.text_column)
    group_number = {label: number for number, label in enumerate(sorted(kept))}
    removed = np.array([r for r in grouped if kept[int(labels[r])] != r], dtype=np.int64)
    scores = np.array([similarity(vectors[int(r)][None], vectors[kept[int(labels[r])]][None], fn)[0, 0]
                       for r in removed], dtype=np.float32)
    id_type = pa.array(ids[:1]).type
    duplicates = pa.table({
        "id": pa.array([ids[r] for r in removed], id_type),
        "group_id": pa.array([group_number[int(labels[r])] for r in removed], pa.int64()),
        "kept_id": pa.array([ids[kept[int(labels[r])]] for r in removed], id_type),
        "score": pa.array(scores, pa.float32()),
    })
    commit_table(output, "duplicates.parquet", duplicates, storage_options)
    write_kept(source, set(removed.tolist()), output, storage_options)
    group_sizes = sizes[sorted(kept)] if kept else np.zeros(0, np.int64)
    report = dict(report, **{
        "rows_in": n, "rows_out": n - len(removed), "removed": int(len(removed)), "groups": len(kept),
        "threshold": threshold, "similarity_fn_name": fn, "keep": spec.keep,
        "pairs_at_threshold": at.num_rows, "pairs_stored": pairs.num_rows,
        "group_size_histogram": size_histogram(group_sizes),
        "largest_group": int(group_sizes.max()) if len(group_sizes) else 0,
        "score_to_kept_histogram": histogram(scores),
        "pair_score_histogram": histogram(at.column("score").to_numpy()),
    })
    report.setdefault("timings", {})["grouping_seconds"] = round(time.perf_counter() - started, 3)
    write_json_file(output, "report.json", report, storage_options)
    fs, path = filesystem(output, storage_options)
    with_retries(lambda: commit_bytes(fs, join(path, SUCCESS_FILE), b""), what=join(output, SUCCESS_FILE))
    return report


def write_kept(source: Source, removed: set[int], output: str, storage_options: dict) -> None:
    """The input rows minus the removed ones, part by part, same schema (a raw corpus loses 'embedding')."""
    fs, path = filesystem(source.root, storage_options)
    offsets = source.offsets()
    for index, (name, rows) in enumerate(source.parts):
        with fs.open(join(path, name), "rb") as handle:
            table = pq.read_table(handle)
        keep = np.array([offsets[index] + r not in removed for r in range(rows)], dtype=bool)
        table = table.filter(pa.array(keep))
        if source.raw:
            table = table.drop_columns(["embedding"])
        commit_table(output, f"kept/{name}", table.replace_schema_metadata(table.schema.metadata), storage_options)


# -- the job --------------------------------------------------------------------------------------


def plan_key(source: Source, storage_options: dict, fn: str, floor: float, spec: DedupSpec, workers: int) -> str:
    manifest = read_json_file(source.root, MANIFEST_FILE, storage_options) or {}
    material = {"parts": [p.get("sha256") for p in manifest.get("parts", [])], "fn": fn, "floor": floor,
                "mode": spec.mode, "clusters": spec.clusters, "seed": spec.seed,
                "iterations": spec.kmeans_iterations, "workers": workers if spec.mode == "partitioned" else None}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


DEDUP_FILES = (SUCCESS_FILE, "report.json", "duplicates.parquet", PLAN_FILE, "pairs", "kept")


def prepare_output(output: str, key: str, plan: dict, spec: DedupSpec, storage_options: dict, log) -> None:
    existing = claim_output(output, key, plan, storage_options, job="dedup", overwrite=spec.overwrite,
                            owned=DEDUP_FILES.__contains__, log=log)
    if existing is not None and is_complete(output, storage_options):
        # A resumed dedup rewrites its outputs (the threshold may differ): not complete meanwhile.
        fs, path = filesystem(output, storage_options)
        with_retries(lambda: fs.rm(join(path, SUCCESS_FILE)), what=output)


def run_dedup(spec: DedupSpec, log=None) -> dict:
    """Run the dedup job; returns report.json's content."""
    import ray
    from tqdm import tqdm

    from pipeline.runtime import cluster

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    output = spec.output.rstrip("/")
    if spec.from_pairs:
        return regroup(spec, storage_options, output, log)

    source = resolve_source(spec, storage_options, log)
    fn = spec.similarity or source.metadata.get("similarity_fn_name", "cosine")
    normalized = bool(source.metadata.get("normalized")) and spec.similarity in (None, fn)
    check_threshold(fn, spec.threshold, normalized)
    floor = spec.pairs_floor if spec.pairs_floor is not None else spec.threshold
    check_threshold(fn, floor, normalized)

    cluster.connect(spec.ray_address)
    actor_plan = cluster.plan_actors(spec.workers)
    loaders = slices(source, actor_plan.workers)
    key = plan_key(source, storage_options, fn, floor, spec, len(loaders))
    prepare_output(output, key, {"source": source.root, "similarity_fn_name": fn, "pairs_floor": floor,
                                 "mode": spec.mode, "raw": source.raw}, spec, storage_options, log)
    ids = read_ids(source, storage_options)
    num_cpus = actor_plan.num_cpus
    if not actor_plan.num_gpus:  # more workers than CPUs: share them, or the extra actors never start
        num_cpus = min(num_cpus, float(ray.cluster_resources().get("CPU", 1)) / len(loaders))
    pool = IndexPool(loaders, actor_plan.num_gpus, num_cpus)
    timings = {}
    extra: dict = {"mode": spec.mode, "pairs_floor": floor, "source": source.root, "workers": len(loaders)}
    try:
        pairs_started = time.perf_counter()
        if spec.mode == "exact":
            with tqdm(total=source.rows, unit="rows", disable=not spec.progress, file=sys.stderr) as bar:
                exact_pairs(pool, source, ids, fn, floor, spec, output, storage_options, bar)
        else:
            extra["partitioned"] = partitioned_pairs(pool, source, ids, fn, floor, spec, output, storage_options, log)
        timings["pairs_seconds"] = round(time.perf_counter() - pairs_started, 3)
        pairs = read_pairs(output, storage_options)
        if spec.mode == "partitioned":
            extra["partitioned"]["recall_vs_exact"] = estimate_recall(pool, source, fn, spec.threshold, spec, pairs)
        extra["actors_replaced"] = pool.replaced
    finally:
        pool.kill()
    extra["timings"] = timings
    report = write_outputs(spec, source, ids, pairs, fn, spec.threshold, output, storage_options, extra)
    report["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
    write_json_file(output, "report.json", report, storage_options)
    return report


def regroup(spec: DedupSpec, storage_options: dict, output: str, log) -> dict:
    """``--from-pairs``: group an earlier run's stored pairs at a new (stricter) threshold; no scoring."""
    earlier = spec.from_pairs.rstrip("/")
    plan = read_json_file(earlier, PLAN_FILE, storage_options)
    if plan is None or not exists(earlier, "pairs", storage_options):
        raise DatasetError(f"{earlier}: not a dedup output (no _plan.json or pairs/)")
    if spec.threshold < plan["pairs_floor"]:
        raise DedupError(f"threshold {spec.threshold} is below the pairs floor {plan['pairs_floor']} of {earlier}; "
                         "pairs under the floor were not stored (run a fresh dedup instead)")
    fn = plan["similarity_fn_name"]
    metadata = dataset_metadata(plan["source"], storage_options)
    source = load_source(plan["source"], metadata, storage_options, raw=bool(plan.get("raw")))
    check_pairs_complete(earlier, plan["mode"], source, storage_options)
    if exists(output, SUCCESS_FILE, storage_options):
        fs, path = filesystem(output, storage_options)
        fs.rm(join(path, SUCCESS_FILE))  # its outputs are about to be rewritten
    pairs = read_pairs(earlier, storage_options)
    if output != earlier:
        for table_name in ("pairs",):
            fs, path = filesystem(earlier, storage_options)
            for name in sorted(fs.ls(join(path, table_name), detail=False)):
                base = name.rsplit("/", 1)[-1]
                if base.endswith(".parquet"):
                    commit_table(output, f"pairs/{base}", pq.read_table(pa.BufferReader(fs.cat_file(name))),
                                 storage_options)
        write_json_file(output, PLAN_FILE, plan, storage_options)
    ids = read_ids(source, storage_options)
    log(f"re-grouping {pairs.num_rows} stored pairs of {earlier} at threshold {spec.threshold}")
    extra = {"mode": plan["mode"], "pairs_floor": plan["pairs_floor"], "source": source.root, "from_pairs": earlier}
    return write_outputs(spec, source, ids, pairs, fn, spec.threshold, output, storage_options, extra)


def check_pairs_complete(root: str, mode: str, source: Source, storage_options: dict) -> None:
    """Every pairs file of the earlier run is there: one per source part (exact) or per owner (partitioned)."""
    fs, path = filesystem(root, storage_options)
    names = {n.rsplit("/", 1)[-1] for n in fs.ls(join(path, "pairs"), detail=False)}
    if mode == "exact":
        expected = {f"pairs-{index:05d}.parquet" for index in range(len(source.parts))}
    else:
        owners = {int(n[:-len(".parquet")].rsplit("-of-", 1)[1]) for n in names
                  if n.startswith("cluster-owner-") and n.endswith(".parquet")}
        expected = {f"cluster-owner-{o:05d}-of-{count:05d}.parquet" for count in owners for o in range(count)}
    missing = sorted(expected - names) if expected else ["pairs/*.parquet"]
    if missing:
        raise DatasetError(f"{root}: the pairs are incomplete (missing {missing[0]}); finish that dedup first "
                           "(re-running it resumes)")
