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
