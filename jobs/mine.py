"""`python -m jobs.mine --spec mine.yaml`: mine hard negatives for (anchor, positive) pairs, as a Ray job driver.

The job is looked up in ``pipeline.cli.JOBS`` at run time; see ``jobs/specs/mine.yaml`` for the spec.
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("mine"))
