"""LayerNorm: torch.nn.LayerNorm over the sentence embedding, as sentence-transformers' LayerNorm module.

Config: ``config.json`` with ``dimension`` (the only key sentence-transformers accepts; any other key makes
it fail, so it is refused here). Weights: ``model.safetensors`` (``norm.weight``, ``norm.bias``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from pipeline.model.files import ModelConfigError
from pipeline.model.modules.base import (
    Features,
    LoadContext,
    Module,
    ModuleConfig,
    check_weights,
    int_key,
    require,
)


@dataclass(frozen=True)
class LayerNormConfig(ModuleConfig):
    dimension: int = 0


class LayerNorm(Module):
    """torch.nn.LayerNorm(dimension) (eps 1e-5, learned scale and shift) on the sentence embedding."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.LayerNorm",  # written by sentence-transformers <= 5.3
        "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm",  # written by >= 5.4
        "sentence_transformers.sentence_transformer.modules.LayerNorm",  # the import path of >= 5.4
    )

    config: LayerNormConfig

    @classmethod
    def read_config(cls, folder: Path) -> LayerNormConfig:
        config, where = cls.read_config_file(folder)
        if "dimension" not in config:
            raise ModelConfigError(f"{where}: missing key 'dimension'")
        unknown = sorted(set(config) - {"dimension"})
        if unknown:
            raise ModelConfigError(
                f"{where}: unknown LayerNorm key(s) {', '.join(map(repr, unknown))} "
                "(sentence-transformers' LayerNorm takes only 'dimension')"
            )
        return LayerNormConfig(path=folder, dimension=int_key(config, "dimension", where))

    @classmethod
    def check_files(cls, config: ModuleConfig, context: LoadContext) -> None:
        check_weights(config.path, context.allow_pickle)

    @classmethod
    def flow(cls, config: ModuleConfig, available: frozenset[str], where: str) -> frozenset[str]:
        require("sentence_embedding", available, where, "LayerNorm")
        return available

    def __init__(self, config: LayerNormConfig, context: LoadContext | None = None) -> None:
        super().__init__(config, context)
        context = context or LoadContext()
        self.norm = nn.LayerNorm(config.dimension)
        self.load_weights(config.path, context.allow_pickle)

    def output_dim(self, input_dim: int | None) -> int | None:
        return self.config.dimension

    def describe(self) -> dict[str, Any]:
        return {"dimension": self.config.dimension, "eps": self.norm.eps}

    def forward(self, features: Features, **kwargs: Any) -> Features:
        features["sentence_embedding"] = self.norm(features["sentence_embedding"])
        return features
