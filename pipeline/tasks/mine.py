"""The mine job: hard negatives for (anchor, positive) pairs with sentence-transformers' semantics, on Ray.

Steps: read the pairs and group them as sentence-transformers does (distinct anchors, a de-duplicated
corpus of extra corpus + positives) and check every input and option, all on the driver before Ray
starts or anything is written; encode the corpus and the anchors of the parts still missing on
EncoderActors (the encoded chunks stay in Ray's object store); IndexShardActors each hold a slice of the
corpus vectors and return every anchor block's top candidates over their slice; the driver merges them,
applies the rules (``pipeline.compute.negatives``) and commits one output part (and its receipt under
``_parts/``) per anchor block, so memory does not grow with the output. A re-run with the same input and
options skips the committed parts (and needs no Ray at all when every part is there); report.json is
built from the receipts, so it is the same either way.

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
    claim_output,
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


def is_mine_file(name: str) -> bool:
    return name.startswith("part-") or name in (SUCCESS_FILE, PLAN_FILE, MANIFEST_FILE, "report.json", "_parts")


def prepare_output(output: str, key: str, spec: MineSpec, storage_options: dict, log) -> None:
    claim_output(output, key, {}, storage_options, job="mining", overwrite=spec.overwrite, owned=is_mine_file,
                 log=log)


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


def check_output_columns(options: rules.MiningOptions, anchor_col: str, positive_col: str) -> None:
    """Column names that would clash with the format's own columns fail now, not after the encoding."""
    build_table(options.output_format, anchors=[], positives=[], positive_scores=[], negatives=[],
                negative_scores=[], num_negatives=options.num_negatives, output_scores=options.output_scores,
                anchor_column=anchor_col, positive_column=positive_col)


def committed_parts(output: str, count: int, storage_options: dict) -> dict[int, dict]:
    """Receipts of the parts a previous run committed (part and receipt both present)."""
    done = {}
    for number in range(count):
        name = f"part-{number:05d}.parquet"
        receipt = read_json_file(output, f"_parts/part-{number:05d}.json", storage_options)
        if receipt is not None and "positive_scores" in receipt and part_exists(output, name, storage_options):
            done[number] = receipt
    return done


