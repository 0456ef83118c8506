"""Mining on the actors. Encoder actors read and embed the corpus chunks and the anchors of the parts still
to write (the vectors stay in Ray's object store); corpus slice actors (``slices.py``) each hold a run of
corpus indices with their vectors and texts, return every anchor block's top candidates, the
candidates' best scores to the anchor's positives, and (with a cross-encoder) the cross-encoder's scores
of the candidates and positives in their slice. The driver merges, applies the rules and commits
(``blocks.py``), one block at a time, so its memory follows the block size, not the input size.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.tasks.mine.blocks import BlockWriter, CandidateBlock, finish_block
from pipeline.tasks.mine.inputs import MinePlan, Selection, give_back_memory
from pipeline.tasks.mine.slices import SliceChunk, SliceLoader, slice_pool


@dataclass(frozen=True)
class EncodeItem:
    selection: Selection
    prompt: str
    role: str  # "query" (anchors) or "document" (corpus), as ST's encode_query / encode_document


@dataclass(frozen=True)
class EncodeWork:
    """``ShardWork`` for ``EncoderActor.run``: read the texts (on the prefetch thread), then encode them.
    ``process`` returns ``(rows, vectors)``: called with ``num_returns=2`` the vectors stay in the object
    store and the driver only learns the count."""

    storage_options: dict

    def load(self, encoder, item: EncodeItem) -> list[str]:
        return item.selection.read(self.storage_options)

    def process(self, encoder, item: EncodeItem, texts: list[str], attempt: int):
        encode = getattr(encoder, f"encode_{item.role}", None) or encoder.encode
        vectors = encode(texts, prompt=item.prompt)
        return len(vectors), vectors


def encode_all(pool, items: list[tuple[object, EncodeItem]], storage_options: dict) -> dict:
    """Encode every item on whichever encoder actor is free (the next one prefetched); key -> vectors ref."""
    work = EncodeWork(storage_options)
    refs: dict = {}

    def submit(actor, ticket, following):
        lookahead = None if following is None else (following.key, following.item)
        return actor.run.options(num_returns=2).remote(
            work, ticket.key, ticket.item, ticket.attempt, lookahead
        )

    pool.run_queue(items, submit, on_result=lambda key, _item, result: refs.__setitem__(key, result[1]))
    return refs


class TextCache:
    """The driver's reader of anchor texts: the last few pieces read, so consecutive blocks that share a
    piece read it once (memory: those pieces)."""

    def __init__(self, storage_options: dict, size: int = 2) -> None:
        self.storage_options, self.size = storage_options, size
        self.pieces: dict = {}

    def read(self, selection: Selection) -> list[str]:
        from pipeline.tasks.mine.inputs import texts_of

        out: list[str] = []
        for piece, rows in selection.parts:
            key = (piece.url, piece.first_row, piece.rows, selection.column)
            values = self.pieces.pop(key, None)
            if values is None:
                values = texts_of(
                    piece.read([selection.column], self.storage_options), selection.column, piece
                )
                give_back_memory()
            self.pieces[key] = values
            while len(self.pieces) > self.size:
                self.pieces.pop(next(iter(self.pieces)))
            out.extend(values[int(r)] for r in rows)
        return out


def fetch_texts(index) -> Callable[[np.ndarray], dict[int, str]]:
    def fetch(needed: np.ndarray) -> dict[int, str]:
        found = index.call_each("texts_of", lambda slot, needed=needed: (needed,))
        return {int(i): t for rows, texts in found for i, t in zip(rows, texts, strict=True)}

    return fetch


def plan_slices(
    plan: MinePlan, workers: int, vectors: Callable, storage_options: dict
) -> list[tuple[SliceLoader, int]]:
    """Contiguous runs of corpus chunks, about equal in rows, one per worker; ``vectors(chunk number)``
    says where each chunk's vectors are."""
    sizes = np.asarray([c.size for c in plan.chunks], dtype=np.int64)
    workers = max(1, min(workers, len(sizes)))
    ends = np.cumsum(sizes)
    cuts = [
        0,
        *[int(np.searchsorted(ends, ends[-1] * w / workers, side="left")) + 1 for w in range(1, workers)],
    ]
    cuts = sorted(set(min(c, len(sizes)) for c in cuts)) + [len(sizes)]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if a >= b:
            continue
        chunks = tuple(
            SliceChunk(c.piece, c.column, c.rows, vectors(number))
            for number, c in enumerate(plan.chunks[a:b], start=a)
        )
        out.append((SliceLoader(chunks, storage_options, plan.inputs.embed_metadata), plan.chunks[a].start))
    return out


@dataclass
class SearchContext:
    """What a full run's search needs (built by job.py)."""

    spec: object  # MineSpec
    plan: MinePlan
    writer: BlockWriter
    fn: str
    k: int
    query_prompt: str
    corpus_prompt: str
    model_dir: str
    storage_options: dict
    cross_encoder: dict | None  # slice actors load it: when the options rescore, or candidates are saved
    need_positive_similarity: bool


