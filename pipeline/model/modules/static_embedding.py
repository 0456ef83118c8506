"""StaticEmbedding: a token -> vector table averaged per text (torch.nn.EmbeddingBag, mode "mean").

Files: ``tokenizer.json`` (a fast tokenizer, read with the ``tokenizers`` library, padding off; its own
truncation settings, if any, apply as in sentence-transformers) and ``model.safetensors`` holding
``embedding.weight``, or model2vec's ``embeddings`` (+ optional ``mapping`` and ``weights``), folded
into one table as sentence-transformers folds them. Texts are tokenized without special tokens; a
prompt is prepended to the text. The table keeps the dtype it was saved in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.model.files import ModelConfigError
from pipeline.model.modules.base import (
    Features,
    InputModule,
    LoadContext,
    ModuleConfig,
    Tokenized,
    check_weights,
    read_weights,
)


@dataclass(frozen=True)
class StaticEmbeddingConfig(ModuleConfig):
    pass


class StaticEmbedding(InputModule):
    """Mean of the static vectors of a text's tokens; writes the sentence embedding directly."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.StaticEmbedding",  # written by sentence-transformers <= 5.3
        "sentence_transformers.sentence_transformer.modules.static_embedding.StaticEmbedding",  # >= 5.4
        "sentence_transformers.sentence_transformer.modules.StaticEmbedding",  # the import path of >= 5.4
    )

    config: StaticEmbeddingConfig

    @classmethod
    def read_config(cls, folder: Path) -> StaticEmbeddingConfig:
        if not (folder / "tokenizer.json").is_file():
            raise ModelConfigError(f"{folder / 'tokenizer.json'}: file not found (StaticEmbedding needs it)")
        return StaticEmbeddingConfig(path=folder)

    @classmethod
    def check_files(cls, config: ModuleConfig, context: LoadContext) -> None:
        check_weights(config.path, context.allow_pickle)

    @classmethod
    def flow(cls, config: ModuleConfig, available: frozenset[str], where: str) -> frozenset[str]:
        return available | {"sentence_embedding"}

    def __init__(self, config: StaticEmbeddingConfig, context: LoadContext | None = None) -> None:
        super().__init__(config, context)
        from tokenizers import Tokenizer

        context = context or LoadContext()
        folder = config.path
        try:
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:
            raise ModelConfigError(
                f"{folder / 'tokenizer.json'}: cannot read the tokenizer ({type(exc).__name__}: {exc})"
            ) from None
        self._tokenizer.no_padding()
        weights = read_weights(folder, context.allow_pickle, "StaticEmbedding")
        table = static_table(weights, folder)
        if table.ndim != 2 or table.shape[0] < self._tokenizer.get_vocab_size():
            raise ModelConfigError(
                f"{folder}: StaticEmbedding has a table of shape {tuple(table.shape)} for a tokenizer of "
                f"{self._tokenizer.get_vocab_size()} tokens (some token ids would have no vector)"
            )
        if context.dtype is not None:
            table = table.to(context.dtype)
        self.embedding = nn.EmbeddingBag.from_pretrained(table, freeze=True, mode="mean")

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def output_dim(self, input_dim: int | None) -> int | None:
        return self.embedding.embedding_dim

    def describe(self) -> dict[str, Any]:
        return {
            "vocab_size": self.embedding.num_embeddings,
            "embedding_dim": self.embedding.embedding_dim,
            "tokens": "tokenizer.json, no special tokens, no length limit",
            "prompt": "prepended to the text",
        }

    def tokenize(self, texts: Sequence[str], prompt: str = "", task: str | None = None) -> Tokenized:
        texts = [prompt + t for t in texts] if prompt else list(texts)
        ids = [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        return Tokenized(input_ids=ids, token_type_ids=None, prompt_length=0, lengths=lengths, task=task)

    def collate(self, tokens: Tokenized, indices: np.ndarray) -> dict[str, Tensor]:
        rows = [tokens.input_ids[i] for i in indices]
        offsets = np.cumsum([0] + [len(r) for r in rows[:-1]]) if rows else np.zeros(0, dtype=np.int64)
        flat = [token for row in rows for token in row]
        return {
            "input_ids": torch.tensor(flat, dtype=torch.long),
            "offsets": torch.from_numpy(np.asarray(offsets, dtype=np.int64)),
        }

    def forward(self, features: Features, **kwargs: Any) -> Features:
        features["sentence_embedding"] = self.embedding(features["input_ids"], features["offsets"])
        return features


def static_table(weights: dict[str, Tensor], folder: Path) -> Tensor:
    """The token vectors: ``embedding.weight``, or model2vec's tables folded as sentence-transformers does."""
    if "embedding.weight" in weights:
        return weights["embedding.weight"]
    if "embeddings" not in weights:
        raise ModelConfigError(
            f"{folder}: StaticEmbedding weights hold neither 'embedding.weight' nor model2vec's 'embeddings' "
            f"(found: {', '.join(sorted(weights)) or 'nothing'})"
        )
    table = torch.as_tensor(weights["embeddings"])
    mapping = weights.get("mapping")
    if mapping is not None:
        table = table[torch.as_tensor(mapping, dtype=torch.long)]
    scale = weights.get("weights")
    if scale is not None:
        table = table.to(torch.promote_types(table.dtype, torch.float32))
        table = (table * torch.as_tensor(scale)[:, None]).to(table.dtype)
    return table.contiguous()
