"""Rebuild tests/data/*.parquet from the full corpora (see README.md here); the tests never run this.

    python tests/data/make_subsets.py [SOURCE_DIR]   # default: ../shared/data beside the checkout

Each subset keeps the source file's columns and row order and adds ``source_row`` (the row's position
in the full file), so a test's row selection reads the same as it did against the full file.
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def faq_rows(table: pa.Table) -> list[int]:
    """test_negatives: 0-79; test_mine: 0-69, and answers 100-159 as a separate corpus; test_embed: 0-74;
    all: 351 and 378, the two rows of the anchor "What is Python?"."""
    return [*range(0, 80), *range(100, 160), 351, 378]


def manpages_rows(table: pa.Table) -> list[int]:
    """test_negatives: every row of a repeated query, and every 80th row; test_mine: the rows of the first
    22 repeated queries, and every 150th row."""
    queries = table.column("query").to_pylist()
    counts = collections.Counter(queries)
    repeated = [i for i, q in enumerate(queries) if counts[q] > 1]
    return sorted({*repeated, *range(0, len(queries), 80), *range(0, len(queries), 150)})


def fortunes_rows(table: pa.Table) -> list[int]:
    """test_dedup: the first 120 rows under 400 characters whose text occurs more than once in the full
    file (exact duplicates, some of them within the selection), 280 seeded picks of the unique ones, and
    the first 24 groups of near duplicates: texts that differ but agree in their letters and digits
    (quotes, spacing, punctuation, case), all under 400 characters."""
    texts = table.column("text").to_pylist()
    counts = collections.Counter(texts)
    duplicated = [r for r, t in enumerate(texts) if counts[t] > 1 and len(t) < 400]
    others = [r for r, t in enumerate(texts) if counts[t] == 1 and len(t) < 400]
    rng = np.random.default_rng(0)
    rows = np.concatenate([duplicated[:120], rng.choice(others, 280, replace=False)]).tolist()
    by_letters: dict[str, list[int]] = collections.defaultdict(list)
    for r, t in enumerate(texts):
        by_letters[re.sub(r"[^a-z0-9]+", "", t.lower())].append(r)
    near = [
        group
        for group in by_letters.values()
        if len({texts[r] for r in group}) > 1 and all(len(texts[r]) < 400 for r in group)
    ]
    return sorted({*rows, *(r for group in near[:24] for r in group)})


SUBSETS = {
    "faq_pairs.parquet": faq_rows,
    "manpages_pairs.parquet": manpages_rows,
    "fortunes.parquet": fortunes_rows,
}


def main(source: Path) -> None:
    for name, select in SUBSETS.items():
        table = pq.read_table(source / name)
        rows = select(table)
        subset = table.take(pa.array(rows, pa.int64())).append_column(
            "source_row", pa.array(rows, pa.int64())
        )
        pq.write_table(subset, HERE / name, compression="zstd", compression_level=19)
        print(f"{name}: {len(rows)} of {table.num_rows} rows, {(HERE / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data")
