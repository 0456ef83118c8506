"""The mine job: hard negatives for (anchor, positive) pairs with sentence-transformers' semantics, on Ray.

Steps: read the pairs and group them as sentence-transformers does (distinct anchors, a de-duplicated
corpus of extra corpus + positives); encode anchors and corpus on EncoderActors (the encoded chunks stay
in Ray's object store); IndexShardActors each hold a slice of the corpus vectors and return every
anchor block's top candidates over their slice; the driver merges them, applies the rules
(``pipeline.compute.negatives``) and commits one output part per anchor block, so memory does not grow
with the output and a re-run resumes at the first missing part.

The one difference from ``mine_hard_negatives``: scores use the model's own similarity function and
normalization, where sentence-transformers always normalizes and uses cosine. For the usual cosine
models the two agree.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from pipeline.compute import negatives as rules
from pipeline.io import corpus as corpus_io
from pipeline.io.dataset import (
    MANIFEST_FILE,
    PLAN_FILE,
    SUCCESS_FILE,
    DatasetError,
    dataset_metadata,
    float_vectors,
    is_complete,
    join,
    read_json_file,
    write_json_file,
)
from pipeline.io.storage import commit_bytes, filesystem, parse_storage_options, with_retries
from pipeline.io.training_formats import build_table
from pipeline.spec import MineSpec, explicit_keys


class MineError(RuntimeError):
    """The mining cannot run as asked; the message says why."""


# -- inputs ---------------------------------------------------------------------------------------


def read_table(urls: list[str], storage_options: dict, what: str) -> pa.Table:
    """All rows of the given files (pairs, or a raw corpus), in file order."""
    sources = corpus_io.list_sources(urls, storage_options)
    shards = corpus_io.plan_shards(sources, 1 << 40, storage_options)
    tables = [corpus_io.read_shard(shard, None, storage_options) for shard in shards]
    if not tables:
        raise MineError(f"{what} {', '.join(urls)}: no rows")
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as exc:
        raise corpus_io.CorpusError(f"{what} {', '.join(urls)}: the files' schemas disagree ({exc})") from None


def pair_columns(table: pa.Table, spec: MineSpec, where: str) -> tuple[str, str]:
    """The anchor and positive columns: as given, else the first two text columns (as sentence-transformers)."""
    text_columns = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    anchor = spec.anchor_column or (text_columns[0] if text_columns else None)
    positive = spec.positive_column or next((c for c in text_columns if c != anchor), None)
    for role, name in (("anchor", anchor), ("positive", positive)):
        if name is None:
            raise corpus_io.CorpusError(f"{where}: no {role} column (found text columns: {text_columns or 'none'})")
        if name not in table.column_names:
            raise corpus_io.CorpusError(f"{where}: missing {role} column {name!r}; has {', '.join(table.column_names)}")
    return anchor, positive


def texts(table: pa.Table, column: str, where: str) -> list[str]:
    values = table.column(column).to_pylist()
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise corpus_io.CorpusError(f"{where}: row {row}: {column!r} is {value!r}, expected a text")
    return values


@dataclass
class CorpusSource:
    texts: list[str]
    vectors: np.ndarray | None = None  # embeddings reused from an embed output (same model), by text
    reused_from: str | None = None


def read_corpus(spec: MineSpec, storage_options: dict, fingerprint: str, corpus_prompt: str) -> CorpusSource:
    """Extra corpus texts; an embed output with the same model and prompt gives its vectors too."""
    if not spec.corpus:
        return CorpusSource([])
    url = spec.corpus[0].rstrip("/")
    if len(spec.corpus) == 1 and is_complete(url, storage_options):
        metadata = dataset_metadata(url, storage_options)
        column = metadata.get("text_column") or spec.corpus_text_column
        from pipeline.io.dataset import read_dataset

        table = read_dataset(url, storage_options)
        if column not in table.column_names:
            raise DatasetError(f"{url}: the embed output has no text column {column!r} "
                               f"(embed it with --keep-columns {column})")
        reuse = metadata.get("fingerprint") == fingerprint and (metadata.get("prompt") or "") == corpus_prompt
        vectors = float_vectors(table, metadata, url) if reuse else None
        return CorpusSource(texts(table, column, url), vectors, url if reuse else None)
    table = read_table(spec.corpus, storage_options, "corpus")
    if spec.corpus_text_column not in table.column_names:
        raise corpus_io.CorpusError(f"{', '.join(spec.corpus)}: missing corpus text column "
                                    f"{spec.corpus_text_column!r}; has {', '.join(table.column_names)}")
    return CorpusSource(texts(table, spec.corpus_text_column, ", ".join(spec.corpus)))


# -- encoding on the actors ------------------------------------------------------------------------


def encode_chunks(actors: list, items: list[str], prompt: str, per_task: int) -> list:
    """Encode texts in chunks spread over the actors; returns the chunks' object refs, in order."""
    refs = []
    for index, start in enumerate(range(0, len(items), per_task)):
        actor = actors[index % len(actors)]
        refs.append(actor.encode.remote(items[start : start + per_task], prompt))
    return refs


