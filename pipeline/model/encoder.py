"""Encoder: tokenize once, batch by a budget of padded tokens, forward, post-process, restore order.

Sorting texts by token length and cutting batches by padded tokens (not by count) wastes far fewer
padded positions than fixed-size batches over unsorted text, which is where most of the speed-up over
a plain ``SentenceTransformer.encode`` comes from.

Roles: ``encode_query`` / ``encode_document`` (or ``encode(..., role=...)``) choose the prompt, the Router
route and the per-role max length exactly as sentence-transformers' methods of the same names.
For a job that tokenizes on one thread and encodes on another::

    settings = encoder.role_settings("query", prompt_name, prompt)   # or config.role(...) on the driver
    tokens = encoder.tokenize(texts, settings.prompt, role=settings.task)
    vectors = encoder.encode_tokens(tokens)                           # the role travels with the tokens

Weights dtype: as sentence-transformers, the backbone loads in its checkpoint's dtype and every module
after it is converted to that dtype; ``dtype=`` overrides. On a GPU a float32 checkpoint runs under
bfloat16 autocast by default (``dtype="float32"`` turns that off).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.model.config import (
    ModelConfig,
    ModelConfigError,
    RoleSettings,
    choose_prompt,
    load_model_config,
    resolve_role,
)
from pipeline.model.files import fingerprint, local_model_dir
from pipeline.model.modules import (
    InputModule,
    LoadContext,
    Module,
    ModuleChain,
    Router,
    Tokenized,
    Transformer,
)
from pipeline.model.similarity import similarity

# bench/encode.py on a quiet 2-core machine: 4,096 beat 8,192 at 1 and 2 threads
DEFAULT_CPU_BATCH_TOKENS = 4096
DEFAULT_GPU_BATCH_TOKENS = 65536  # the cross-encoder's GPU default; the bi-encoder sizes it from free memory
MIN_DEVICE_BATCH_TOKENS = 8192
MAX_DEVICE_BATCH_TOKENS = 262144
# texts per chunk when one call's texts are tokenized over several threads
TOKENIZE_CHUNK = 256
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["Encoder", "EncodeCounters", "RoleSettings", "Tokenized", "load_encoder", "plan_batches"]


@dataclass
class EncodeCounters:
    """Running totals, read by the job to report tokens/s and padding waste."""

    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    # seconds spent per stage (wall time of the thread doing it); on CUDA the forward is asynchronous,
    # so device time shows up in to_host_seconds, where the host waits for the vectors
    tokenize_seconds: float = 0.0
    pad_seconds: float = 0.0
    forward_seconds: float = 0.0
    to_host_seconds: float = 0.0
    oom_splits: int = 0  # batches split in half after the device ran out of memory

    def stage_seconds(self) -> dict[str, float]:
        return {
            "tokenize": self.tokenize_seconds,
            "pad": self.pad_seconds,
            "forward": self.forward_seconds,
            "to_host": self.to_host_seconds,
        }

    @property
    def padding_ratio(self) -> float:
        return 0.0 if not self.padded_tokens else 1.0 - self.tokens / self.padded_tokens


def plan_batches(lengths: np.ndarray, max_batch_tokens: int, max_padding: float = 0.15) -> list[np.ndarray]:
    """Indices sorted longest first, cut into batches of at most ``max_batch_tokens`` padded tokens.

    A batch also ends where the next text is more than ``max_padding`` shorter than the batch's
    longest, which keeps padding low on long-tailed corpora. A single text longer than the budget
    still gets a batch of its own. The sort is stable, so the plan is deterministic.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        end = min(len(order), start + max(1, max_batch_tokens // longest))
        floor = longest * (1.0 - max_padding)
        # lengths are sorted descending: the first one below the floor ends the batch
        below = np.flatnonzero(lengths[order[start + 1 : end]] < floor)
        if below.size:
            end = start + 1 + int(below[0])
        batches.append(order[start:end])
        start = end
    return batches


class Encoder:
    """Encodes texts exactly as the model's sentence-transformers configuration prescribes."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        device: str | None = None,
        truncate_dim: int | None = None,
        allow_pickle: bool = False,
        name: str | None = None,
        dtype: str = "auto",
    ) -> None:
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
        self.config = config
        self.name = name or config.root.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        context = LoadContext(allow_pickle=allow_pickle, dtype=DTYPES.get(dtype))
        self.chain = ModuleChain(spec.load(context) for spec in config.modules)
        self.weights_dtype = convert_after_backbone(self.chain, DTYPES.get(dtype))
        self.chain = self.chain.to(self.device).eval()
        self.autocast_dtype = resolve_autocast(self.device, dtype, self.weights_dtype)
        self.input_module: InputModule = self.chain[0]  # type: ignore[assignment]  # read_modules checked it
        self.transformer: Transformer | None = next(
            (m for m in self.chain.modules() if isinstance(m, Transformer)), None
        )
        self.tokenizer = self.input_module.tokenizer
        self.max_seq_length = self.input_module.max_seq_length
        self.full_dim = self.chain.output_dim()
        self.check_dim()
        if truncate_dim is not None and not 0 < truncate_dim <= (self.full_dim or 0):
            raise ValueError(f"truncate_dim must be between 1 and {self.full_dim}, got {truncate_dim}")
        # An explicit truncate_dim wins over config_sentence_transformers.json's, as in sentence-transformers,
        # which slices to at most the full size.
        effective = truncate_dim if truncate_dim is not None else config.truncate_dim
        self.truncate_dim = min(effective, self.full_dim) if effective and self.full_dim else effective
        self.dim = self.truncate_dim or self.full_dim
        self.similarity_fn_name = config.similarity_fn_name
        self.prompts = dict(config.prompts)
        self.default_prompt_name = config.default_prompt_name
        self.fingerprint = fingerprint(config.root, {"truncate_dim": truncate_dim})
        self.counters = EncodeCounters()
        # Threads that tokenize one call's texts in parallel (the fast tokenizer releases the GIL while it
        # encodes a batch); an encoder actor sets it to its CPUs.
        self.tokenize_threads = 1
        # After an out-of-memory split: the widest batch (padded tokens) known to fit, for the rest of the run.
        self.oom_cap: int | None = None
        self._tokenize_pool: ThreadPoolExecutor | None = None
        self._tokenize_pool_size = 0
        self._pool_lock = threading.Lock()

    def check_dim(self) -> None:
        """Run one short text through every route: the vectors must have the size the configs promise
        (sentence-transformers trusts a Pooling's embedding_dimension; a wrong one fails here, not mid-job)."""
        first = self.chain[0]
        heads = (
            [(first.input_module(r), first.routes[r]) for r in first.routes]
            if isinstance(first, Router)
            else [(first, first)]
        )
        for module, head in heads:
            batch = module.collate(module.tokenize(["probe"]), np.arange(1))
            with torch.inference_mode(), self.autocast():
                features = head({k: v.to(self.device) for k, v in batch.items()})
                for later in list(self.chain)[1:]:
                    features = later(features)
            dim = int(features["sentence_embedding"].shape[-1])
            if self.full_dim is None:
                self.full_dim = dim
            if dim != self.full_dim:
                raise ModelConfigError(
                    f"{self.config.root}: the module configs promise {self.full_dim}-dimensional embeddings but "
                    f"the model computes {dim} (check Pooling's embedding_dimension and Dense's out_features)"
                )

    # -- description ---------------------------------------------------------------------------

    @property
    def normalized(self) -> bool:
        return self.config.normalized

    @property
    def pooling_modes(self) -> tuple[str, ...]:
        pooling = self.config.pooling
        return pooling.modes if pooling else ()

    def describe(self) -> dict:
        """What the encoder will do, for `embedpipe inspect` and dataset metadata."""
        transformer = self.config.transformer
        router = self.config.router
        description = {
            "name": self.name,
            "path": str(self.config.root),
            "modules": [type(m).__name__ for m in self.chain],
            "module_settings": [self.module_settings(m) for m in self.chain],
            "pooling": list(self.pooling_modes),
            "include_prompt": self.config.pooling.include_prompt if self.config.pooling else True,
            "normalized": self.normalized,
            "dim": self.dim,
            "truncate_dim": self.truncate_dim,
            "max_seq_length": self.max_seq_length,
            "do_lower_case": transformer.do_lower_case if transformer else False,
            "prompts": self.prompts,
            "default_prompt_name": self.default_prompt_name,
            "roles": {role: self.describe_role(role) for role in ("query", "document")},
            "dtype": dtype_name(self.weights_dtype),
            "compute_dtype": self.compute_dtype,
            "similarity_fn_name": self.similarity_fn_name,
            "fingerprint": self.fingerprint,
        }
        if self.config.fallback:
            description["fallback"] = self.config.fallback
        if router is not None:
            description["default_route"] = router.default_route
        return description

    def describe_role(self, role: str) -> dict[str, Any] | str:
        """The prompt (and route) encode_query / encode_document use, or why the role cannot be encoded."""
        try:
            settings = self.role_settings(role)
        except ValueError as exc:
            return f"refused: {exc}"
        found: dict[str, Any] = {"prompt": settings.prompt}
        if settings.route is not None:
            found["route"] = settings.route
        return found

    @property
    def compute_dtype(self) -> str:
        if self.autocast_dtype is not None:
            return f"{dtype_name(self.autocast_dtype)} autocast ({dtype_name(self.weights_dtype)} weights)"
        return dtype_name(self.weights_dtype)

    def module_settings(self, module: Module) -> dict:
        """One module's type, folder (relative to the model directory) and own settings."""
        folder = os.path.relpath(module.config.path.resolve(), Path(self.config.root).resolve())
        settings = {"type": type(module).__name__, "path": Path(folder).as_posix(), **module.describe()}
        if (param := next(module.parameters(), None)) is not None and not isinstance(module, Router):
            settings["dtype"] = dtype_name(param.dtype)
        return settings

    # -- roles, prompts and tokens -------------------------------------------------------------

    def role_settings(
        self, role: str | None = None, prompt_name: str | None = None, prompt: str | None = None
    ) -> RoleSettings:
        """The prompt, task and Router route for texts of ``role`` ("query", "document" or None), exactly as
        sentence-transformers' encode_query / encode_document / encode choose them. Pure: loads nothing."""
        return resolve_role(self.config, role, prompt_name, prompt)

    def resolve_prompt(
        self, prompt_name: str | None = None, prompt: str | None = None, role: str | None = None
    ) -> str:
        """An explicit prompt wins, then a prompt name, then the role's prompt, then the model's default."""
        return choose_prompt(self.config, prompt_name, prompt, role)

    def prompt_length(self, prompt: str, role: str | None = None) -> int:
        """Tokens the prompt occupies at the start of each text, excluding a trailing special token."""
        return self.input_module.prompt_length(prompt, role)

    def tokenize(self, texts: Sequence[str], prompt: str = "", role: str | None = None) -> Tokenized:
        """Token ids of ``prompt + text`` for texts of ``role`` (its route and max length), unpadded."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a sequence of texts, not a single string")
        started = time.perf_counter()
        threads = max(1, int(self.tokenize_threads))
        if threads == 1 or len(texts) < TOKENIZE_CHUNK * 2:
            tokens = self.input_module.tokenize(texts, prompt or "", role)
        else:
            tokens = self.tokenize_parallel(texts, prompt or "", role, threads)
        self.counters.tokenize_seconds += time.perf_counter() - started
        return tokens

    def tokenize_parallel(
        self, texts: Sequence[str], prompt: str, role: str | None, threads: int
    ) -> Tokenized:
        """``tokenize`` over ``threads`` threads: contiguous chunks, joined in input order (the same ids as
        one call: each text is tokenized on its own)."""
        with self._pool_lock:
            if self._tokenize_pool is None or self._tokenize_pool_size != threads:
                if self._tokenize_pool is not None:
                    self._tokenize_pool.shutdown(wait=False)
                self._tokenize_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")
                self._tokenize_pool_size = threads
            pool = self._tokenize_pool
        step = max(TOKENIZE_CHUNK, -(-len(texts) // (threads * 4)))
        chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
        parts = list(pool.map(lambda chunk: self.input_module.tokenize(chunk, prompt, role), chunks))
        first = parts[0]
        types = None
        if all(p.token_type_ids is not None for p in parts):
            types = [row for p in parts for row in p.token_type_ids]
        return Tokenized(
            input_ids=[row for p in parts for row in p.input_ids],
            token_type_ids=types,
            prompt_length=first.prompt_length,
            lengths=np.concatenate([p.lengths for p in parts]),
            task=first.task,
            route=first.route,
        )

    def pad(self, tokens: Tokenized, indices: np.ndarray) -> dict[str, Tensor]:
        """One batch of model inputs for the texts at ``indices``, on the device (on CUDA through pinned
        host memory with non-blocking copies)."""
        batch = self.input_module.collate(tokens, indices)
        if self.device.type != "cuda":
            return {k: v.to(self.device) for k, v in batch.items()}
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- encoding ------------------------------------------------------------------------------

    def default_batch_tokens(self) -> int:
        """``EMBEDPIPE_MAX_BATCH_TOKENS``; else on a GPU a budget sized from its free memory
        (`device_batch_tokens`), on a CPU 4,096 (smaller batches stay in cache: BENCHMARKS.md)."""
        env = os.environ.get("EMBEDPIPE_MAX_BATCH_TOKENS")
        if env:
            return int(env)
        if self.device.type != "cuda":
            return DEFAULT_CPU_BATCH_TOKENS
        free, _total = torch.cuda.mem_get_info(self.device)
        return device_batch_tokens(free, self.activation_bytes_per_token())

    def activation_bytes_per_token(self) -> int:
        """A bound on the device memory one padded token needs in a forward pass without gradients: the
        widest layer's activations (the feed-forward's intermediate width, else 4 x hidden) plus a few
        hidden-width copies, in the compute dtype."""
        config = getattr(getattr(self.transformer, "model", None), "config", None)
        hidden = int(getattr(config, "hidden_size", 0) or self.full_dim or 1024)
        intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
        width = (self.autocast_dtype or self.weights_dtype).itemsize
        return (intermediate + 6 * hidden) * max(width, 2)

    def encode(
        self,
        texts: Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        max_batch_tokens: int | None = None,
        *,
        role: str | None = None,
    ) -> np.ndarray:
        """Embeddings as float32, shape (len(texts), dim), in input order (``role``: see encode_query)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        settings = self.role_settings(role, prompt_name, prompt)
        tokens = self.tokenize(texts, settings.prompt, role=settings.task)
        return self.encode_tokens(tokens, max_batch_tokens)

    def encode_query(
        self,
        texts: Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        max_batch_tokens: int | None = None,
    ) -> np.ndarray:
        """As SentenceTransformer.encode_query: the "query" prompt unless one is given, the "query" route
        of a Router, the Transformer's query_length."""
        return self.encode(texts, prompt_name, prompt, max_batch_tokens, role="query")

    def encode_document(
        self,
        texts: Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        max_batch_tokens: int | None = None,
    ) -> np.ndarray:
        """As SentenceTransformer.encode_document: the first of the "document", "passage" and "corpus"
        prompts unless one is given, the "document" route of a Router, the Transformer's document_length."""
        return self.encode(texts, prompt_name, prompt, max_batch_tokens, role="document")

    def encode_tokens(self, tokens: Tokenized, max_batch_tokens: int | None = None) -> np.ndarray:
        out = np.empty((len(tokens.input_ids), self.dim), dtype=np.float32)
        for indices, vectors in self.iter_batches(tokens, max_batch_tokens):
            out[indices] = vectors
        return out

    def iter_batches(
        self, tokens: Tokenized, max_batch_tokens: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(input indices, float32 vectors) per batch, longest batches first."""
        budget = max_batch_tokens or self.default_batch_tokens()
        pending: tuple[np.ndarray, Any] | None = None  # CUDA: the batch whose vectors are still on their way
        for planned in plan_batches(tokens.lengths, budget):
            for indices, vectors in self.launch_splitting(tokens, planned):
                if self.device.type != "cuda":
                    yield indices, self.to_host(vectors)
                    continue
                # CUDA: this batch's copy to the host is queued behind its forward; the previous batch is read
                # while the device works on this one, so the host never waits on an idle device.
                if pending is not None:
                    yield pending[0], self.to_host(pending[1])
                pending = (indices, vectors)
        if pending is not None:
            yield pending[0], self.to_host(pending[1])

    def launch_splitting(self, tokens: Tokenized, indices: np.ndarray) -> list[tuple[np.ndarray, Any]]:
        """Launch one planned batch; when the device runs out of memory, split it in half and retry each
        half (recursively) rather than fail the shard. The vectors do not depend on how texts are batched
        beyond float noise. Once a batch needed splitting, batches as wide as it are split up front."""
        cap = self.oom_cap
        if cap is not None and len(indices) > 1 and self.padded(tokens, indices) > cap:
            half = len(indices) // 2
            return self.launch_splitting(tokens, indices[:half]) + self.launch_splitting(
                tokens, indices[half:]
            )
        counters = self.counters
        started = time.perf_counter()
        batch = self.pad(tokens, indices)
        padded = time.perf_counter()
        try:
            vectors = self.launch(batch, tokens.prompt_length, task=tokens.task)
        except torch.OutOfMemoryError:
            del batch
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            width = self.padded(tokens, indices)
            if len(indices) == 1:
                raise torch.OutOfMemoryError(
                    f"one text of {width} tokens does not fit in the device's free memory; "
                    "lower the model's max_seq_length or use a device with more memory"
                ) from None
            counters.oom_splits += 1
            self.oom_cap = width // 2 if cap is None else min(cap, width // 2)
            half = len(indices) // 2
            return self.launch_splitting(tokens, indices[:half]) + self.launch_splitting(
                tokens, indices[half:]
            )
        counters.pad_seconds += padded - started
        counters.forward_seconds += time.perf_counter() - padded
        counters.texts += len(indices)
        counters.tokens += int(tokens.lengths[indices].sum())
        counters.padded_tokens += self.padded(tokens, indices)
        counters.batches += 1
        return [(indices, vectors)]

    @staticmethod
    def padded(tokens: Tokenized, indices: np.ndarray) -> int:
        """Padded tokens of a batch: its longest text's length times its size."""
        return int(tokens.lengths[indices].max()) * len(indices) if len(indices) else 0

    def launch(self, batch: dict[str, Tensor], prompt_length: int = 0, **module_kwargs) -> Any:
        """Start one batch: its float32 vectors on the device, or (CUDA) a non-blocking copy into pinned host
        memory and the event that marks it done. ``to_host`` finishes it."""
        features: dict = dict(batch)
        if prompt_length:
            features["prompt_length"] = prompt_length
        with torch.inference_mode(), self.autocast():
            features = self.chain(features, **module_kwargs)
        vectors = features["sentence_embedding"]
        if self.truncate_dim:
            vectors = vectors[:, : self.truncate_dim]
        vectors = vectors.float()
        if self.device.type != "cuda":
            return vectors
        host = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(vectors, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def to_host(self, launched: Any) -> np.ndarray:
        started = time.perf_counter()
        if isinstance(launched, tuple):
            host, done = launched
            done.synchronize()
            vectors = host.numpy()
        else:
            vectors = launched.cpu().numpy()
        self.counters.to_host_seconds += time.perf_counter() - started
        return vectors

    def forward(self, batch: dict[str, Tensor], prompt_length: int = 0, **module_kwargs) -> np.ndarray:
        """One batch through the modules; ``module_kwargs`` (the role's ``task``) reach the modules that take them."""
        return self.to_host(self.launch(batch, prompt_length, **module_kwargs))

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def similarity(self, a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> np.ndarray:
        """n x m scores under the model's similarity function (higher = more similar)."""
        return similarity(a, b, self.similarity_fn_name)


def convert_after_backbone(chain: ModuleChain, dtype: torch.dtype | None) -> torch.dtype:
    """As sentence-transformers: every module after the first takes the first module's weights dtype (a float16
    checkpoint runs its Dense in float16); with ``dtype`` every module is converted to it. Inside a Router each
    route's modules take their input module's dtype. Returns the backbone's dtype."""
    if dtype is not None:
        chain.to(dtype)
        return dtype
    first = next(chain[0].parameters(), None)
    backbone = first.dtype if first is not None else torch.float32
    for module in list(chain)[1:]:
        module.to(backbone)
    if isinstance(chain[0], Router):
        for route in chain[0].routes.values():
            head = next(route[0].parameters(), None)
            for module in list(route)[1:]:
                module.to(head.dtype if head is not None else backbone)
    return backbone


def device_batch_tokens(free_bytes: int, bytes_per_token: int, share: float = 0.4) -> int:
    """Padded tokens per batch for a device with ``free_bytes`` free: ``share`` of it for activations, at
    ``bytes_per_token`` each, rounded down to a power of two between 8,192 and 262,144 (past that, larger
    batches no longer raise a GPU's throughput; an out-of-memory batch is split anyway)."""
    tokens = int(free_bytes * share) // max(bytes_per_token, 1)
    budget = 1 << max(tokens, 1).bit_length() - 1
    return int(min(max(budget, MIN_DEVICE_BATCH_TOKENS), MAX_DEVICE_BATCH_TOKENS))


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "none"


def resolve_autocast(device: torch.device, dtype: str, weights: torch.dtype) -> torch.dtype | None:
    """bf16 (fp16 where bf16 is unsupported) autocast for float32 weights on a GPU under dtype="auto";
    otherwise the weights' own dtype (on CPU, bf16 autocast is several times slower)."""
    if device.type != "cuda" or dtype != "auto" or weights != torch.float32:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_encoder(
    path_or_url: str | os.PathLike,
    device: str | None = None,
    truncate_dim: int | None = None,
    *,
    allow_pickle: bool = False,
    storage_options: dict | None = None,
    dtype: str = "auto",
) -> Encoder:
    """Load a sentence-transformers model directory (local path or fsspec URL) as an Encoder.

    ``dtype``: "auto" runs the weights in their checkpoint dtype as sentence-transformers does (plus bf16
    autocast for float32 weights on a GPU); "float32" / "float16" / "bfloat16" load every module in that dtype.
    """
    root = local_model_dir(path_or_url, storage_options)
    config = load_model_config(root)
    name = Path(os.fspath(path_or_url).rstrip("/")).name or root.name
    return Encoder(
        config, device=device, truncate_dim=truncate_dim, allow_pickle=allow_pickle, name=name, dtype=dtype
    )
