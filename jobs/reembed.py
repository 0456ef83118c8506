"""`python -m jobs.reembed --spec reembed.yaml`: re-embed only new and changed rows into the next version of a snapshot store, as a Ray job driver.

The job is looked up in ``pipeline.cli.JOBS`` at run time; see ``jobs/specs/reembed.yaml`` for the spec.
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("reembed"))
