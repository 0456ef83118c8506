"""Dedup stage 4, outputs: ``duplicates.parquet`` (each removed row, its group, the kept row and its score
to it), ``kept/`` (the source parts minus the removed rows), ``report.json``, then the manifest and
``.embedpipe/SUCCESS``."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.io.output import OutputFolder
from pipeline.model.similarity import similarity
from pipeline.spec import DedupSpec
from pipeline.tasks.dedup.collapse import COLLAPSE_DIR
from pipeline.tasks.dedup.groups import Edges, choose_kept, group
from pipeline.tasks.dedup.pairs import PAIRS_DIR
from pipeline.tasks.dedup.report_html import render_report
from pipeline.tasks.dedup.source import Source

KEPT_DIR = "kept"
DUPLICATES_FILE = "duplicates.parquet"
REPORT_FILE = "report.json"
HTML_REPORT_FILE = "report.html"
SAMPLE_GROUPS = 5  # largest and random groups shown in report.html
SAMPLE_ROWS = 20  # members shown per group


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
    ids: pa.Array,
    edges: Edges,
    fn: str,
    threshold: float,
    output: OutputFolder,
    report: dict,
    rep_of: np.ndarray | None = None,
) -> dict:
    """Groups at ``threshold``, the keep policy, then duplicates.parquet and kept/ (report.json, the
    manifest and the success marker follow in `finish`)."""
    started = time.perf_counter()
    n = source.rows
    rep_of = np.arange(n, dtype=np.int64) if rep_of is None else rep_of
    groups = group(n, edges, threshold)
    members = groups.members()
    grouped = groups.grouped
    vectors = source.rows_of(np.unique(rep_of[grouped]), "embedding")  # one vector per identical set
    lengths = None
    if spec.keep == "longest":
        column = source.metadata.get("text_column") or spec.text_column
        lengths = source.lengths_of(grouped, column)
    kept = choose_kept(spec.keep, members, fn, vectors, lengths, rep_of)
    labels = groups.labels
    group_number = {label: number for number, label in enumerate(sorted(kept))}
    removed = np.array([r for r in grouped if kept[int(labels[r])] != r], dtype=np.int64)
    scores = scores_to_kept(removed, labels, kept, rep_of, vectors, fn)
    kept_rows = np.array([kept[int(labels[r])] for r in removed], dtype=np.int64)
    duplicates = pa.table(
        {
            "id": ids.take(pa.array(removed, pa.int64())),
            "group_id": pa.array([group_number[int(labels[r])] for r in removed], pa.int64()),
            "kept_id": ids.take(pa.array(kept_rows, pa.int64())),
            "score": pa.array(scores, pa.float32()),
        }
    )
    if spec.with_text:
        column = source.text_column(spec.text_column)
        texts = source.rows_of(np.union1d(removed, kept_rows), column)
        duplicates = duplicates.append_column("text", pa.array([texts[int(r)] for r in removed], pa.string()))
        duplicates = duplicates.append_column(
            "kept_text", pa.array([texts[int(r)] for r in kept_rows], pa.string())
        )
    receipts = [output.commit_part(DUPLICATES_FILE, 0, duplicates)]
    receipts += write_kept(source, set(removed.tolist()), output)
    group_sizes = groups.sizes[sorted(kept)] if kept else np.zeros(0, np.int64)
    at = edges.w[: edges.stored][edges.w[: edges.stored].astype(np.float64) >= threshold]
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
            "pairs_at_threshold": groups.pairs_at_threshold,
            "pairs_stored": edges.stored,
            "group_size_histogram": size_histogram(group_sizes),
            "largest_group": int(group_sizes.max()) if len(group_sizes) else 0,
            "score_to_kept_histogram": histogram(scores),
            "pair_score_histogram": histogram(at),
        },
    )
    report.setdefault("timings", {})["grouping_seconds"] = round(time.perf_counter() - started, 3)
    report["parts"] = receipts  # finish() lists them in the manifest; popped before report.json is written
    report["sample_groups"] = sample_groups(
        source, groups.sizes, members, kept, rep_of, vectors, fn, spec.seed
    )
    return report


def sample_groups(
    source: Source,
    sizes,
    members: dict,
    kept: dict,
    rep_of,
    vectors: dict,
    fn: str,
    seed: int,
    count: int = SAMPLE_GROUPS,
    rows_each: int = SAMPLE_ROWS,
) -> list[dict]:
    """The largest groups and some random ones, with their texts (kept row first), for report.html."""
    labels = sorted(kept, key=lambda label: (-int(sizes[label]), label))
    largest = labels[:count]
    rest = labels[count:]
    rng = np.random.default_rng(seed)
    random = sorted(rng.choice(rest, size=min(count, len(rest)), replace=False).tolist()) if rest else []
    picked = [(label, "largest") for label in largest] + [(int(label), "random") for label in random]
    shown = {
        label: [kept[label], *[r for r in members[label] if r != kept[label]][: rows_each - 1]]
        for label, _ in picked
    }
    column = source.metadata.get("text_column")
    wanted = [r for rows in shown.values() for r in rows]
    texts = source.rows_of(wanted, column) if column and wanted and has_column(source, column) else {}
    ids = source.rows_of(wanted, "id") if wanted else {}
    number = {label: n for n, label in enumerate(sorted(kept))}
    out = []
    for label, kind in picked:
        rows = shown[label]
        anchor = vectors[int(rep_of[rows[0]])][None]
        scores = [float(similarity(vectors[int(rep_of[r])][None], anchor, fn)[0, 0]) for r in rows[1:]]
        out.append(
            {
                "group_id": number[label],
                "size": int(sizes[label]),
                "kind": kind,
                "members": [
                    {
                        "id": ids.get(r),
                        "text": texts.get(r),
                        "score": None if k == 0 else float(scores[k - 1]),
                        "kept": k == 0,
                    }
                    for k, r in enumerate(rows)
                ],
            }
        )
    return out


def has_column(source: Source, column: str) -> bool:
    return column in source.folder.read_schema(source.parts[0]["part"]).names


def scores_to_kept(
    removed: np.ndarray, labels: np.ndarray, kept: dict, rep_of: np.ndarray, vectors: dict, fn: str
) -> np.ndarray:
    """Each removed row's score to its group's kept row, computed once per (identical set, kept row)."""
    cache: dict[tuple[int, int], float] = {}
    out = np.zeros(len(removed), dtype=np.float32)
    for k, row in enumerate(removed):
        key = (int(rep_of[row]), int(rep_of[kept[int(labels[row])]]))
        if key not in cache:
            cache[key] = float(similarity(vectors[key[0]][None], vectors[key[1]][None], fn)[0, 0])
        out[k] = cache[key]
    return out


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
    """report.json, then the manifest (duplicates, kept parts and the pairs, checked) and ``.embedpipe/SUCCESS``."""
    parts = report.pop("parts")
    groups = report.pop("sample_groups", [])
    output.write_json(REPORT_FILE, report)
    output.write_bytes(HTML_REPORT_FILE, render_report(report, groups).encode())
    stored = [*output.committed(PAIRS_DIR).values(), *output.committed(COLLAPSE_DIR).values()]
    output.finish({"job": "dedup", "source": source.root, "mode": mode}, parts=[*parts, *stored])
    return report
