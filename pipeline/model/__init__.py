"""Everything about one sentence-transformers model directory."""

from pipeline.model.config import ModelConfigError, load_model_config
from pipeline.model.encoder import Encoder, load_encoder

__all__ = ["Encoder", "ModelConfigError", "load_encoder", "load_model_config"]
