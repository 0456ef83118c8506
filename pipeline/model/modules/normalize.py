"""Normalize: L2 normalization of the sentence embedding.

No config is read (sentence-transformers >= 6 may write module_input_name / module_output_name, both
"sentence_embedding" for a dense model), and the folder is often absent.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F

from pipeline.model.modules.base import Features, Module


class Normalize(Module):
    """L2 normalization of the sentence embedding."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.Normalize",  # written by sentence-transformers <= 5.3
        "sentence_transformers.sentence_transformer.modules.normalize.Normalize",  # written by 5.4 to 5.7
        "sentence_transformers.base.modules.normalize.Normalize",  # written by >= 6.0
        "sentence_transformers.base.modules.Normalize",  # the import paths of >= 5.4
        "sentence_transformers.sentence_transformer.modules.Normalize",
    )

    def forward(self, features: Features, **kwargs: Any) -> Features:
        features["sentence_embedding"] = F.normalize(features["sentence_embedding"], p=2, dim=1)
        return features
