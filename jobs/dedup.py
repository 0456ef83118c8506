"""`python -m jobs.dedup --spec dedup.yaml`: remove near-duplicates by the model's similarity, as a Ray job driver.

The job is looked up in ``pipeline.cli.JOBS`` at run time; see ``jobs/specs/dedup.yaml`` for the spec.
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("dedup"))