def mine_blocks(
    ctx: SearchContext, blocks: list[int], todo: list[int], done: dict, timings: dict, log
) -> tuple:
    """Encode, search and commit the blocks in ``todo`` (receipts go into ``done``); returns the number of
    workers and of actors replaced on the way."""
    from tqdm import tqdm

    from pipeline.runtime import actors as ray_actors
    from pipeline.runtime import cluster

    spec, plan = ctx.spec, ctx.plan
    cluster.connect(spec.ray_address)
    workers = cluster.plan_actors(spec.workers)
    log(f"{len(todo)} part(s) to mine on {workers.workers} {'GPU' if workers.num_gpus else 'CPU'} worker(s)")
    per_block = spec.anchors_per_block

    # Encode: the corpus chunks (an embed output's own vectors are reused when model and prompt match)
    # and the anchors of the parts still to write.
    started = time.perf_counter()
    reuse = plan.inputs.reuse_vectors
    items: list = [
        (
            ("corpus", number),
            EncodeItem(Selection(((c.piece, c.rows),), c.column), ctx.corpus_prompt, "document"),
        )
        for number, c in enumerate(plan.chunks)
        if not (reuse and c.from_embed)
    ]
    items += [
        (
            ("anchors", number),
            EncodeItem(
                plan.anchor_selection(blocks[number], min(blocks[number] + per_block, plan.anchors)),
                ctx.query_prompt,
                "query",
            ),
        )
        for number in todo
    ]
    model_options = {"allow_pickle": spec.allow_pickle, "storage_options": ctx.storage_options}
    with ray_actors.encoder_pool(workers, ctx.model_dir, model_options) as encoders:
        encoded = encode_all(encoders, items, ctx.storage_options)
        replaced = encoders.stats.actors_replaced
    anchor_refs = {number: encoded.pop(("anchors", number)) for number in todo}
    timings["encode_seconds"] = round(time.perf_counter() - started, 3)
    give_back_memory(trim=True)

    def vectors_of(number: int):
        chunk = plan.chunks[number]
        return "embed" if reuse and chunk.from_embed else encoded[("corpus", number)]

    loaders = plan_slices(plan, workers.workers, vectors_of, ctx.storage_options)
    started = time.perf_counter()
    texts = TextCache(ctx.storage_options)
    todo_anchors = sum(min(per_block, plan.anchors - blocks[n]) for n in todo)
    with slice_pool(loaders, workers.num_gpus, workers.num_cpus, ctx.cross_encoder) as index:
        fetch = fetch_texts(index)
        with tqdm(total=todo_anchors, unit="anchors", disable=not spec.progress, file=sys.stderr) as bar:
            for number in todo:
                start = blocks[number]
                stop = min(start + per_block, plan.anchors)
                anchors = texts.read(plan.anchor_selection(start, stop))
                block = search_block(ctx, index, number, start, stop, anchor_refs.pop(number), anchors)
                done[number] = finish_block(ctx.writer, block, anchors, fetch)
                del block
                give_back_memory(trim=True)  # each block's texts and tables: back to the system, not kept
                bar.update(stop - start)
        replaced += index.stats.actors_replaced
    timings["mine_seconds"] = round(time.perf_counter() - started, 3)
    return workers.workers, replaced


def search_block(
    ctx: SearchContext, index, number: int, start: int, stop: int, query, anchors
) -> CandidateBlock:
    """One block's candidate window from the slice actors: top ``k``, positive scores, and where asked
    the candidates' best scores to the positives and the cross-encoder's scores. ``query`` is the
    anchors' vectors as the encoder left them in the object store: the slices read them, the driver never
    does (every object the driver reads from the object store stays mapped in its RSS)."""
    import torch

    from pipeline.compute.knn import merge_topk

    positives = ctx.plan.positives(start, stop)
    flat = np.concatenate(positives)
    ptr = np.concatenate([[0], np.cumsum([len(p) for p in positives])]).astype(np.int64)
    parts = index.call_each("positive_scores", lambda slot: (query, flat, ptr, ctx.fn))
    scored = np.fmax.reduce(np.stack(parts), axis=0)
    positive_scores = [scored[ptr[i] : ptr[i + 1]] for i in range(len(positives))]
    partial = index.call_each("topk", lambda slot: (query, ctx.fn, ctx.k, ctx.spec.block_size))
    scores, indices = merge_topk([(torch.as_tensor(s), torch.as_tensor(i)) for s, i in partial], ctx.k)
    block = CandidateBlock(
        number,
        start,
        indices.numpy().astype(np.int64),
        scores.numpy().astype(np.float32),
        positives,
        positive_scores,
    )
    candidates = block.candidates
    if ctx.need_positive_similarity:
        needed = np.unique(flat)
        found = index.call_each("rows", lambda slot: (needed,))
        lookup = {int(r): v for rows, vecs in found for r, v in zip(rows, vecs, strict=True)}
        vectors = np.stack([lookup[int(p)] for p in flat]).astype(np.float32)
        parts = index.call_each("positive_similarity", lambda slot: (candidates, vectors, ptr, ctx.fn))
        block.positive_similarity = np.fmax.reduce(np.stack(parts), axis=0)
    if ctx.cross_encoder is not None:
        parts = index.call_each("rescore", lambda slot: (anchors, candidates, flat, ptr))
        block.cross_encoder_scores = np.fmax.reduce(np.stack([p[0] for p in parts]), axis=0)
        scored = np.fmax.reduce(np.stack([p[1] for p in parts]), axis=0)
        block.positive_cross_encoder_scores = [scored[ptr[i] : ptr[i + 1]] for i in range(len(positives))]
    return block
