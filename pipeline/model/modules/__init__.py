"""The model's modules, one class each (see base.py for what a module class owns), found by registry.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.model.modules.base import (
    Features,
    InputModule,
    LoadContext,
    Module,
    ModuleChain,
    ModuleConfig,
    ModuleSpec,
    Tokenized,
    check_no_remote_code,
    check_weights,
)
from pipeline.model.modules.dense import Dense, DenseConfig
from pipeline.model.modules.layer_norm import LayerNorm, LayerNormConfig
from pipeline.model.modules.normalize import Normalize, NormalizeConfig
from pipeline.model.modules.pooling import Pooling, PoolingConfig
from pipeline.model.modules.registry import MODULE_CLASSES, MODULE_TYPES, module_class
from pipeline.model.modules.router import Router, RouterConfig
from pipeline.model.modules.static_embedding import StaticEmbedding, StaticEmbeddingConfig
from pipeline.model.modules.transformer import Transformer, TransformerConfig

if TYPE_CHECKING:
    from pipeline.model.config import ModelConfig


def check_model(root: Path, allow_pickle: bool = False) -> ModelConfig:
    """Validate a model directory without loading weights: configs, weights present, no remote code."""
    from pipeline.model.config import load_model_config  # config.py reads modules.json through this package

    config = load_model_config(root)
    context = LoadContext(allow_pickle=allow_pickle)
    for spec in config.modules:
        spec.module_class.check_files(spec.config, context)
    return config


__all__ = [
    "MODULE_CLASSES",
    "MODULE_TYPES",
    "Dense",
    "DenseConfig",
    "Features",
    "InputModule",
    "LayerNorm",
    "LayerNormConfig",
    "LoadContext",
    "Module",
    "ModuleChain",
    "ModuleConfig",
    "ModuleSpec",
    "Normalize",
    "NormalizeConfig",
    "Pooling",
    "PoolingConfig",
    "Router",
    "RouterConfig",
    "StaticEmbedding",
    "StaticEmbeddingConfig",
    "Tokenized",
    "Transformer",
    "TransformerConfig",
    "check_model",
    "check_no_remote_code",
    "check_weights",
    "module_class",
]
