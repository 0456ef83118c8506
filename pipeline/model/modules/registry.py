"""modules.json "type" strings -> module classes.

Each class lists the type strings that mean it (``type_names``: what each sentence-transformers release
wrote, and the documented import paths), so adding a module type is one class and one line below.
Nothing is imported by name from a model's files: a type that is not listed here is refused.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.model.files import ModelConfigError
from pipeline.model.modules.base import Module
from pipeline.model.modules.dense import Dense
from pipeline.model.modules.layer_norm import LayerNorm
from pipeline.model.modules.normalize import Normalize
from pipeline.model.modules.pooling import Pooling
from pipeline.model.modules.router import Router
from pipeline.model.modules.static_embedding import StaticEmbedding
from pipeline.model.modules.transformer import Transformer

MODULE_CLASSES: tuple[type[Module], ...] = (
    Transformer,
    StaticEmbedding,
    Router,
    Pooling,
    Dense,
    LayerNorm,
    Normalize,
)

# Module types sentence-transformers has that embedpipe refuses, and why (named in the error).
REFUSED_TYPES: dict[str, str] = {
    "WordEmbeddings": "word-vector models (GloVe-style) are not supported",
    "WordWeights": "word-vector models (GloVe-style) are not supported",
    "BoW": "bag-of-words models are not supported",
    "CNN": "CNN models over word embeddings are not supported",
    "LSTM": "LSTM models over word embeddings are not supported",
    "WeightedLayerPooling": "pooling over all layers is not supported",
    "Dropout": "Dropout is not supported",
    "CLIPModel": "image models are not supported",
    "SparseAutoEncoder": "sparse encoders are not supported (dense embeddings only)",
    "SpladePooling": "sparse encoders are not supported (dense embeddings only)",
    "MLMTransformer": "sparse encoders are not supported (dense embeddings only)",
    "SparseStaticEmbedding": "sparse encoders are not supported (dense embeddings only)",
    "LogitScore": "cross-encoders are not supported",
    "TokenPooling": "multi-vector models are not supported",
    "MultiVectorMask": "multi-vector models are not supported",
}


def build_registry(classes: tuple[type[Module], ...]) -> dict[str, type[Module]]:
    registry: dict[str, type[Module]] = {}
    for cls in classes:
        for name in cls.type_names:
            if name in registry:
                raise ValueError(
                    f"module type {name!r} is claimed by {registry[name].__name__} and {cls.__name__}"
                )
            registry[name] = cls
    return registry


MODULE_TYPES: dict[str, type[Module]] = build_registry(MODULE_CLASSES)


def module_class(type_name: object, where: Path) -> type[Module]:
    """The class for a modules.json "type"; an unknown type is a ModelConfigError naming ``where``."""
    found = MODULE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if found is None:
        known = ", ".join(cls.__name__ for cls in MODULE_CLASSES)
        short = type_name.rsplit(".", 1)[-1] if isinstance(type_name, str) else ""
        why = REFUSED_TYPES.get(short) if str(type_name).startswith("sentence_transformers.") else None
        reason = f"{why} by embedpipe" if why else "custom module code is never imported"
        raise ModelConfigError(
            f"{where}: unknown module type {type_name!r} ({reason}); supported: {known} "
            f"(as sentence-transformers names them, e.g. {Pooling.type_names[0]!r})"
        )
    return found
