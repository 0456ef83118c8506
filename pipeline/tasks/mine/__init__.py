"""The mine job: hard negatives for (anchor, positive) pairs with sentence-transformers' semantics, on Ray.

`inputs` lists the pairs and the corpus and streams them once on the driver (checks, plan-key digests,
text hashes grouped as sentence-transformers groups the texts); `search` encodes on encoder actors and
gets every anchor block's candidate window from the corpus slice actors (`slices`: vectors, texts and an
optional CrossEncoder); `blocks` applies the rules and commits one part per block; `duplicates` maps a
dedup output's groups onto the corpus; `candidates` re-filters saved windows (`--from-candidates`);
`job` plans, claims the output, and builds the report from the receipts.
"""

from pipeline.tasks.mine.inputs import MineError
from pipeline.tasks.mine.job import mining_options, run_mine

__all__ = ["MineError", "mining_options", "run_mine"]
