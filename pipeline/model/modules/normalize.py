"""Normalize: L2 normalization of one feature (the sentence embedding by default).

Config (optional; the folder is often absent): ``config.json`` with ``module_input_name`` /
``module_output_name``, written by sentence-transformers >= 6 (both "sentence_embedding" for a dense
model). A feature that is absent is left alone, as sentence-transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F

from pipeline.model.modules.base import Features, Module, ModuleConfig, str_key


@dataclass(frozen=True)
class NormalizeConfig(ModuleConfig):
    module_input_name: str = "sentence_embedding"
    module_output_name: str = "sentence_embedding"


class Normalize(Module):
    """L2 normalization over the last axis of one feature."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.Normalize",  # written by sentence-transformers <= 5.3
        "sentence_transformers.sentence_transformer.modules.normalize.Normalize",  # written by 5.4 to 5.7
        "sentence_transformers.base.modules.normalize.Normalize",  # written by >= 6.0
        "sentence_transformers.base.modules.Normalize",  # the import paths of >= 5.4
        "sentence_transformers.sentence_transformer.modules.Normalize",
    )

    config: NormalizeConfig

    @classmethod
    def read_config(cls, folder: Path) -> NormalizeConfig:
        config, where = cls.read_config_file(folder, required=False)
        input_name = str_key(config, "module_input_name", where) or "sentence_embedding"
        return NormalizeConfig(
            path=folder,
            module_input_name=input_name,
            module_output_name=str_key(config, "module_output_name", where) or input_name,
        )

    @classmethod
    def flow(cls, config: ModuleConfig, available: frozenset[str], where: str) -> frozenset[str]:
        assert isinstance(config, NormalizeConfig)
        if config.module_input_name not in available:
            return available  # sentence-transformers skips an absent feature
        return available | {config.module_output_name}

    def describe(self) -> dict[str, Any]:
        if self.config.module_input_name == self.config.module_output_name == "sentence_embedding":
            return {}
        return {
            "module_input_name": self.config.module_input_name,
            "module_output_name": self.config.module_output_name,
        }

    def forward(self, features: Features, **kwargs: Any) -> Features:
        x = features.get(self.config.module_input_name)
        if x is not None:
            features[self.config.module_output_name] = F.normalize(x, p=2, dim=-1)
        return features
