"""The dedup job: source -> pairs -> groups -> outputs. This module only strings the stages together,
claims the output and runs the actors."""

from __future__ import annotations

import sys
import time

from pipeline.io.output import PLAN_FILE, RECEIPTS_DIR, SUCCESS_FILE, DatasetError, OutputFolder, plan_key
from pipeline.io.storage import parse_storage_options
from pipeline.model.similarity import check_threshold
from pipeline.spec import DedupSpec
from pipeline.tasks.dedup.outputs import DUPLICATES_FILE, KEPT_DIR, REPORT_FILE, finish, write_outputs
from pipeline.tasks.dedup.pairs import (
    PAIRS_DIR,
    estimate_recall,
    exact_pairs,
    partitioned_pairs,
    read_pairs,
    slices,
)
from pipeline.tasks.dedup.source import DedupError, Source, load_source, resolve_source

DEDUP_FILES = (
    SUCCESS_FILE,
    REPORT_FILE,
    DUPLICATES_FILE,
    PLAN_FILE,
    PAIRS_DIR,
    KEPT_DIR,
    RECEIPTS_DIR,
    "_manifest.json",
)


def plan_material(source: Source, fn: str, floor: float, spec: DedupSpec, workers: int) -> dict:
    """What decides the stored pairs (not the threshold: a resumed run may group at another one)."""
    return {
        "parts": [p.get("sha256") for p in source.parts],
        "fn": fn,
        "floor": floor,
        "mode": spec.mode,
        "clusters": spec.clusters,
        "seed": spec.seed,
        "iterations": spec.kmeans_iterations,
        "workers": workers if spec.mode == "partitioned" else None,
    }


def claim(output: OutputFolder, key: str, plan: dict, spec: DedupSpec, log) -> None:
    existing = output.claim(
        "dedup", key, plan, overwrite=spec.overwrite, owned=DEDUP_FILES.__contains__, log=log
    )
    if existing is not None:
        output.mark_incomplete()  # a resumed dedup rewrites its outputs (the threshold may differ)


def run_dedup(spec: DedupSpec, log=None) -> dict:
    """Run the dedup job; returns report.json's content."""
    import ray
    from tqdm import tqdm

    from pipeline.runtime import cluster
    from pipeline.runtime.actors import index_pool

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    output = OutputFolder(spec.output, parse_storage_options(spec.storage_option))
    if spec.from_pairs:
        return regroup(spec, output, log)

    source = resolve_source(spec, output, log)
    fn = spec.similarity or source.metadata.get("similarity_fn_name", "cosine")
    normalized = bool(source.metadata.get("normalized")) and spec.similarity in (None, fn)
    check_threshold(fn, spec.threshold, normalized)
    floor = spec.pairs_floor if spec.pairs_floor is not None else spec.threshold
    check_threshold(fn, floor, normalized)

    cluster.connect(spec.ray_address)
    actor_plan = cluster.plan_actors(spec.workers)
    loaders = slices(source, actor_plan.workers)
    key = plan_key(plan_material(source, fn, floor, spec, len(loaders)))
    claim(
        output,
        key,
        {
            "source": source.root,
            "similarity_fn_name": fn,
            "pairs_floor": floor,
            "mode": spec.mode,
            "raw": source.raw,
        },
        spec,
        log,
    )
    ids = source.ids()
    num_cpus = actor_plan.num_cpus
    if not actor_plan.num_gpus:  # more workers than CPUs: share them, or the extra actors never start
        num_cpus = min(num_cpus, float(ray.cluster_resources().get("CPU", 1)) / len(loaders))
    timings = {}
    extra: dict = {"mode": spec.mode, "pairs_floor": floor, "source": source.root, "workers": len(loaders)}
    with index_pool(loaders, actor_plan.num_gpus, num_cpus) as pool:
        pairs_started = time.perf_counter()
        if spec.mode == "exact":
            with tqdm(total=source.rows, unit="rows", disable=not spec.progress, file=sys.stderr) as bar:
                exact_pairs(pool, source, ids, fn, floor, spec, output, bar)
        else:
            extra["partitioned"] = partitioned_pairs(pool, source, ids, fn, floor, spec, output, log)
        timings["pairs_seconds"] = round(time.perf_counter() - pairs_started, 3)
        pairs = read_pairs(output, spec.mode, source)
        if spec.mode == "partitioned":
            extra["partitioned"]["recall_vs_exact"] = estimate_recall(
                pool, source, fn, spec.threshold, spec, pairs
            )
        extra["actors_replaced"] = pool.stats.actors_replaced
    extra["timings"] = timings
    report = write_outputs(spec, source, ids, pairs, fn, spec.threshold, output, extra)
    report["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
    return finish(output, report, source, spec.mode)


def regroup(spec: DedupSpec, output: OutputFolder, log) -> dict:
    """``--from-pairs``: group an earlier run's stored pairs at a new (stricter) threshold; no scoring."""
    earlier = OutputFolder(spec.from_pairs, output.storage_options)
    plan = earlier.plan()
    if plan is None or not earlier.committed(PAIRS_DIR):
        raise DatasetError(f"{earlier.url}: not a dedup output (no _plan.json or pairs/)")
    if spec.threshold < plan["pairs_floor"]:
        raise DedupError(
            f"threshold {spec.threshold} is below the pairs floor {plan['pairs_floor']} of "
            f"{earlier.url}; pairs under the floor were not stored (run a fresh dedup instead)"
        )
    fn = plan["similarity_fn_name"]
    source = load_source(OutputFolder(plan["source"], output.storage_options), raw=bool(plan.get("raw")))
    pairs = read_pairs(earlier, plan["mode"], source)
    output.mark_incomplete()  # its outputs are about to be rewritten
    if output.url != earlier.url:
        for receipt in earlier.committed(PAIRS_DIR).values():
            output.commit_part(receipt.part, receipt.shard_id, earlier.read_part(receipt))
        output.write_json(PLAN_FILE, plan)
    ids = source.ids()
    log(f"re-grouping {pairs.num_rows} stored pairs of {earlier.url} at threshold {spec.threshold}")
    extra = {
        "mode": plan["mode"],
        "pairs_floor": plan["pairs_floor"],
        "source": source.root,
        "from_pairs": earlier.url,
    }
    report = write_outputs(spec, source, ids, pairs, fn, spec.threshold, output, extra)
    return finish(output, report, source, plan["mode"])
