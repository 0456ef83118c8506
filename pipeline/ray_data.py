"""Ray Data: the model's embeddings from your own ``map_batches`` pipeline.

``Embed`` is a callable class for :meth:`ray.data.Dataset.map_batches`: each actor of the pool loads the
model once (:func:`pipeline.model.load_encoder`) and adds an ``embedding`` column to every batch, with
exactly the vectors ``Encoder.encode`` gives (the model's own prompts, pooling, Dense, normalization,
Router routes and per-role lengths, as sentence-transformers' ``encode`` / ``encode_query`` /
``encode_document``)::

    import ray
    from pipeline.ray_data import Embed

    ds = ray.data.read_parquet("s3://bucket/corpus/")
    ds = ds.map_batches(
        Embed,
        fn_constructor_args=("s3://bucket/models/all-MiniLM-L6-v2",),
        fn_constructor_kwargs={"role": "document"},
        concurrency=4,        # actors (an ActorPoolStrategy: compute=ray.data.ActorPoolStrategy(size=4))
        num_gpus=1,           # per actor; leave out on CPU
        batch_size=4096,      # rows per call; Embed batches them again by a budget of padded tokens
    )
    ds.write_parquet("s3://bucket/embeddings/")

An embed job's output reads back as it is: ``ray.data.read_parquet(output_url)`` reads its
``part-*.parquet`` files (the bookkeeping files all have ``_``-prefixed names, which Ray Data skips).

What ``Embed`` does not do, that ``embedpipe embed`` does: shard-level resume, exactly-once commits, the
input order (Ray Data does not keep block order unless ``DataContext.execution_options.preserve_order``),
and int8 / binary precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Embed"]


class Embed:
    """Adds an ``embedding`` column (float32, one row vector per text) to a Ray Data batch.

    ``model``: a sentence-transformers model directory or fsspec URL. ``role`` ("query", "document" or
    None), ``prompt_name`` and ``prompt`` choose the prompt (and Router route and length) exactly as
    ``Encoder.encode``. ``text_column`` holds the texts (no nulls); ``output_column`` is the new column.
    ``truncate_dim``, ``dtype``, ``device``, ``allow_pickle`` and ``storage_options`` are
    :func:`~pipeline.model.load_encoder`'s. ``max_batch_tokens``: padded tokens per forward pass (default:
    the encoder's for its device). ``tokenize_threads``: threads that tokenize each batch (default: the
    CPUs Ray gave this actor, at least 1).

    Batches may be ``dict[str, numpy.ndarray]`` (Ray Data's default ``batch_format``), pandas DataFrames
    or pyarrow Tables; the batch comes back in the same format, with the new column.
    """

    def __init__(
        self,
        model: str,
        *,
        role: str | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        text_column: str = "text",
        output_column: str = "embedding",
        truncate_dim: int | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_tokens: int | None = None,
        allow_pickle: bool = False,
        storage_options: dict | None = None,
        tokenize_threads: int | None = None,
    ) -> None:
        from pipeline.model import load_encoder

        self.encoder = load_encoder(
            model,
            device=device,
            truncate_dim=truncate_dim,
            allow_pickle=allow_pickle,
            storage_options=storage_options,
            dtype=dtype,
        )
        # resolved once: an unknown prompt name or a role the model cannot encode fails when the actor starts
        self.settings = self.encoder.role_settings(role, prompt_name, prompt)
        self.text_column = text_column
        self.output_column = output_column
        self.max_batch_tokens = max_batch_tokens
        self.encoder.tokenize_threads = tokenize_threads or actor_cpus()

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 vectors (len(texts), dim) of ``texts``, as ``Encoder.encode(texts, ..., role=role)``."""
        if any(not isinstance(t, str) for t in texts):
            raise ValueError(
                f"column {self.text_column!r}: every text must be a string (found a null or non-string)"
            )
        tokens = self.encoder.tokenize(texts, self.settings.prompt, role=self.settings.task)
        return self.encoder.encode_tokens(tokens, self.max_batch_tokens)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        if isinstance(batch, pa.Table):
            vectors = self.encode(batch.column(self.text_column).to_pylist())
            flat = pa.array(vectors.reshape(-1), type=pa.float32())
            column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
            return batch.append_column(self.output_column, column)
        if isinstance(batch, dict):
            texts = batch[self.text_column]
            vectors = self.encode(texts.tolist() if hasattr(texts, "tolist") else list(texts))
            return {**batch, self.output_column: vectors}
        if hasattr(batch, "assign"):  # pandas.DataFrame
            vectors = self.encode(batch[self.text_column].tolist())
            return batch.assign(**{self.output_column: list(vectors)})
        raise TypeError(
            f"Embed takes a dict of arrays, a pandas DataFrame or a pyarrow Table, got {type(batch)}"
        )


def actor_cpus() -> int:
    """The CPUs Ray assigned to this worker (1 outside Ray or when none are known)."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            return max(1, int(cpus))
    except Exception:  # not in a Ray worker, or an older Ray without assigned resources
        pass
    return 1