def run_mine(spec: MineSpec, log=None) -> dict:
    """Run the mining job; returns report.json's content."""
    from tqdm import tqdm

    from pipeline.model.config import load_model_config
    from pipeline.model.files import fingerprint, local_model_dir
    from pipeline.model.modules import check_model

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    output = spec.output.rstrip("/")

    # Everything that can be wrong with the input or the options is found before Ray starts and
    # before anything is written: columns, texts, model, prompts, corpus, grouping, options, names.
    where = ", ".join(spec.input)
    pairs = read_table(spec.input, storage_options, "pairs")
    anchor_col, positive_col = pair_columns(pairs, spec, where)
    anchors_in, positives_in = texts(pairs, anchor_col, where), texts(pairs, positive_col, where)
    model_dir = local_model_dir(spec.model, storage_options)
    check_model(model_dir, spec.allow_pickle)
    model_fingerprint = fingerprint(model_dir, {"truncate_dim": None})
    model_config = load_model_config(model_dir)
    query_prompt, corpus_prompt = prompts_for(spec, {"prompts": model_config.prompts})
    extra = read_corpus(spec, storage_options, model_fingerprint, corpus_prompt)
    try:
        groups = rules.group_pairs(anchors_in, positives_in, extra.texts)
    except ValueError as exc:
        raise MineError(f"pairs {where}: {exc}") from None
    options = mining_options(spec, groups.max_positives)
    check_output_columns(options, anchor_col, positive_col)
    fn = model_config.similarity_fn_name
    k = rules.candidate_count(options, groups.max_positives, len(groups.corpus))
    key = plan_key({"model": model_fingerprint, "pairs": hashlib.sha256(
        json.dumps([anchors_in, positives_in]).encode()).hexdigest(), "corpus": hashlib.sha256(
        json.dumps(extra.texts).encode()).hexdigest(), "options": asdict(options), "query_prompt": query_prompt,
        "corpus_prompt": corpus_prompt, "columns": [anchor_col, positive_col], "block": spec.anchors_per_block})
    prepare_output(output, key, spec, storage_options, log)

    blocks = list(range(0, len(groups.anchors), spec.anchors_per_block))
    done = committed_parts(output, len(blocks), storage_options)
    todo = [number for number in range(len(blocks)) if number not in done]
    log(f"{len(pairs)} pairs: {len(groups.anchors)} anchors, corpus of {len(groups.corpus)} texts; "
        f"{k} candidates per anchor; {len(blocks)} part(s), {len(done)} already committed")
    timings: dict = {}
    workers = 0
    if todo:
        fs, path = filesystem(output, storage_options)
        if with_retries(lambda: fs.exists(join(path, SUCCESS_FILE)), what=output):
            # A part went missing since the last complete run: the output is not complete until it is back.
            with_retries(lambda: fs.rm_file(join(path, SUCCESS_FILE)), what=output)
        workers = mine_blocks(spec, groups, extra, options, fn, k, query_prompt, corpus_prompt, blocks, todo,
                              done, output, anchor_col, positive_col, model_dir, storage_options, timings,
                              tqdm, log)

    # The report comes from the receipts, so a resumed run reports exactly what a single run would.
    totals = rules.MiningStats()
    for number in range(len(blocks)):
        totals = totals + stats_from(done[number]["stats"])
    positive_scores_all = np.concatenate([np.asarray(done[n]["positive_scores"], np.float32) for n in sorted(done)])
    negative_scores_all = np.concatenate([np.asarray(done[n]["negative_scores"], np.float32) for n in sorted(done)])
    timings["total_seconds"] = round(time.perf_counter() - started, 3)
    report = {
        "output": output, "output_format": options.output_format, "pairs_in": len(pairs),
        "anchors_in": len(groups.anchors), "anchors_out": sum(done[n]["anchors_out"] for n in done),
        "corpus_size": len(groups.corpus), "corpus_reused_from": extra.reused_from,
        "rows_out": sum(done[n]["rows"] for n in done), "parts": len(blocks),
        "parts_written": len(todo), "parts_resumed": len(blocks) - len(todo), "candidates_per_anchor": k,
        "anchors_short_of_negatives": totals.short_anchors, "negatives": totals.negatives,
        "dropped": totals.dropped, "padding": totals.padding, "similarity_fn_name": fn,
        "options": asdict(options), "query_prompt": query_prompt, "corpus_prompt": corpus_prompt,
        "positive_score_histogram": histogram(positive_scores_all),
        "negative_score_histogram": histogram(negative_scores_all),
        "timings": timings, "workers": workers,
    }
    write_json_file(output, "report.json", report, storage_options)
    fs, path = filesystem(output, storage_options)
    with_retries(lambda: commit_bytes(fs, join(path, SUCCESS_FILE), b""), what=join(output, SUCCESS_FILE))
    return report


