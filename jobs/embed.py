"""`python -m jobs.embed --spec embed.yaml`: embed a corpus into an embedding dataset, as a Ray job driver.

The job is looked up in ``pipeline.cli.JOBS`` at run time; see ``jobs/specs/embed.yaml`` for the spec.
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("embed"))
