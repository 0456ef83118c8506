"""The dedup job: source -> pairs -> groups -> outputs. This module only strings the stages together,
claims the output and runs the actors."""

from __future__ import annotations

import sys
import time

import numpy as np

from pipeline.io.output import BOOKKEEPING_DIR, PLAN_FILE, DatasetError, OutputFolder, plan_key
from pipeline.io.storage import parse_storage_options
from pipeline.model.similarity import check_threshold
from pipeline.spec import DedupSpec
from pipeline.tasks.dedup.against import (
    MATCHES_DIR,
    best_matches,
    commit_matches,
    match_weights,
    read_matches,
    write_decontaminated,
)
from pipeline.tasks.dedup.against import curve as against_curve
from pipeline.tasks.dedup.collapse import COLLAPSE_DIR, COLLAPSED_FILE, Collapse, collapse
from pipeline.tasks.dedup.groups import (
    Edges,
    forest_weights,
    group,
    target_rows,
    threshold_curve,
    threshold_for,
)
from pipeline.tasks.dedup.outputs import (
    DUPLICATES_FILE,
    KEPT_DIR,
    REPORT_FILE,
    finish,
    histogram,
    write_outputs,
)
from pipeline.tasks.dedup.pairs import (
    PAIRS_DIR,
    SearchSpace,
    commit_forest,
    estimate_recall,
    exact_pairs,
    partitioned_pairs,
    read_pairs,
    searched,
    slices,
)
from pipeline.tasks.dedup.source import DedupError, Source, load_source, resolve_source

