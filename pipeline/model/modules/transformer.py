"""Transformer: a Hugging Face encoder turning token ids into per-token embeddings.

Config: ``sentence_bert_config.json`` (older releases named it after the architecture:
``sentence_distilbert_config.json``, ``sentence_xlm-roberta_config.json``, ...), keys ``max_seq_length``
and ``do_lower_case``. The weights and tokenizer sit in the same folder (usually the model root).
Nothing in the folder is ever run: an ``auto_map`` is refused, pickle checkpoints only on request.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.model.files import ModelConfigError, read_json
from pipeline.model.modules.base import (
    Features,
    LoadContext,
    Module,
    ModuleConfig,
    check_no_remote_code,
    check_weights,
    int_key,
    read_config_json,
)


@dataclass(frozen=True)
class TransformerConfig(ModuleConfig):
    max_seq_length: int | None = None  # None: the tokenizer's limit capped at max_position_embeddings
    do_lower_case: bool = False


class Transformer(Module):
    """A Hugging Face encoder returning per-token embeddings; never runs code from the model directory."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.Transformer",  # written by sentence-transformers <= 5.3
        "sentence_transformers.base.modules.transformer.Transformer",  # written by >= 5.4
        "sentence_transformers.base.modules.Transformer",  # the import paths of >= 5.4
        "sentence_transformers.sentence_transformer.modules.Transformer",
    )
    # sentence-transformers reads the first of these with content.
    config_file_names: ClassVar[tuple[str, ...]] = (
        "sentence_bert_config.json",
        "sentence_roberta_config.json",
        "sentence_distilbert_config.json",
        "sentence_camembert_config.json",
        "sentence_albert_config.json",
        "sentence_xlm-roberta_config.json",
        "sentence_xlnet_config.json",
    )
    is_input_module: ClassVar[bool] = True

    config: TransformerConfig

    @classmethod
    def read_config(cls, folder: Path) -> TransformerConfig:
        config, path = cls.read_config_file(folder, required=False)
        return TransformerConfig(
            path=folder,
            max_seq_length=int_key(config, "max_seq_length", path),
            do_lower_case=bool(config.get("do_lower_case", False)),
        )

    @classmethod
    def hidden_size(cls, folder: Path) -> int:
        """The encoder's hidden size from its config.json, without loading it."""
        config = read_json(folder / "config.json")
        size = config.get("hidden_size") or config.get("d_model") or config.get("dim")
        if not isinstance(size, int):
            raise ModelConfigError(f"{folder / 'config.json'}: no hidden_size to infer the pooling dimension")
        return size

    @classmethod
    def check_files(cls, config: ModuleConfig, context: LoadContext) -> None:
        """config.json present, no remote code asked for, safe weights present."""
        folder = config.path
        hf_config = read_config_json(folder)
        if not hf_config:
            raise ModelConfigError(f"{folder / 'config.json'}: file not found")
        check_no_remote_code(folder, hf_config)
        check_weights(folder, context.allow_pickle)

    def __init__(self, config: TransformerConfig, context: LoadContext | None = None) -> None:
        super().__init__(config, context)
        from transformers import AutoModel, AutoTokenizer

        context = context or LoadContext()
        folder = config.path
        self.check_files(config, context)
        use_safetensors = any(folder.glob("*.safetensors"))
        try:
            self.model = AutoModel.from_pretrained(
                str(folder), trust_remote_code=False, use_safetensors=use_safetensors, local_files_only=True
            )
        except Exception as exc:  # safetensors, torch and transformers each raise their own kinds
            raise ModelConfigError(
                f"{folder}: cannot load the transformer weights ({type(exc).__name__}: {exc})"
            ) from None
        self.model.eval()
        # Only the inputs the model's forward takes (as sentence-transformers): a tokenizer may return
        # token_type_ids for a model that has none.
        params = inspect.signature(self.model.forward).parameters
        inputs = {"input_ids", "attention_mask", "token_type_ids"}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.forward_inputs = inputs if takes_any else inputs & set(params)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.max_seq_length = self.resolve_max_seq_length(config.max_seq_length)
        self.tokenizer.model_max_length = self.max_seq_length
        if config.do_lower_case:
            add_lowercase(self.tokenizer)

    def resolve_max_seq_length(self, configured: int | None) -> int:
        """sentence_bert_config.json first, else the tokenizer's limit capped at max_position_embeddings."""
        if configured is not None:
            return configured
        limit = self.tokenizer.model_max_length
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(max_pos, int) and max_pos > 0:
            limit = min(limit, max_pos)
        return int(limit)

    def output_dim(self, input_dim: int | None) -> int | None:
        model_config = self.model.config
        size = getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", None)
        return size if isinstance(size, int) else None

    def describe(self) -> dict[str, Any]:
        return {"max_seq_length": self.max_seq_length, "do_lower_case": self.config.do_lower_case}

    def forward(self, features: Features, **kwargs: Any) -> Features:
        inputs = {k: v for k, v in features.items() if k in self.forward_inputs}
        output = self.model(**inputs, return_dict=True)
        features["token_embeddings"] = output.last_hidden_state
        return features


def add_lowercase(tokenizer) -> None:
    """Lowercase through the fast tokenizer's normalizer, as sentence-transformers does for do_lower_case."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    if current is not None and "Lowercase" in repr(current):
        return
    parts = [Lowercase()]
    if isinstance(current, NormalizerSequence):
        parts += list(current)
    elif current is not None:
        parts.append(current)
    backend.normalizer = NormalizerSequence(parts)
