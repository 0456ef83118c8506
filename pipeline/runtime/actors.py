"""EncoderActor: loads the model once and runs shard work; reading the next shard overlaps this one.

The actor knows nothing about jobs: a job passes a ``ShardWork`` object whose ``load`` (I/O and
tokenizing, on a background thread) and ``process`` (forward pass and commit) it calls.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import ray

from pipeline.runtime.cluster import ActorPlan


class ShardWork(Protocol):
    def load(self, encoder: Any, item: Any) -> Any: ...

    def process(self, encoder: Any, item: Any, loaded: Any, attempt: int) -> dict: ...


class EncoderActor:
    """One per GPU (or per CPU slot): holds an Encoder for the life of the job."""

    def __init__(self, model: str, model_options: dict, threads: int) -> None:
        import torch

        from pipeline.model import load_encoder

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.encoder = load_encoder(model, **model_options)
        self.prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pending: dict[Any, Future] = {}

    def describe(self) -> dict:
        return dict(self.encoder.describe(), node=ray.get_runtime_context().get_node_id(), pid=os.getpid())

    def encode(self, texts: list[str], prompt: str | None = None) -> Any:
        return self.encoder.encode(texts, prompt=prompt)

    def run(self, work: ShardWork, key: Any, item: Any, attempt: int, lookahead: tuple[Any, Any] | None) -> dict:
        """Process ``item``; start loading ``lookahead`` so it is ready when it is handed over."""
        future = self.pending.pop(key, None)
        for stale in list(self.pending):
            self.pending.pop(stale).cancel()
        if lookahead is not None:
            next_key, next_item = lookahead
            self.pending[next_key] = self.prefetcher.submit(work.load, self.encoder, next_item)
        loaded = future.result() if future is not None else work.load(self.encoder, item)
        return work.process(self.encoder, item, loaded, attempt)


def start_actors(plan: ActorPlan, model: str, model_options: dict, count: int | None = None) -> list:
    """Start the encoder actors; each asks for one GPU or its share of CPUs."""
    remote = ray.remote(EncoderActor).options(num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, max_restarts=0)
    return [remote.remote(model, model_options, plan.threads) for _ in range(count or plan.workers)]


class IndexShardActor:
    """Holds one contiguous slice of a corpus' vectors (global rows offset..offset+n) for exact search.

    ``loader`` is a picklable callable returning the slice as a float32 array, so the actor reads its
    own data from storage instead of receiving it through the driver.
    """

    def __init__(self, loader: Any, offset: int, threads: int = 1) -> None:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.offset = offset
        self.vectors = torch.as_tensor(loader()).to(self.device)

    def size(self) -> int:
        return len(self.vectors)

    def pairs(self, queries: Any, query_offset: int, fn: str, threshold: float, block_size: int,
              upper_only: bool = True) -> tuple:
        """Pairs (i, j, score) with score >= threshold between the queries and this slice."""
        import torch

        from pipeline.compute.knn import range_pairs

        return range_pairs(torch.tensor(queries).to(self.device), self.vectors, fn, threshold,
                           query_offset=query_offset, corpus_offset=self.offset, block_size=block_size,
                           upper_only=upper_only)

    def topk(self, queries: Any, fn: str, k: int, block_size: int) -> tuple:
        """Each query's k best rows of this slice: (scores, global indices) on the CPU."""
        import torch

        from pipeline.compute.knn import topk

        scores, indices = topk(torch.tensor(queries).to(self.device), self.vectors, fn, k,
                               corpus_offset=self.offset, block_size=block_size)
        return scores.cpu(), indices.cpu()

    def rows(self, global_indices: Any) -> tuple:
        """(global indices, vectors) of the requested rows that live in this slice."""
        import numpy as np

        wanted = np.asarray(global_indices, dtype=np.int64)
        local = wanted[(wanted >= self.offset) & (wanted < self.offset + len(self.vectors))] - self.offset
        return local + self.offset, self.vectors[local].cpu().numpy()

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
        import numpy as np

        index = np.arange(self.offset, self.offset + len(labels), dtype=np.int64)
        vectors = self.vectors.cpu().numpy()
        bundles = []
        for owner in range(owners):
            mask = labels % owners == owner
            bundles.append((index[mask], labels[mask], vectors[mask]))
        return bundles if owners > 1 else bundles[0]

    def cluster_pairs(self, fn: str, threshold: float, block_size: int, *bundles: tuple) -> tuple:
        """Exact pairs inside each cluster of the bundles this actor owns (global indices, i < j)."""
        import numpy as np
        import torch

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
            out_i.append(index[members][i])
            out_j.append(index[members][j])
            out_s.append(s)
        if not out_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def start_index_actors(loaders: list[tuple[Any, int]], num_gpus: float, num_cpus: float) -> list:
    """One IndexShardActor per (loader, offset) slice."""
    remote = ray.remote(IndexShardActor).options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0)
    return [remote.remote(loader, offset, max(1, int(num_cpus))) for loader, offset in loaders]