EDGE_COLUMNS = ["row", "neighbor_row", "score"]
DEDUP_FILES = (
    BOOKKEEPING_DIR,
    REPORT_FILE,
    DUPLICATES_FILE,
    PAIRS_DIR,
    KEPT_DIR,
    COLLAPSE_DIR,
    MATCHES_DIR,
    "contaminated.parquet",
    "report.html",
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
    existing = output.claim("dedup", key, plan, overwrite=spec.overwrite, owned=DEDUP_FILES, log=log)
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

    if spec.against:
        return decontaminate(spec, output, log, started)
    source = resolve_source(spec, output, log)
    if spec.with_text:
        source.text_column(spec.text_column)  # before any work: a missing column is the user's to fix
    fn = spec.similarity or source.metadata.get("similarity_fn_name", "cosine")
    normalized = bool(source.metadata.get("normalized")) and spec.similarity in (None, fn)
    if spec.threshold is not None:
        check_threshold(fn, spec.threshold, normalized)
    floor = spec.pairs_floor if spec.pairs_floor is not None else spec.threshold
    check_threshold(fn, floor, normalized)

    cluster.connect(spec.ray_address)
    actor_plan = cluster.plan_actors(spec.workers)
    workers = max(1, min(actor_plan.workers, len(source.parts)))
    key = plan_key(plan_material(source, fn, floor, spec, workers))
    plan = {
        "source": source.root,
        "similarity_fn_name": fn,
        "pairs_floor": floor,
        "mode": spec.mode,
        "raw": source.raw,
    }
    claim(output, key, plan, spec, log)
    ids = source.ids()
    identical = collapse(source, fn, output)
    space = SearchSpace.of(source, identical.reps)
    log(f"{source.rows} rows; {len(identical.members)} exact copies set aside, {space.rows} rows searched")
    loaders = slices(space, workers)
    num_cpus = actor_plan.num_cpus
    if not actor_plan.num_gpus:  # more workers than CPUs: share them, or the extra actors never start
        num_cpus = min(num_cpus, float(ray.cluster_resources().get("CPU", 1)) / len(loaders))
    timings = {}
    extra: dict = {
        "mode": spec.mode,
        "pairs_floor": floor,
        "source": source.root,
        "workers": len(loaders),
        "collapsed": {
            "identical_sets": int(len(np.unique(identical.rep_of[identical.members]))),
            "rows_collapsed": int(len(identical.members)),
            "rows_searched": int(space.rows),
        },
    }
    with index_pool(loaders, actor_plan.num_gpus, num_cpus) as pool:
        pairs_started = time.perf_counter()
        if not searched(output):
            if spec.mode == "exact":
                with tqdm(total=source.rows, unit="rows", disable=not spec.progress, file=sys.stderr) as bar:
                    forest = exact_pairs(pool, space, ids, fn, floor, spec, output, bar)
            else:
                forest, extra["partitioned"] = partitioned_pairs(
                    pool, space, ids, fn, floor, spec, output, log
                )
            commit_forest(output, forest, ids)
        timings["pairs_seconds"] = round(time.perf_counter() - pairs_started, 3)
        edges = Edges.of(read_pairs(output, EDGE_COLUMNS), identical.rep_of, identical.self_score)
        threshold = choose_threshold(spec, edges, source.rows, floor)
        if spec.mode == "partitioned":
            labels = group(source.rows, edges, threshold).labels
            extra.setdefault("partitioned", {})["recall_vs_exact"] = estimate_recall(
                pool, space, fn, threshold, spec, labels
            )
        extra["actors_replaced"] = pool.stats.actors_replaced
    extra["timings"] = timings
    report = group_and_write(spec, source, ids, edges, fn, floor, threshold, output, extra, identical.rep_of)
    report["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
    return finish(output, report, source, spec.mode)


def decontaminate(spec: DedupSpec, output: OutputFolder, log, started: float) -> dict:
    """``--against``: every input row scoring at or above the threshold with some reference row goes."""
    import ray
    from tqdm import tqdm

    from pipeline.runtime import cluster
    from pipeline.runtime.actors import index_pool

    source = resolve_source(spec, output, log)
    reference = resolve_source(spec, output, log, inputs=spec.against, folder="against-embeddings")
    fn = spec.similarity or source.metadata.get("similarity_fn_name", "cosine")
    if reference.metadata.get("fingerprint") != source.metadata.get("fingerprint"):
        raise DedupError(
            f"{reference.root}: embedded with another model (fingerprint {reference.metadata.get('fingerprint')}) "
            f"than {source.root} ({source.metadata.get('fingerprint')}); their scores are not comparable"
        )
    normalized = bool(source.metadata.get("normalized")) and spec.similarity in (None, fn)
    if spec.threshold is not None:
        check_threshold(fn, spec.threshold, normalized)
    floor = spec.pairs_floor if spec.pairs_floor is not None else spec.threshold
    check_threshold(fn, floor, normalized)
    cluster.connect(spec.ray_address)
    actor_plan = cluster.plan_actors(spec.workers)
    references = SearchSpace.of(reference, np.arange(reference.rows))
    workers = max(1, min(actor_plan.workers, len(reference.parts)))
    material = dict(
        plan_material(source, fn, floor, spec, workers), against=[p.get("sha256") for p in reference.parts]
    )
    plan = {
        "source": source.root,
        "against": reference.root,
        "similarity_fn_name": fn,
        "pairs_floor": floor,
        "mode": spec.mode,
        "raw": source.raw,
        "against_raw": reference.raw,
    }
    claim(output, plan_key(material), plan, spec, log)
    ids = source.ids()
    identical = collapse(source, fn, output)
    space = SearchSpace.of(source, identical.reps)
    loaders = slices(references, workers)
    num_cpus = actor_plan.num_cpus
    if not actor_plan.num_gpus:
        num_cpus = min(num_cpus, float(ray.cluster_resources().get("CPU", 1)) / len(loaders))
    extra: dict = {
        "mode": spec.mode,
        "pairs_floor": floor,
        "source": source.root,
        "workers": len(loaders),
        "against": {"references": [reference.root], "reference_rows": reference.rows},
    }
    search_started = time.perf_counter()
    if 0 not in output.committed(MATCHES_DIR):
        with index_pool(loaders, actor_plan.num_gpus, num_cpus) as pool:
            with tqdm(total=source.rows, unit="rows", disable=not spec.progress, file=sys.stderr) as bar:
                extra["partitioned"] = best_matches(pool, space, fn, spec, output, bar, log) or None
            extra["actors_replaced"] = pool.stats.actors_replaced
        commit_matches(output, identical.rep_of, floor, ids, reference.ids())
    extra["timings"] = {"search_seconds": round(time.perf_counter() - search_started, 3)}
    report = write_against(spec, source, read_matches(output), fn, floor, output, extra)
    report["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
    return finish(output, report, source, spec.mode)


def write_against(
    spec: DedupSpec, source: Source, matches, fn: str, floor: float, output: OutputFolder, extra: dict
) -> dict:
    target = target_rows(source.rows, spec.target_rows, spec.target_fraction)
    threshold = spec.threshold
    if target is not None:
        try:
            threshold = threshold_for(match_weights(matches), source.rows, target, floor)
        except ValueError as exc:
            raise DedupError(str(exc)) from None
        extra["target"] = {
            "rows": spec.target_rows,
            "fraction": spec.target_fraction,
            "target_rows": target,
            "threshold": threshold,
        }
    receipts, scores = write_decontaminated(source, matches, threshold, output)
    removed = len(scores)
    extra["against"]["removed"] = removed
    report = dict(
        extra,
        **{
            "rows_in": source.rows,
            "rows_out": source.rows - removed,
            "removed": removed,
            "groups": 0,
            "threshold": threshold,
            "similarity_fn_name": fn,
            "pairs_stored": matches.num_rows,
            "threshold_curve": against_curve(matches, floor),
            "score_to_kept_histogram": histogram(scores),
            "pair_score_histogram": histogram(matches.column("score").to_numpy()),
        },
    )
    report["parts"] = receipts
    return report


def choose_threshold(spec: DedupSpec, edges: Edges, rows: int, floor: float) -> float:
    """``--threshold`` as given, or the highest threshold that reaches ``--target-rows/--target-fraction``."""
    target = target_rows(rows, spec.target_rows, spec.target_fraction)
    if target is None:
        return spec.threshold
    try:
        return threshold_for(forest_weights(edges), rows, target, floor)
    except ValueError as exc:
        raise DedupError(str(exc)) from None


def group_and_write(
    spec,
    source,
    ids,
    edges: Edges,
    fn: str,
    floor: float,
    threshold: float,
    output: OutputFolder,
    extra: dict,
    rep_of,
) -> dict:
    """The threshold curve and target in the report, then the groups and outputs at ``threshold``."""
    target = target_rows(source.rows, spec.target_rows, spec.target_fraction)
    extra["threshold_curve"] = threshold_curve(edges, floor)
    if target is not None:
        extra["target"] = {
            "rows": spec.target_rows,
            "fraction": spec.target_fraction,
            "target_rows": target,
            "threshold": threshold,
        }
    return write_outputs(spec, source, ids, edges, fn, threshold, output, extra, rep_of)


def regroup(spec: DedupSpec, output: OutputFolder, log) -> dict:
    """``--from-pairs``: group an earlier run's stored pairs at a new threshold (at or above its floor), or
    at the threshold a target picks; no scoring."""
    earlier = OutputFolder(spec.from_pairs, output.storage_options)
    plan = earlier.plan()
    if plan is None:
        raise DatasetError(f"{earlier.url}: not a dedup output (no .embedpipe/plan.json)")
    floor = plan["pairs_floor"]
    if spec.threshold is not None and spec.threshold < floor:
        raise DedupError(
            f"threshold {spec.threshold} is below the pairs floor {floor} of "
            f"{earlier.url}; pairs under the floor were not stored (run a fresh dedup instead)"
        )
    fn = plan["similarity_fn_name"]
    source = load_source(OutputFolder(plan["source"], output.storage_options), raw=bool(plan.get("raw")))
    if plan.get("against"):
        matches = read_matches(earlier)
        output.mark_incomplete()
        if output.url != earlier.url:
            for folder in (MATCHES_DIR, COLLAPSE_DIR):
                for receipt in earlier.committed(folder).values():
                    output.commit_part(receipt.part, receipt.shard_id, earlier.read_part(receipt))
            output.write_json(PLAN_FILE, plan)
        extra = {
            "mode": plan["mode"],
            "pairs_floor": floor,
            "source": source.root,
            "from_pairs": earlier.url,
            "against": {"references": [plan["against"]]},
        }
        return finish(
            output, write_against(spec, source, matches, fn, floor, output, extra), source, plan["mode"]
        )
    identical = earlier.committed(COLLAPSE_DIR)
    if 0 not in identical:
        raise DatasetError(
            f"{earlier.url}: no {COLLAPSED_FILE}; it was made by an older embedpipe: run dedup again"
        )
    identical = Collapse.from_table(source.rows, earlier.read_part(identical[0]))
    edges = Edges.of(read_pairs(earlier, EDGE_COLUMNS), identical.rep_of, identical.self_score)
    threshold = choose_threshold(spec, edges, source.rows, floor)
    output.mark_incomplete()  # its outputs are about to be rewritten
    if output.url != earlier.url:
        for folder in (PAIRS_DIR, COLLAPSE_DIR):
            for receipt in earlier.committed(folder).values():
                output.commit_part(receipt.part, receipt.shard_id, earlier.read_part(receipt))
        output.write_json(PLAN_FILE, plan)
    ids = source.ids()
    log(f"re-grouping {edges.stored} stored pairs of {earlier.url} at threshold {threshold}")
    extra = {"mode": plan["mode"], "pairs_floor": floor, "source": source.root, "from_pairs": earlier.url}
    report = group_and_write(spec, source, ids, edges, fn, floor, threshold, output, extra, identical.rep_of)
    return finish(output, report, source, plan["mode"])
