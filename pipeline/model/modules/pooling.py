"""Pooling: token embeddings -> one sentence embedding, with sentence-transformers' semantics.

Config: ``config.json`` in either schema: sentence-transformers 6 writes ``embedding_dimension``,
``pooling_mode`` (a mode or a list) and ``include_prompt``; older releases wrote
``word_embedding_dimension`` and one ``pooling_mode_*`` boolean per mode. Several modes concatenate in
the listed order (the legacy booleans in sentence-transformers' fixed order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from pipeline.model.files import ModelConfigError
from pipeline.model.modules.base import Features, LoadContext, Module, ModuleConfig, require

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

# Legacy boolean keys in sentence-transformers' concatenation order.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class PoolingConfig(ModuleConfig):
    embedding_dimension: int = 0
    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True


class Pooling(Module):
    """Token embeddings -> sentence embedding; several modes concatenate in the configured order."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.Pooling",  # written by sentence-transformers <= 5.3
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",  # written by >= 5.4
        "sentence_transformers.sentence_transformer.modules.Pooling",  # the import path of >= 5.4
    )
    config_key_renames: ClassVar[dict[str, str]] = {"word_embedding_dimension": "embedding_dimension"}

    config: PoolingConfig

    @classmethod
    def read_config(cls, folder: Path) -> PoolingConfig:
        config, where = cls.read_config_file(folder)
        dim = config.get("embedding_dimension")
        if not isinstance(dim, int) or dim <= 0:
            raise ModelConfigError(
                f"{where}: missing or invalid embedding_dimension / word_embedding_dimension"
            )
        raw = config.get("pooling_mode")
        if raw is None:
            modes = tuple(mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key, False))
            modes = modes or ("mean",)
        elif isinstance(raw, str):
            modes = (raw,)
        elif isinstance(raw, list | tuple) and raw:
            modes = tuple(raw)
        else:
            raise ModelConfigError(f"{where}: pooling_mode must be a string or a non-empty list, got {raw!r}")
        for mode in modes:
            if mode not in POOLING_MODES:
                raise ModelConfigError(
                    f"{where}: unknown pooling mode {mode!r}; valid: {', '.join(POOLING_MODES)}"
                )
        return PoolingConfig(folder, dim, modes, bool(config.get("include_prompt", True)))

    @classmethod
    def flow(cls, config: ModuleConfig, available: frozenset[str], where: str) -> frozenset[str]:
        require("token_embeddings", available, where, "Pooling")
        return available | {"sentence_embedding"}

    def __init__(self, config: PoolingConfig, context: LoadContext | None = None) -> None:
        super().__init__(config, context)
        self.modes = config.modes
        self.include_prompt = config.include_prompt

    def output_dim(self, input_dim: int | None) -> int | None:
        return self.config.embedding_dimension * len(self.modes)

    def describe(self) -> dict[str, Any]:
        return {
            "pooling": list(self.modes),
            "include_prompt": self.include_prompt,
            "embedding_dimension": self.config.embedding_dimension,
        }

    def forward(self, features: Features, **kwargs: Any) -> Features:
        tokens = features["token_embeddings"]
        mask = features.get("attention_mask")
        if mask is None or mask.size(-1) != tokens.size(1):  # as sentence-transformers: every position counts
            mask = torch.ones(tokens.shape[:-1], device=tokens.device, dtype=torch.int64)
        pooling_mask = mask
        prompt_length = int(features.get("prompt_length", 0))
        if not self.include_prompt and prompt_length:
            pooling_mask = exclude_prompt(mask, prompt_length)
        features["sentence_embedding"] = torch.cat(
            [pool(mode, tokens, pooling_mask, mask) for mode in self.modes], dim=-1
        )
        return features


def exclude_prompt(mask: Tensor, prompt_length: int) -> Tensor:
    """Zero the prompt's positions (and left padding before them) so pooling skips them."""
    mask = mask.clone()
    pad_lengths = mask.to(torch.int32).argmax(dim=1)
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
    mask[positions < (pad_lengths + prompt_length).unsqueeze(1)] = 0
    return mask


def pool(mode: str, tokens: Tensor, mask: Tensor, original_mask: Tensor) -> Tensor:
    """One pooling mode over padded token embeddings; accumulates in float32 under half precision."""
    acc_dtype = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
    if mode == "cls":
        first = mask.to(torch.int).argmax(dim=1)
        index = first.view(-1, 1, 1).expand(-1, 1, tokens.shape[-1])
        return torch.gather(tokens, 1, index).squeeze(1)
    if mode == "max":
        return tokens.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        total = (tokens * weights).sum(dim=1, dtype=acc_dtype)
        count = torch.clamp(weights.sum(dim=1, dtype=acc_dtype), min=1e-9)
        denominator = count if mode == "mean" else torch.sqrt(count)
        return (total / denominator).to(tokens.dtype)
    if mode == "weightedmean":
        weights = mask.unsqueeze(-1).to(acc_dtype)
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device, dtype=acc_dtype).view(1, -1, 1)
        positions = positions - original_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
        weighted = weights * positions
        total = (tokens * weighted).sum(dim=1)
        return (total / torch.clamp(weighted.sum(dim=1), min=1e-9)).to(tokens.dtype)
    if mode == "lasttoken":
        seq_len = tokens.shape[1]
        values, indices = mask.flip(1).max(1)
        indices = torch.where(values == 0, seq_len - 1, indices)
        index = (seq_len - indices - 1).view(-1, 1, 1).expand(-1, 1, tokens.shape[-1])
        masked = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        return torch.gather(masked, 1, index).squeeze(1)
    raise ValueError(f"unknown pooling mode {mode!r}")