@dataclass(frozen=True)
class VectorsLoader:
    """Picklable: a slice of the corpus vectors, from encoded chunks (object refs) and reused rows."""

    chunks: tuple
    reused: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        import ray

        arrays = ([self.reused] if self.reused is not None else []) + [np.asarray(a) for a in ray.get(list(self.chunks))]
        return np.concatenate(arrays).astype(np.float32, copy=False)


# -- the job --------------------------------------------------------------------------------------


def mining_options(spec: MineSpec, max_positives: int) -> rules.MiningOptions:
    names = ("range_min", "range_max", "max_score", "min_score", "absolute_margin", "relative_margin",
             "num_negatives", "sampling_strategy", "seed", "include_positives", "output_format", "output_scores")
    values = {name: getattr(spec, name) for name in names}
    values = rules.apply_preset(values, spec.preset, set(explicit_keys(spec)))
    return rules.resolve_options(rules.MiningOptions(**values), max_positives)


def prompts_for(spec: MineSpec, description: dict) -> tuple[str, str]:
    """Anchors use the 'query' prompt and the corpus the 'document' prompt, as encode_query/encode_document."""
    prompts = description.get("prompts") or {}

    def pick(literal: str | None, name: str | None, default_name: str) -> str:
        if literal is not None:
            return literal
        if name is not None:
            if name not in prompts:
                raise ValueError(f"prompt name {name!r} is not defined by the model "
                                 f"(defined: {', '.join(sorted(prompts)) or 'none'})")
            return prompts[name]
        return prompts.get(default_name, "")

    return (pick(spec.query_prompt, spec.query_prompt_name, "query"),
            pick(spec.corpus_prompt, spec.corpus_prompt_name, "document"))


def plan_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def prepare_output(output: str, key: str, spec: MineSpec, storage_options: dict, log) -> None:
    existing = read_json_file(output, PLAN_FILE, storage_options)
    if existing is not None and existing.get("key") != key:
        if not spec.overwrite:
            raise DatasetError(f"{output}: holds a mining output made with other input or options; "
                               "use --overwrite or choose another --output")
        log(f"replacing the existing mining output at {output}")
        fs, path = filesystem(output, storage_options)
        for entry in fs.ls(path, detail=False):
            base = entry.rsplit("/", 1)[-1]
            if base.startswith("part-") or base in (SUCCESS_FILE, PLAN_FILE, MANIFEST_FILE, "report.json"):
                fs.rm(entry, recursive=True)
        existing = None
    if existing is None:
        write_json_file(output, PLAN_FILE, {"key": key}, storage_options)


def part_exists(output: str, name: str, storage_options: dict) -> bool:
    fs, path = filesystem(output, storage_options)
    return bool(with_retries(lambda: fs.exists(join(path, name)), what=join(output, name)))


def commit_part(output: str, name: str, table: pa.Table, storage_options: dict) -> int:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    fs, path = filesystem(output, storage_options)
    with_retries(lambda: commit_bytes(fs, join(path, name), data), what=join(output, name))
    return len(data)


