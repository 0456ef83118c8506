"""Transformer, Pooling, Dense and Normalize as torch modules, with sentence-transformers' semantics.

Each module maps a features dict to a features dict, as sentence-transformers' modules do, so the
post-processing chain reads like the model's ``modules.json``.
"""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.config import (
    DenseConfig,
    ModelConfig,
    ModelConfigError,
    NormalizeConfig,
    PoolingConfig,
    TransformerConfig,
    load_model_config,
)

Features = dict[str, Tensor]


def read_config_json(folder: Path, name: str = "config.json") -> dict:
    import json

    path = folder / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def check_no_remote_code(folder: Path, hf_config: dict) -> None:
    """A model or tokenizer config naming code to import (auto_map) is refused: it is never run."""
    for name, config in (("config.json", hf_config), ("tokenizer_config.json",
                                                      read_config_json(folder, "tokenizer_config.json"))):
        if config.get("auto_map"):
            raise ModelConfigError(
                f"{folder / name}: auto_map asks for remote code; embedpipe never runs code shipped with a model"
            )


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Safetensors only, unless the user explicitly opts in to pickle checkpoints."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles and not allow_pickle:
        raise ModelConfigError(
            f"{folder / pickles[0]}: pickle checkpoint refused (it can run arbitrary code when loaded); "
            "convert it to safetensors or pass allow_pickle=True / --allow-pickle if you trust it"
        )
    if not pickles:
        raise ModelConfigError(f"{folder}: no model weights (expected model.safetensors)")


class Transformer(nn.Module):
    """A Hugging Face encoder returning per-token embeddings; never runs code from the model directory."""

    def __init__(self, config: TransformerConfig, allow_pickle: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = config.path
        hf_config = read_config_json(folder)
        if not hf_config:
            raise ModelConfigError(f"{folder / 'config.json'}: file not found")
        check_no_remote_code(folder, hf_config)
        check_weights(folder, allow_pickle)
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

    def forward(self, features: Features) -> Features:
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


class Pooling(nn.Module):
    """Token embeddings -> sentence embedding; several modes concatenate in the configured order."""

    def __init__(self, config: PoolingConfig) -> None:
        super().__init__()
        self.modes = config.modes
        self.include_prompt = config.include_prompt
        self.output_dim = config.embedding_dimension * len(config.modes)

    def forward(self, features: Features) -> Features:
        tokens = features["token_embeddings"]
        mask = features["attention_mask"]
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


class Dense(nn.Module):
    """Linear layer + a torch.nn activation, applied to the sentence embedding."""

    def __init__(self, config: DenseConfig, allow_pickle: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(config.in_features, config.out_features, bias=config.bias)
        self.activation = getattr(nn, config.activation)()
        self.use_residual = config.use_residual
        if self.use_residual and config.in_features != config.out_features:
            self.residual = nn.Linear(config.in_features, config.out_features, bias=False)
        self.load_weights(config.path, allow_pickle)

    def load_weights(self, folder: Path, allow_pickle: bool) -> None:
        check_weights(folder, allow_pickle)
        safetensors_file = folder / "model.safetensors"
        if safetensors_file.exists():
            from safetensors.torch import load_file

            weights_file = safetensors_file
            read = load_file
        else:
            weights_file = next(iter(sorted(folder.glob("*.bin"))), None)
            read = partial(torch.load, map_location="cpu", weights_only=True)
        try:
            state = read(str(weights_file))
        except Exception as exc:  # a corrupt or truncated file
            raise ModelConfigError(f"{weights_file}: cannot read the Dense weights ({type(exc).__name__}: {exc})") from None
        try:
            self.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelConfigError(f"{folder}: Dense weights do not match its config.json ({exc})") from None

    def forward(self, features: Features) -> Features:
        x = features["sentence_embedding"]
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        features["sentence_embedding"] = out
        return features


class Normalize(nn.Module):
    """L2 normalization of the sentence embedding."""

    def __init__(self, config: NormalizeConfig | None = None) -> None:
        super().__init__()

    def forward(self, features: Features) -> Features:
        features["sentence_embedding"] = F.normalize(features["sentence_embedding"], p=2, dim=1)
        return features


def check_model(root: Path, allow_pickle: bool = False) -> ModelConfig:
    """Validate a model directory without loading weights: configs, weights present, no remote code."""
    config = load_model_config(root)
    for module in config.modules:
        if isinstance(module, TransformerConfig):
            hf_config = read_config_json(module.path)
            if not hf_config:
                raise ModelConfigError(f"{module.path / 'config.json'}: file not found")
            check_no_remote_code(module.path, hf_config)
            check_weights(module.path, allow_pickle)
        elif isinstance(module, DenseConfig):
            check_weights(module.path, allow_pickle)
    return config