def mine_blocks(spec, groups, extra, options, fn, k, query_prompt, corpus_prompt, blocks, todo, done, output,
                anchor_col, positive_col, model_dir, storage_options, timings, tqdm, log) -> int:
    """Encode on the encoder actors, search on the index actors, commit the parts in ``todo`` (receipts
    go into ``done``); returns the number of workers."""
    import ray
    import torch

    from pipeline.compute.knn import merge_topk
    from pipeline.runtime import actors as ray_actors
    from pipeline.runtime import cluster

    cluster.connect(spec.ray_address)
    plan = cluster.plan_actors(spec.workers)
    log(f"{len(todo)} part(s) to mine on {plan.workers} {'GPU' if plan.num_gpus else 'CPU'} worker(s)")
    encoders = ray_actors.start_actors(plan, str(model_dir), {"allow_pickle": spec.allow_pickle,
                                                              "storage_options": storage_options})

    # Encode: the corpus (reusing an embed output's vectors for its leading texts) and the anchors of
    # the parts still to write.
    encode_started = time.perf_counter()
    reused = 0
    if extra.vectors is not None:
        # The corpus starts with the distinct extra texts, each at its first occurrence.
        position = {text: i for i, text in reversed(list(enumerate(extra.texts)))}
        reused = len(position)
        reused_vectors = extra.vectors[[position[t] for t in groups.corpus[:reused]]]
    else:
        reused_vectors = None
    try:
        corpus_refs = encode_chunks(encoders, groups.corpus[reused:], corpus_prompt, spec.texts_per_task)
        anchor_refs = {}
        for i, number in enumerate(todo):
            start = blocks[number]
            anchor_refs[number] = encoders[i % len(encoders)].encode.remote(
                groups.anchors[start : start + spec.anchors_per_block], query_prompt)
        refs = corpus_refs + list(anchor_refs.values())
        ray.wait(refs, num_returns=len(refs), fetch_local=False)  # the vectors stay in the object store
    finally:
        for actor in encoders:
            ray.kill(actor)
    timings["encode_seconds"] = round(time.perf_counter() - encode_started, 3)

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

    mine_started = time.perf_counter()
    todo_anchors = sum(min(spec.anchors_per_block, len(groups.anchors) - blocks[n]) for n in todo)
    try:
        with tqdm(total=todo_anchors, unit="anchors", disable=not spec.progress, file=sys.stderr) as bar:
            for number in todo:
                start = blocks[number]
                stop = min(start + spec.anchors_per_block, len(groups.anchors))
                name = f"part-{number:05d}.parquet"
                anchor_vectors = ray.get(anchor_refs.pop(number))
                positive_idx = groups.positive_indices[start:stop]
                needed = np.unique(np.concatenate(positive_idx))
                found = ray.get([a.rows.remote(needed) for a in index_actors])
                lookup = {int(r): v for rows, vecs in found for r, v in zip(rows, vecs, strict=True)}
                pos_scores = [scores_between(anchor_vectors[i], np.stack([lookup[int(p)] for p in idx]), fn)
                              for i, idx in enumerate(positive_idx)]
                partial = ray.get([a.topk.remote(anchor_vectors, fn, k, spec.block_size) for a in index_actors])
                scores, indices = merge_topk([(torch.as_tensor(s), torch.as_tensor(i)) for s, i in partial], k)
                mined = rules.select_negatives(scores, indices, positive_idx, pos_scores, options,
                                               groups.max_positives, anchor_offset=start)
                table = build_table(
                    options.output_format, anchors=groups.anchors[start:stop],
                    positives=[[groups.corpus[p] for p in idx] for idx in positive_idx],
                    positive_scores=pos_scores,
                    negatives=[[groups.corpus[n] for n in idx] for idx in mined.negative_indices],
                    negative_scores=mined.negative_scores, num_negatives=options.num_negatives,
                    output_scores=options.output_scores, anchor_column=anchor_col, positive_column=positive_col,
                )
                commit_part(output, name, table, storage_options)
                receipt = {
                    "rows": table.num_rows, "anchors_out": len(set(table.column(anchor_col).to_pylist())),
                    "stats": mined.stats.as_dict(),
                    "positive_scores": [float(s) for block in pos_scores for s in block],
                    "negative_scores": [float(s) for block in mined.negative_scores for s in block],
                }
                write_json_file(output, f"_parts/part-{number:05d}.json", receipt, storage_options)
                done[number] = receipt
                bar.update(stop - start)
    finally:
        for actor in index_actors:
            ray.kill(actor)
    timings["mine_seconds"] = round(time.perf_counter() - mine_started, 3)
    return plan.workers


def stats_from(data: dict) -> rules.MiningStats:
    return rules.MiningStats(**data)


def scores_between(anchor: np.ndarray, positives: np.ndarray, fn: str) -> np.ndarray:
    from pipeline.model.similarity import similarity

    return similarity(anchor[None, :], positives, fn)[0]
