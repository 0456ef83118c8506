"""Normalize: L2 normalization of the sentence embedding (no config keys, often no folder at all)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F

from pipeline.model.modules.base import Features, Module, ModuleConfig


class Normalize(Module):
    """L2 normalization of the sentence embedding."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.Normalize",  # written by sentence-transformers <= 5.3
        "sentence_transformers.sentence_transformer.modules.normalize.Normalize",  # written by 5.4 to 5.7
        "sentence_transformers.base.modules.normalize.Normalize",  # written by >= 6.0
        "sentence_transformers.base.modules.Normalize",  # the import paths of >= 5.4
        "sentence_transformers.sentence_transformer.modules.Normalize",
    )

    @classmethod
    def read_config(cls, folder: Path) -> ModuleConfig:
        return ModuleConfig(path=folder)

    def describe(self) -> dict[str, Any]:
        return {}

    def forward(self, features: Features, **kwargs: Any) -> Features:
        features["sentence_embedding"] = F.normalize(features["sentence_embedding"], p=2, dim=1)
        return features
