"""Dedup stage 4, outputs: ``duplicates.parquet`` (each removed row, its group, the kept row and its score
to it), ``kept/`` (the source parts minus the removed rows), ``report.json``, then the manifest and
``_SUCCESS``."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.io.output import OutputFolder
from pipeline.model.similarity import similarity
from pipeline.spec import DedupSpec
from pipeline.tasks.dedup.groups import choose_kept, group
from pipeline.tasks.dedup.pairs import PAIRS_DIR
from pipeline.tasks.dedup.source import Source

KEPT_DIR = "kept"
DUPLICATES_FILE = "duplicates.parquet"
REPORT_FILE = "report.json"


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


def write_outputs(
    spec: DedupSpec,
    source: Source,
    ids: list,
    pairs: pa.Table,
    fn: str,
    threshold: float,
    output: OutputFolder,
    report: dict,
) -> dict:
    """Groups at ``threshold``, the keep policy, then kept/, duplicates.parquet, report.json, _SUCCESS."""
    started = time.perf_counter()
    n = source.rows
    groups = group(n, pairs, threshold)
    members = groups.members()
    grouped = groups.grouped
    vectors = source.rows_of(grouped, "embedding")
    lengths = None
    if spec.keep == "longest":
        column = source.metadata.get("text_column") or spec.text_column
        lengths = {row: len(text or "") for row, text in source.rows_of(grouped, column).items()}
    kept = choose_kept(spec.keep, members, fn, vectors, lengths)
    labels = groups.labels
    group_number = {label: number for number, label in enumerate(sorted(kept))}
    removed = np.array([r for r in grouped if kept[int(labels[r])] != r], dtype=np.int64)
    scores = np.array(
        [similarity(vectors[int(r)][None], vectors[kept[int(labels[r])]][None], fn)[0, 0] for r in removed],
        dtype=np.float32,
    )
    id_type = pa.array(ids[:1]).type
    duplicates = pa.table(
        {
            "id": pa.array([ids[r] for r in removed], id_type),
            "group_id": pa.array([group_number[int(labels[r])] for r in removed], pa.int64()),
            "kept_id": pa.array([ids[kept[int(labels[r])]] for r in removed], id_type),
            "score": pa.array(scores, pa.float32()),
        }
    )
    receipts = [output.commit_part(DUPLICATES_FILE, 0, duplicates)]
    receipts += write_kept(source, set(removed.tolist()), output)
    group_sizes = groups.sizes[sorted(kept)] if kept else np.zeros(0, np.int64)
    at = groups.pairs_at_threshold
    report = dict(
        report,
        **{
            "rows_in": n,
            "rows_out": n - len(removed),
            "removed": int(len(removed)),
            "groups": len(kept),
            "threshold": threshold,
            "similarity_fn_name": fn,
            "keep": spec.keep,
            "pairs_at_threshold": at.num_rows,
            "pairs_stored": pairs.num_rows,
            "group_size_histogram": size_histogram(group_sizes),
            "largest_group": int(group_sizes.max()) if len(group_sizes) else 0,
            "score_to_kept_histogram": histogram(scores),
            "pair_score_histogram": histogram(at.column("score").to_numpy()),
        },
    )
    report.setdefault("timings", {})["grouping_seconds"] = round(time.perf_counter() - started, 3)
    report["parts"] = receipts  # finish() lists them in the manifest; popped before report.json is written
    return report


def write_kept(source: Source, removed: set[int], output: OutputFolder) -> list:
    """The input rows minus the removed ones, part by part, same schema (a raw corpus loses 'embedding')."""
    offsets = source.offsets()
    receipts = []
    for index, part in enumerate(source.parts):
        table = source.read_part(index)
        keep = np.array([offsets[index] + r not in removed for r in range(int(part["rows"]))], dtype=bool)
        table = table.filter(pa.array(keep))
        if source.raw:
            table = table.drop_columns(["embedding"])
        name = part["part"].rsplit("/", 1)[-1]
        receipts.append(output.commit_part(f"{KEPT_DIR}/{name}", index, table))
    return receipts


def finish(output: OutputFolder, report: dict, source: Source, mode: str) -> dict:
    """report.json, then the manifest (duplicates, kept parts and the pairs, checked) and ``_SUCCESS``."""
    parts = report.pop("parts")
    output.write_json(REPORT_FILE, report)
    pairs = output.committed(PAIRS_DIR)
    output.finish(
        {"job": "dedup", "source": source.root, "mode": mode},
        parts=[*parts, *(pairs[n] for n in sorted(pairs))],
    )
    return report
