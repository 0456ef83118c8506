"""Mining on the actors: encoder actors embed the corpus and the anchors (the vectors stay in Ray's object
store), index actors each hold a slice of the corpus vectors and return every anchor block's top
candidates; the driver merges them, applies the rules and commits one part (and its receipt) per block."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from pipeline.compute import negatives as rules
from pipeline.io.output import OutputFolder
from pipeline.io.training_formats import build_table
from pipeline.model.similarity import similarity


def encode_all(pool, jobs: list[tuple[object, list[str], str]]) -> dict:
    """Encode every (key, texts, prompt) on whichever encoder actor is free; returns key -> the vectors'
    object ref (the vectors stay in Ray's object store). A lost actor's texts go to another one."""
    refs: dict = {}

    def submit(actor, ticket, _next):
        texts, prompt = ticket.item
        return actor.encode_counted.options(num_returns=2).remote(texts, prompt)

    pool.run_queue(
        [(key, (texts, prompt)) for key, texts, prompt in jobs],
        submit,
        lookahead=False,
        on_result=lambda key, _item, result: refs.__setitem__(key, result[1]),
    )
    return refs


@dataclass(frozen=True)
class VectorsLoader:
    """Picklable: a slice of the corpus vectors, from encoded chunks (object refs) and reused rows."""

    chunks: tuple
    reused: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        import ray

        arrays = ([self.reused] if self.reused is not None else []) + [
            np.asarray(a) for a in ray.get(list(self.chunks))
        ]
        return np.concatenate(arrays).astype(np.float32, copy=False)


def mine_blocks(
    spec,
    groups,
    extra,
    options,
    fn,
    k,
    query_prompt,
    corpus_prompt,
    blocks,
    todo,
    done,
    output: OutputFolder,
    anchor_col,
    positive_col,
    model_dir,
    storage_options,
    timings,
    tqdm,
    log,
) -> int:
    """Encode on the encoder actors, search on the index actors, commit the parts in ``todo`` (receipts
    go into ``done``); returns the number of workers and of actors replaced on the way."""
    import ray
    import torch

    from pipeline.compute.knn import merge_topk
    from pipeline.runtime import actors as ray_actors
    from pipeline.runtime import cluster

    cluster.connect(spec.ray_address)
    plan = cluster.plan_actors(spec.workers)
    log(f"{len(todo)} part(s) to mine on {plan.workers} {'GPU' if plan.num_gpus else 'CPU'} worker(s)")

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
    texts = groups.corpus[reused:]
    jobs = [
        (("corpus", i), texts[start : start + spec.texts_per_task], corpus_prompt)
        for i, start in enumerate(range(0, len(texts), spec.texts_per_task))
    ]
    jobs += [
        (
            ("anchors", number),
            groups.anchors[blocks[number] : blocks[number] + spec.anchors_per_block],
            query_prompt,
        )
        for number in todo
    ]
    model_options = {"allow_pickle": spec.allow_pickle, "storage_options": storage_options}
    with ray_actors.encoder_pool(plan, str(model_dir), model_options) as encoders:
        encoded = encode_all(encoders, jobs)
        replaced = encoders.stats.actors_replaced
    corpus_refs = [encoded[key] for key, _, _ in jobs if key[0] == "corpus"]
    anchor_refs = {number: encoded[("anchors", number)] for number in todo}
    timings["encode_seconds"] = round(time.perf_counter() - encode_started, 3)

    # Index actors: contiguous slices of the corpus chunks.
    workers = max(1, min(plan.workers, len(corpus_refs) + (reused_vectors is not None)))
    chunk_sizes = [
        min(spec.texts_per_task, len(groups.corpus) - reused - i * spec.texts_per_task)
        for i in range(len(corpus_refs))
    ]
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
    mine_started = time.perf_counter()
    todo_anchors = sum(min(spec.anchors_per_block, len(groups.anchors) - blocks[n]) for n in todo)
    with ray_actors.index_pool(loaders, plan.num_gpus, plan.num_cpus) as index:
        with tqdm(total=todo_anchors, unit="anchors", disable=not spec.progress, file=sys.stderr) as bar:
            for number in todo:
                start = blocks[number]
                stop = min(start + spec.anchors_per_block, len(groups.anchors))
                name = f"part-{number:05d}.parquet"
                anchor_vectors = ray.get(anchor_refs.pop(number))
                positive_idx = groups.positive_indices[start:stop]
                needed = np.unique(np.concatenate(positive_idx))
                found = index.call_each("rows", lambda slot, needed=needed: (needed,))
                lookup = {int(r): v for rows, vecs in found for r, v in zip(rows, vecs, strict=True)}
                pos_scores = [
                    scores_between(anchor_vectors[i], np.stack([lookup[int(p)] for p in idx]), fn)
                    for i, idx in enumerate(positive_idx)
                ]
                partial = index.call_each("topk", lambda slot, q=anchor_vectors: (q, fn, k, spec.block_size))
                scores, indices = merge_topk(
                    [(torch.as_tensor(s), torch.as_tensor(i)) for s, i in partial], k
                )
                mined = rules.select_negatives(
                    scores,
                    indices,
                    positive_idx,
                    pos_scores,
                    options,
                    groups.max_positives,
                    anchor_offset=start,
                )
                table = build_table(
                    options.output_format,
                    anchors=groups.anchors[start:stop],
                    positives=[[groups.corpus[p] for p in idx] for idx in positive_idx],
                    positive_scores=pos_scores,
                    negatives=[[groups.corpus[n] for n in idx] for idx in mined.negative_indices],
                    negative_scores=mined.negative_scores,
                    num_negatives=options.num_negatives,
                    output_scores=options.output_scores,
                    anchor_column=anchor_col,
                    positive_column=positive_col,
                )
                receipt = output.commit_part(
                    name,
                    number,
                    table,
                    anchors_out=len(set(table.column(anchor_col).to_pylist())),
                    stats=mined.stats.as_dict(),
                    positive_scores=[float(s) for block in pos_scores for s in block],
                    negative_scores=[float(s) for block in mined.negative_scores for s in block],
                )
                done[number] = receipt.to_dict()
                bar.update(stop - start)
        replaced += index.stats.actors_replaced
    timings["mine_seconds"] = round(time.perf_counter() - mine_started, 3)
    return plan.workers, replaced


def scores_between(anchor: np.ndarray, positives: np.ndarray, fn: str) -> np.ndarray:
    return similarity(anchor[None, :], positives, fn)[0]
