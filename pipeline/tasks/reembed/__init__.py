"""The reembed job: keep a versioned store of a corpus's embeddings current, embedding only what changed.

`diff` hashes the corpus and compares it with the last version; `job` runs the embed stage on the
delta and assembles the next version; the store itself is `pipeline.io.versioned_store`.
"""

from pipeline.io.versioned_store import LATEST_FILE, LOCK_FILE, STAGING_DIR, LockHeld, latest_version_url
from pipeline.tasks.reembed.job import ReembedError, run_reembed

__all__ = [
    "LATEST_FILE",
    "LOCK_FILE",
    "STAGING_DIR",
    "LockHeld",
    "ReembedError",
    "latest_version_url",
    "run_reembed",
]
