"""The mine job: hard negatives for (anchor, positive) pairs with sentence-transformers' semantics, on Ray.

`inputs` reads and checks the pairs and the corpus on the driver; `search` encodes on encoder actors,
searches on index actors and commits one part per anchor block; `job` plans, claims the output, and
builds the report from the receipts.
"""

from pipeline.tasks.mine.inputs import MineError
from pipeline.tasks.mine.job import mining_options, run_mine

__all__ = ["MineError", "mining_options", "run_mine"]