def histogram(values: np.ndarray, bins: int = 20) -> dict:
    values = values[np.isfinite(values)]
    if not len(values):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def run_mine(spec: MineSpec, log=None) -> dict:
    """Run the mining job; returns report.json's content."""
    import ray
    import torch
    from tqdm import tqdm

    from pipeline.compute.knn import merge_topk
    from pipeline.model.files import fingerprint, local_model_dir
    from pipeline.model.modules import check_model
    from pipeline.runtime import actors as ray_actors
    from pipeline.runtime import cluster

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    output = spec.output.rstrip("/")

    # Everything that can be wrong with the input is found before Ray starts.
    where = ", ".join(spec.input)
    pairs = read_table(spec.input, storage_options, "pairs")
    anchor_col, positive_col = pair_columns(pairs, spec, where)
    anchors_in, positives_in = texts(pairs, anchor_col, where), texts(pairs, positive_col, where)
    model_dir = local_model_dir(spec.model, storage_options)
    check_model(model_dir, spec.allow_pickle)
    model_fingerprint = fingerprint(model_dir, {"truncate_dim": None})

    cluster.connect(spec.ray_address)
    plan = cluster.plan_actors(spec.workers)
    encoders = ray_actors.start_actors(plan, str(model_dir), {"allow_pickle": spec.allow_pickle,
                                                              "storage_options": storage_options})
    description = ray.get(encoders[0].describe.remote())
    query_prompt, corpus_prompt = prompts_for(spec, description)
    extra = read_corpus(spec, storage_options, model_fingerprint, corpus_prompt)
    groups = rules.group_pairs(anchors_in, positives_in, extra.texts)
    options = mining_options(spec, groups.max_positives)
    fn = description["similarity_fn_name"]
    k = rules.candidate_count(options, groups.max_positives, len(groups.corpus))
    key = plan_key({"model": model_fingerprint, "pairs": hashlib.sha256(
        json.dumps([anchors_in, positives_in]).encode()).hexdigest(), "corpus": hashlib.sha256(
        json.dumps(extra.texts).encode()).hexdigest(), "options": asdict(options), "query_prompt": query_prompt,
        "corpus_prompt": corpus_prompt, "columns": [anchor_col, positive_col], "block": spec.anchors_per_block})
    prepare_output(output, key, spec, storage_options, log)
    log(f"{len(pairs)} pairs: {len(groups.anchors)} anchors, corpus of {len(groups.corpus)} texts; "
        f"{k} candidates per anchor; {plan.workers} {'GPU' if plan.num_gpus else 'CPU'} worker(s)")

    # Encode: the corpus (reusing an embed output's vectors for its leading texts) and the anchors.
    timings = {}
    encode_started = time.perf_counter()
    reused = 0
    if extra.vectors is not None:
        # The corpus starts with the distinct extra texts, each at its first occurrence.
        position = {text: i for i, text in reversed(list(enumerate(extra.texts)))}
        reused = len(position)
        reused_vectors = extra.vectors[[position[t] for t in groups.corpus[:reused]]]
    else:
        reused_vectors = None
    corpus_refs = encode_chunks(encoders, groups.corpus[reused:], corpus_prompt, spec.texts_per_task)
    anchor_refs = encode_chunks(encoders, groups.anchors, query_prompt, spec.anchors_per_block)
    ray.wait(corpus_refs + anchor_refs, num_returns=len(corpus_refs) + len(anchor_refs))
    timings["encode_seconds"] = round(time.perf_counter() - encode_started, 3)
    for actor in encoders:
        ray.kill(actor)

    # Index actors: contiguous slices of the corpus chunks.
    workers = max(1, min(plan.workers, len(corpus_refs) + (reused_vectors is not None)))
    chunk_sizes = [min(spec.texts_per_task, len(groups.corpus) - reused - i * spec.texts_per_task)
                   for i in range(len(corpus_refs))]
    loaders, offset = [], 0
    per_worker = -(-len(corpus_refs) // workers) if corpus_refs else 0
    for w in range(workers):
        chunk_slice = slice(w * per_worker, (w + 1) * per_worker)
        extra_rows = reused_vectors if (w == 0 and reused_vectors is not None) else None
        loader = VectorsLoader(tuple(corpus_refs[chunk_slice]), extra_rows)
        size = sum(chunk_sizes[chunk_slice]) + (len(extra_rows) if extra_rows is not None else 0)
        if size:
            loaders.append((loader, offset))
        offset += size
    index_actors = ray_actors.start_index_actors(loaders, plan.num_gpus, plan.num_cpus)

    totals = rules.MiningStats()
    positive_scores_all, negative_scores_all = [], []
    rows_out = 0
    mine_started = time.perf_counter()
    blocks = range(0, len(groups.anchors), spec.anchors_per_block)
    try:
        with tqdm(total=len(groups.anchors), unit="anchors", disable=not spec.progress, file=sys.stderr) as bar:
            for number, start in enumerate(blocks):
                stop = min(start + spec.anchors_per_block, len(groups.anchors))
                name = f"part-{number:05d}.parquet"
                anchor_vectors = ray.get(anchor_refs[number])
                positive_idx = groups.positive_indices[start:stop]
                needed = np.unique(np.concatenate(positive_idx))
                found = [ray.get(a.rows.remote(needed)) for a in index_actors]
                lookup = {int(r): v for rows, vecs in found for r, v in zip(rows, vecs, strict=True)}
                pos_scores = [scores_between(anchor_vectors[i], np.stack([lookup[int(p)] for p in idx]), fn)
                              for i, idx in enumerate(positive_idx)]
                positive_scores_all.extend(np.concatenate(pos_scores).tolist())
                receipt_name = f"_parts/{name.replace('.parquet', '.json')}"
                receipt = read_json_file(output, receipt_name, storage_options)
                if receipt is not None and part_exists(output, name, storage_options):
                    totals = totals + stats_from(receipt["stats"])
                    negative_scores_all.extend(receipt["negative_scores"])
                    rows_out += receipt["rows"]
                    bar.update(stop - start)
                    continue
                partial = ray.get([a.topk.remote(anchor_vectors, fn, k, spec.block_size) for a in index_actors])
                scores, indices = merge_topk([(torch.as_tensor(s), torch.as_tensor(i)) for s, i in partial], k)
                mined = rules.select_negatives(scores, indices, positive_idx, pos_scores, options,
                                               groups.max_positives, anchor_offset=start)
                totals = totals + mined.stats
                negative_scores_all.extend(s for block in mined.negative_scores for s in block.tolist())
                table = build_table(
                    options.output_format, anchors=groups.anchors[start:stop],
                    positives=[[groups.corpus[p] for p in idx] for idx in positive_idx],
                    positive_scores=pos_scores,
                    negatives=[[groups.corpus[n] for n in idx] for idx in mined.negative_indices],
                    negative_scores=mined.negative_scores, num_negatives=options.num_negatives,
                    output_scores=options.output_scores, anchor_column=anchor_col, positive_column=positive_col,
                )
                commit_part(output, name, table, storage_options)
                block_negatives = [s for block in mined.negative_scores for s in block.tolist()]
                write_json_file(output, receipt_name, {"rows": table.num_rows, "stats": mined.stats.as_dict(),
                                                       "negative_scores": block_negatives}, storage_options)
                rows_out += table.num_rows
                bar.update(stop - start)
    finally:
        for actor in index_actors:
            ray.kill(actor)
    timings["mine_seconds"] = round(time.perf_counter() - mine_started, 3)
    timings["total_seconds"] = round(time.perf_counter() - started, 3)
    report = {
        "output": output, "output_format": options.output_format, "pairs_in": len(pairs),
        "anchors_in": len(groups.anchors), "corpus_size": len(groups.corpus), "corpus_reused_from": extra.reused_from,
        "rows_out": rows_out, "parts": len(blocks), "candidates_per_anchor": k,
        "anchors_short_of_negatives": totals.short_anchors, "negatives": totals.negatives,
        "dropped": totals.dropped, "padding": totals.padding, "similarity_fn_name": fn,
        "options": asdict(options), "query_prompt": query_prompt, "corpus_prompt": corpus_prompt,
        "positive_score_histogram": histogram(np.asarray(positive_scores_all, dtype=np.float32)),
        "negative_score_histogram": histogram(np.asarray(negative_scores_all, dtype=np.float32)),
        "timings": timings, "workers": plan.workers,
    }
    write_json_file(output, "report.json", report, storage_options)
    fs, path = filesystem(output, storage_options)
    with_retries(lambda: commit_bytes(fs, join(path, SUCCESS_FILE), b""), what=join(output, SUCCESS_FILE))
    return report


def stats_from(data: dict) -> rules.MiningStats:
    return rules.MiningStats(**data)


def scores_between(anchor: np.ndarray, positives: np.ndarray, fn: str) -> np.ndarray:
    from pipeline.model.similarity import similarity

    return similarity(anchor[None, :], positives, fn)[0]
