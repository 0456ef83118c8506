"""EncoderActor: loads the model once and runs shard work as overlapping stages.

The actor knows nothing about jobs: a job passes a ``ShardWork`` object whose ``load`` (I/O and
tokenizing, on a background thread) and ``process`` (forward pass and commit) it calls. Work that splits
``process`` into ``encode`` (the device's part) and ``commit`` (convert, write, receipt: the host's) gets a
third stage overlapped: while shard N is written on a commit thread, the actor already encodes shard N+1
(the pool's look-ahead names it), so the device does not wait for the writes.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import ray

from pipeline.runtime.cluster import ActorPlan
from pipeline.runtime.pool import (  # noqa: F401  (re-exported: their home was here)
    DEFAULT_START_TIMEOUT_S,
    ActorInitError,
    ActorPool,
    ActorStartTimeout,
    Ticket,
    init_error,
    start_timeout_s,
    wait_started,
)


class ShardWork(Protocol):
    def load(self, encoder: Any, item: Any) -> Any: ...

    def process(self, encoder: Any, item: Any, loaded: Any, attempt: int) -> dict: ...


class SplitShardWork(ShardWork, Protocol):
    """``process`` = ``commit(encode(...))``, so the actor can overlap one shard's commit with the next's encode."""

    def encode(self, encoder: Any, item: Any, loaded: Any) -> Any: ...

    def commit(self, encoder: Any, item: Any, encoded: Any, attempt: int) -> dict: ...


class EncoderActor:
    """One per GPU (or per CPU slot): holds an Encoder for the life of the job."""

    def __init__(self, model: str, model_options: dict, threads: int) -> None:
        import torch
        from transformers.utils import logging as transformers_logging

        from pipeline.model import load_encoder

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        # Our threads tokenize in parallel (one chunk each); the tokenizer's own Rust thread pool would take
        # every core of the node whatever the actor asked Ray for.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # No "Loading weights" bar per worker (transformers' and huggingface_hub's bars off in this
        # process): the job's progress is the driver's bar, or its line per shard.
        transformers_logging.disable_progress_bar()
        self.encoder = load_encoder(model, **model_options)
        self.encoder.tokenize_threads = threads
        self.prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self.pending: dict[Any, Future] = {}
        self.encoded: dict[Any, Any] = {}  # the look-ahead shard, encoded while the previous one was written

    def describe(self) -> dict:
        return dict(self.encoder.describe(), node=ray.get_runtime_context().get_node_id(), pid=os.getpid())

    def encode(self, texts: list[str], prompt: str | None = None, role: str | None = None) -> Any:
        return self.encoder.encode(texts, prompt=prompt, role=role)

    def encode_counted(
        self, texts: list[str], prompt: str | None = None, role: str | None = None
    ) -> tuple[int, Any]:
        """(rows, vectors). Called with ``.options(num_returns=2)``, the driver learns that a chunk is
        done (or failed) from the small first value while the vectors stay in the object store."""
        vectors = self.encode(texts, prompt, role)
        return len(vectors), vectors

    def run(
        self, work: ShardWork, key: Any, item: Any, attempt: int, lookahead: tuple[Any, Any] | None
    ) -> dict:
        """Process ``item``; start loading ``lookahead`` so it is ready when it is handed over."""
        future = self.pending.pop(key, None)
        for stale in list(self.pending):
            self.pending.pop(stale).cancel()
        if lookahead is not None:
            next_key, next_item = lookahead
            self.pending[next_key] = self.prefetcher.submit(work.load, self.encoder, next_item)
        loaded = future.result() if future is not None else work.load(self.encoder, item)
        if not (hasattr(work, "encode") and hasattr(work, "commit")):
            return work.process(self.encoder, item, loaded, attempt)
        encoded = self.encoded.pop(key, None)
        self.encoded.clear()
        if encoded is None:
            encoded = work.encode(self.encoder, item, loaded)
        committing = self.committer.submit(work.commit, self.encoder, item, encoded, attempt)
        if lookahead is not None:
            self.encode_ahead(work, *lookahead)
        return committing.result()

    def encode_ahead(self, work: SplitShardWork, key: Any, item: Any) -> None:
        """Encode the next shard while this one commits. Any error is left for its own call to raise
        (redone there, with its attempt counted), so a speculative failure changes nothing."""
        try:
            loaded = self.pending[key].result()
            self.encoded[key] = work.encode(self.encoder, item, loaded)
        except Exception:
            self.encoded.pop(key, None)


def encoder_pool(plan: ActorPlan, model: str, model_options: dict, **kwargs: Any) -> ActorPool:
    """The job's encoder actors (not started yet: use ``with encoder_pool(...) as pool``), each asking
    for one GPU or its share of CPUs; ``kwargs`` go to ``ActorPool``."""
    return ActorPool(
        lambda slot: replacement_actor(plan, model, model_options),
        plan.workers,
        what="encoder actor",
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        **kwargs,
    )


def run_shards(work: ShardWork):
    """``submit`` for ``ActorPool.run_queue`` on encoder actors: ``EncoderActor.run`` with the next
    shard as look-ahead."""

    def submit(actor: Any, ticket: Ticket, following: Ticket | None) -> ray.ObjectRef:
        lookahead = None if following is None else (following.key, following.item)
        return actor.run.remote(work, ticket.key, ticket.item, ticket.attempt, lookahead)

    return submit


def replacement_actor(plan: ActorPlan, model: str, model_options: dict):
    """One more encoder actor, not waited for: the pool watches it start (and gives it up if it never does)."""
    remote = ray.remote(EncoderActor).options(num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, max_restarts=0)
    return remote.remote(model, model_options, plan.threads)


class IndexShardActor:
    """Holds one slice of a corpus' vectors for exact search: global rows offset..offset+n, or several
    ascending runs of rows (``offset`` = [(global start, rows), ...], e.g. every W-th part, so that the
    triangular work of a self-join spreads evenly over W actors).

    ``loader`` is a picklable callable returning the slice (its runs concatenated) as a float32 array,
    so the actor reads its own data from storage instead of receiving it through the driver.
    """

    def __init__(self, loader: Any, offset: int | Sequence[tuple[int, int]], threads: int = 1) -> None:
        import numpy as np
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vectors = torch.as_tensor(loader()).to(self.device)
        if isinstance(offset, numbers.Integral):
            runs = [(int(offset), len(self.vectors))]
        else:
            runs = [(int(start), int(rows)) for start, rows in offset]
        if sum(n for _, n in runs) != len(self.vectors):
            raise ValueError(f"the slice has {len(self.vectors)} rows, its runs {runs} say otherwise")
        self.offset = runs[0][0] if runs else 0
        self.runs = []  # (global start, local start, rows)
        local = 0
        for start, rows in runs:
            self.runs.append((start, local, rows))
            local += rows
        self.global_rows = np.concatenate(
            [np.arange(a, a + n, dtype=np.int64) for a, _, n in self.runs] or [np.zeros(0, np.int64)]
        )

    def size(self) -> int:
        return len(self.vectors)

    def pairs(
        self,
        queries: Any,
        query_offset: int,
        fn: str,
        threshold: float,
        block_size: int,
        upper_only: bool = True,
        forest: bool = False,
    ) -> tuple:
        """Pairs (i, j, score) with score >= threshold between the queries and this slice; with ``forest``
        only their maximum spanning forest (what dedup stores: as many edges as rows, at most)."""
        import numpy as np
        import torch

        from pipeline.compute.components import max_spanning_forest
        from pipeline.compute.knn import range_pairs

        def reduced(found: tuple) -> tuple:
            if not forest:
                return found
            keep = max_spanning_forest(*found)
            return tuple(a[keep] for a in found)

        q = torch.tensor(queries).to(self.device)
        found = [
            reduced(
                range_pairs(
                    q,
                    self.vectors[local : local + rows],
                    fn,
                    threshold,
                    query_offset=query_offset,
                    corpus_offset=start,
                    block_size=block_size,
                    upper_only=upper_only,
                )
            )
            for start, local, rows in self.runs
            if not (upper_only and start + rows <= query_offset + 1)
        ]
        if len(found) == 1:
            return found[0]
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        i, j, s = reduced(tuple(np.concatenate([f[k] for f in found]) for k in range(3)))
        order = np.lexsort((j, i))
        return i[order], j[order], s[order]

    def topk(self, queries: Any, fn: str, k: int, block_size: int) -> tuple:
        """Each query's k best rows of this slice: (scores, global indices) on the CPU."""
        import torch

        from pipeline.compute.knn import merge_topk, topk

        q = torch.tensor(queries).to(self.device)
        parts = [
            topk(q, self.vectors[local : local + rows], fn, k, corpus_offset=start, block_size=block_size)
            for start, local, rows in self.runs
        ]
        scores, indices = parts[0] if len(parts) == 1 else merge_topk(parts, k)
        return scores.cpu(), indices.cpu()

    def cluster_topk(
        self,
        queries: Any,
        query_labels: Any,
        centroids: Any,
        fn: str,
        normalize: bool,
        k: int,
        block_size: int,
    ) -> tuple:
        """Each query's k best rows of this slice among the rows in the query's own k-means cluster:
        (scores, global indices), -inf / -1 where the cluster holds fewer than k of this slice's rows."""
        import numpy as np
        import torch

        from pipeline.compute.kmeans import assign
        from pipeline.compute.knn import topk

        key = (hash(np.asarray(centroids).tobytes()), fn, normalize)
        if getattr(self, "_labels_key", None) != key:
            x = self.normalized() if normalize else self.vectors
            self._labels = assign(x, torch.as_tensor(centroids).to(self.device), fn)[0].cpu().numpy()
            self._labels_key = key
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32)).to(self.device)
        query_labels = np.asarray(query_labels)
        scores = torch.full((len(q), k), float("-inf"))
        indices = torch.full((len(q), k), -1, dtype=torch.int64)
        for label in np.unique(query_labels):
            mine = np.flatnonzero(self._labels == label)
            if not len(mine):
                continue
            asked = torch.as_tensor(np.flatnonzero(query_labels == label))
            s, i = topk(q[asked], self.vectors[torch.as_tensor(mine)], fn, k, block_size=block_size)
            i = i.cpu()
            rows = torch.as_tensor(self.global_rows[mine])
            scores[asked] = s.cpu()
            indices[asked] = torch.where(i >= 0, rows[i.clamp(min=0)], torch.full_like(i, -1))
        return scores, indices

    def rows(self, global_indices: Any) -> tuple:
        """(global indices, vectors) of the requested rows that live in this slice."""
        import numpy as np

        wanted = np.asarray(global_indices, dtype=np.int64)
        position = np.minimum(np.searchsorted(self.global_rows, wanted), max(len(self.global_rows) - 1, 0))
        hit = (self.global_rows[position] == wanted) if len(self.global_rows) else np.zeros(len(wanted), bool)
        return wanted[hit], self.vectors[position[hit]].cpu().numpy()

    def kmeans_sums(self, centroids: Any, fn: str, normalize: bool) -> tuple:
        import torch

        from pipeline.compute.kmeans import assign, partial_sums

        x = self.normalized() if normalize else self.vectors
        labels, _ = assign(x, torch.as_tensor(centroids).to(self.device), fn)
        sums, counts = partial_sums(x, labels, len(centroids))
        return sums.cpu(), counts.cpu()

    def normalized(self):
        import torch.nn.functional as F

        return F.normalize(self.vectors, p=2, dim=1)

    def split_by_cluster(self, centroids: Any, fn: str, normalize: bool, owners: int) -> list:
        """Assign rows to clusters, then bundle them by owner (cluster % owners)."""
        import torch

        from pipeline.compute.kmeans import assign

        x = self.normalized() if normalize else self.vectors
        labels, _ = assign(x, torch.as_tensor(centroids).to(self.device), fn)
        labels = labels.cpu().numpy()
        index = self.global_rows
        vectors = self.vectors.cpu().numpy()
        bundles = []
        for owner in range(owners):
            mask = labels % owners == owner
            bundles.append((index[mask], labels[mask], vectors[mask]))
        return bundles if owners > 1 else bundles[0]

    def cluster_pairs(
        self, fn: str, threshold: float, block_size: int, forest: bool, *bundles: tuple
    ) -> tuple:
        """Exact pairs inside each cluster of the bundles this actor owns (global indices, i < j); with
        ``forest`` only their maximum spanning forest."""
        import numpy as np
        import torch

        from pipeline.compute.components import max_spanning_forest
        from pipeline.compute.knn import range_pairs

        index = np.concatenate([b[0] for b in bundles]) if bundles else np.zeros(0, np.int64)
        labels = np.concatenate([b[1] for b in bundles]) if bundles else np.zeros(0, np.int64)
        vectors = np.concatenate([b[2] for b in bundles]) if bundles else np.zeros((0, 1), np.float32)
        out_i, out_j, out_s = [], [], []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            members = members[np.argsort(index[members], kind="stable")]
            x = torch.as_tensor(vectors[members]).to(self.device)
            i, j, s = range_pairs(x, x, fn, threshold, block_size=block_size, upper_only=True)
            if forest:
                keep = max_spanning_forest(i, j, s)
                i, j, s = i[keep], j[keep], s[keep]
            out_i.append(index[members][i])
            out_j.append(index[members][j])
            out_s.append(s)
        if not out_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def index_pool(loaders: list[tuple[Any, Any]], num_gpus: float, num_cpus: float, **kwargs: Any) -> ActorPool:
    """One IndexShardActor per (loader, offset or runs) slice (not started yet: use ``with``); a lost
    one is re-created from the same slice. ``kwargs`` go to ``ActorPool``."""
    return ActorPool.of(
        IndexShardActor,
        len(loaders),
        lambda slot: (loaders[slot][0], loaders[slot][1], max(1, int(num_cpus))),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        what="index actor",
        **kwargs,
    )
