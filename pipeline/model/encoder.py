"""Encoder: tokenize once, batch by a budget of padded tokens, forward, post-process, restore order.

Sorting texts by token length and cutting batches by padded tokens (not by count) wastes far fewer
padded positions than fixed-size batches over unsorted text, which is where most of the speed-up over
a plain ``SentenceTransformer.encode`` comes from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.model.config import ModelConfig, ModelConfigError, choose_prompt, load_model_config
from pipeline.model.files import fingerprint, local_model_dir
from pipeline.model.modules import LoadContext, Module, ModuleChain, Transformer
from pipeline.model.similarity import similarity

# bench/encode.py on a quiet 2-core machine: 4,096 beat 8,192 at 1 and 2 threads
DEFAULT_CPU_BATCH_TOKENS = 4096
DEFAULT_GPU_BATCH_TOKENS = 65536


@dataclass
class EncodeCounters:
    """Running totals, read by the job to report tokens/s and padding waste."""

    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0

    @property
    def padding_ratio(self) -> float:
        return 0.0 if not self.padded_tokens else 1.0 - self.tokens / self.padded_tokens


@dataclass
class Tokenized:
    """Token ids of the texts (prompt included), in input order."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    prompt_length: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


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
        self.config = config
        self.name = name or config.root.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast_dtype = resolve_autocast(self.device, dtype)
        if not any(spec.module_class.creates_sentence_embedding for spec in config.modules):
            raise ModelConfigError(
                f"{config.root / 'modules.json'}: no Pooling module, so no sentence embedding"
            )
        context = LoadContext(allow_pickle=allow_pickle)
        self.chain = ModuleChain(spec.load(context) for spec in config.modules).to(self.device).eval()
        self.transformer: Transformer = self.chain[0]  # type: ignore[assignment]  # the input module
        self.tokenizer = self.transformer.tokenizer
        self.max_seq_length = self.transformer.max_seq_length
        self.full_dim = self.chain.output_dim()
        if truncate_dim is not None and not 0 < truncate_dim <= self.full_dim:
            raise ValueError(f"truncate_dim must be between 1 and {self.full_dim}, got {truncate_dim}")
        self.truncate_dim = truncate_dim
        self.dim = truncate_dim or self.full_dim
        self.similarity_fn_name = config.similarity_fn_name
        self.prompts = dict(config.prompts)
        self.default_prompt_name = config.default_prompt_name
        self.fingerprint = fingerprint(config.root, {"truncate_dim": truncate_dim})
        self.counters = EncodeCounters()
        self._prompt_lengths: dict[str, int] = {}

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
        return {
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
            "do_lower_case": self.config.transformer.do_lower_case,
            "prompts": self.prompts,
            "default_prompt_name": self.default_prompt_name,
            "similarity_fn_name": self.similarity_fn_name,
            "fingerprint": self.fingerprint,
        }

    def module_settings(self, module: Module) -> dict:
        """One module's type, folder (relative to the model directory) and own settings."""
        folder = os.path.relpath(module.config.path.resolve(), Path(self.config.root).resolve())
        return {"type": type(module).__name__, "path": Path(folder).as_posix(), **module.describe()}

    # -- prompts and tokens --------------------------------------------------------------------

    def resolve_prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """An explicit prompt wins, then a prompt name, then the model's default prompt."""
        return choose_prompt(self.config, prompt_name, prompt)

    def prompt_length(self, prompt: str) -> int:
        """Tokens the prompt occupies at the start of each text, excluding a trailing special token."""
        if not prompt:
            return 0
        if prompt not in self._prompt_lengths:
            ids = self.tokenizer([prompt], truncation=True, max_length=self.max_seq_length)["input_ids"][0]
            length = len(ids)
            if ids and ids[-1] in set(self.tokenizer.all_special_ids):
                length -= 1
            self._prompt_lengths[prompt] = length
        return self._prompt_lengths[prompt]

    def tokenize(self, texts: Sequence[str], prompt: str = "") -> Tokenized:
        texts = [prompt + t for t in texts] if prompt else list(texts)
        if not texts:  # the tokenizer fails on an empty batch
            return Tokenized(input_ids=[], token_type_ids=None, prompt_length=self.prompt_length(prompt))
        encoded = self.tokenizer(
            texts, truncation="longest_first", max_length=self.max_seq_length, padding=False
        )
        ids = encoded["input_ids"]
        return Tokenized(
            input_ids=ids,
            token_type_ids=encoded.get("token_type_ids"),
            prompt_length=self.prompt_length(prompt),
            lengths=np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)),
        )

    def pad(self, tokens: Tokenized, indices: np.ndarray) -> dict[str, Tensor]:
        """Pad one batch on the tokenizer's padding side."""
        width = int(tokens.lengths[indices].max()) if len(indices) else 0
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(indices), width), dtype=torch.long)
        types = torch.zeros((len(indices), width), dtype=torch.long) if tokens.token_type_ids else None
        left = self.tokenizer.padding_side == "left"
        for row, index in enumerate(indices):
            ids = tokens.input_ids[index]
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention[row, span] = 1
            if types is not None:
                types[row, span] = torch.tensor(tokens.token_type_ids[index], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if types is not None:
            batch["token_type_ids"] = types
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- encoding ------------------------------------------------------------------------------

    def default_batch_tokens(self) -> int:
        env = os.environ.get("EMBEDPIPE_MAX_BATCH_TOKENS")
        if env:
            return int(env)
        return DEFAULT_GPU_BATCH_TOKENS if self.device.type == "cuda" else DEFAULT_CPU_BATCH_TOKENS

    def encode(
        self,
        texts: Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        max_batch_tokens: int | None = None,
    ) -> np.ndarray:
        """Embeddings as float32, shape (len(texts), dim), in input order."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        tokens = self.tokenize(texts, self.resolve_prompt(prompt_name, prompt))
        return self.encode_tokens(tokens, max_batch_tokens)

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
        for indices in plan_batches(tokens.lengths, budget):
            batch = self.pad(tokens, indices)
            vectors = self.forward(batch, tokens.prompt_length)
            width = batch["input_ids"].shape[1]
            self.counters.texts += len(indices)
            self.counters.tokens += int(tokens.lengths[indices].sum())
            self.counters.padded_tokens += width * len(indices)
            self.counters.batches += 1
            yield indices, vectors

    def forward(self, batch: dict[str, Tensor], prompt_length: int = 0, **module_kwargs) -> np.ndarray:
        """One padded batch through the modules; ``module_kwargs`` (a route) reach the modules that take them."""
        features: dict = dict(batch)
        if prompt_length:
            features["prompt_length"] = prompt_length
        with torch.inference_mode(), self.autocast():
            features = self.chain(features, **module_kwargs)
        vectors = features["sentence_embedding"].float()
        if self.truncate_dim:
            vectors = vectors[:, : self.truncate_dim]
        return vectors.cpu().numpy()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def similarity(self, a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> np.ndarray:
        """n x m scores under the model's similarity function (higher = more similar)."""
        return similarity(a, b, self.similarity_fn_name)


def resolve_autocast(device: torch.device, dtype: str) -> torch.dtype | None:
    """fp16/bf16 autocast only on GPU; float32 on CPU (bf16 on CPU is several times slower)."""
    if device.type != "cuda" or dtype == "float32":
        return None
    if dtype == "float16":
        return torch.float16
    if dtype in ("auto", "bfloat16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")


def load_encoder(
    path_or_url: str | os.PathLike,
    device: str | None = None,
    truncate_dim: int | None = None,
    *,
    allow_pickle: bool = False,
    storage_options: dict | None = None,
    dtype: str = "auto",
) -> Encoder:
    """Load a sentence-transformers model directory (local path or fsspec URL) as an Encoder."""
    root = local_model_dir(path_or_url, storage_options)
    config = load_model_config(root)
    name = Path(os.fspath(path_or_url).rstrip("/")).name or root.name
    return Encoder(
        config, device=device, truncate_dim=truncate_dim, allow_pickle=allow_pickle, name=name, dtype=dtype
    )
