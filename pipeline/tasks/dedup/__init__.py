"""The dedup job: find every pair scoring at or above a threshold, group them, keep one per group.

Stages, each a module with narrow inputs: `source` (the embeddings: an embed output, or a raw corpus
embedded first), `pairs` (index actors score slices; one committed part per query part or cluster
owner), `groups` (connected components at the threshold and the keep policy; pure), `outputs`
(``kept/``, ``duplicates.parquet``, ``report.json``, then the manifest and ``.embedpipe/SUCCESS``). `job` strings
them together.
"""

from pipeline.tasks.dedup.job import run_dedup
from pipeline.tasks.dedup.source import DedupError

__all__ = ["DedupError", "run_dedup"]
