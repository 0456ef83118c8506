"""The embed job: a corpus in, an embedding dataset out. The whole job is the embed stage
(`pipeline.stages.embed`), which dedup and reembed compose too."""

from __future__ import annotations

from pipeline.stages.embed import EmbedError, run_embed

__all__ = ["EmbedError", "run_embed"]
