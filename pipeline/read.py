"""Reading embedpipe outputs back in Python: an embed output as numpy, the current version of a reembed
store, a dedup's groups with their texts. Every part is checked against its manifest checksum.

    from pipeline.read import read_embeddings, latest_version, read_groups

    emb = read_embeddings("s3://vectors/docs-v1")     # emb.ids, emb.vectors (float32), emb.metadata
    emb = read_embeddings(latest_version("s3://vectors/store"))
    groups = read_groups("s3://dedup/docs-v1")        # group_id, id, kept, score, text
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.dataset import dataset_metadata, float_vectors, read_dataset
from pipeline.io.output import DatasetError, OutputFolder
from pipeline.io.versioned_store import latest_version_url


@dataclass(frozen=True)
class Embeddings:
    """An embed output in memory: ``vectors[k]`` is the embedding of ``ids[k]``; ``table`` has every column."""

    ids: list
    vectors: np.ndarray
    metadata: dict
    table: pa.Table


def read_embeddings(
    url: str, storage_options: dict | None = None, columns: list[str] | None = None
) -> Embeddings:
    """A complete embed output (or a reembed version); vectors as float32 (int8 de-quantized; float16
    widened). ``columns`` limits the carried columns read besides id and embedding."""
    metadata = dataset_metadata(url, storage_options)
    wanted = None if columns is None else list(dict.fromkeys(["id", "embedding", *columns]))
    table = read_dataset(url, storage_options, wanted)
    return Embeddings(table.column("id").to_pylist(), float_vectors(table, metadata, url), metadata, table)


def latest_version(store_url: str, storage_options: dict | None = None) -> str:
    """The URL of the version a reembed store's ``_LATEST`` names (complete, checked)."""
    return latest_version_url(store_url, storage_options)


def read_groups(url: str, storage_options: dict | None = None, text_column: str | None = None) -> pa.Table:
    """A dedup output's groups, one row per member: ``group_id``, ``id``, ``kept`` (the row that stayed),
    ``score`` (to the kept row; null for it) and, when the source has it, ``text``."""
    folder = OutputFolder(url, storage_options)
    if not folder.is_complete():
        raise DatasetError(f"{url}: not a complete dedup output (no .embedpipe/SUCCESS)")
    plan = folder.plan() or {}
    if plan.get("job", "dedup") != "dedup" or plan.get("against"):
        raise DatasetError(f"{url}: holds a {plan.get('job')} output, not a dedup's groups")
    duplicates = folder.read_table("duplicates.parquet")
    kept = pc.unique(duplicates.column("kept_id"))
    kept_rows = pa.table(
        {
            "group_id": duplicates.column("group_id").take(pc.index_in(kept, duplicates.column("kept_id"))),
            "id": kept,
            "kept": pa.array([True] * len(kept)),
            "score": pa.nulls(len(kept), pa.float32()),
        }
    )
    removed = pa.table(
        {
            "group_id": duplicates.column("group_id"),
            "id": duplicates.column("id"),
            "kept": pa.array([False] * duplicates.num_rows),
            "score": duplicates.column("score"),
        }
    )
    groups = pa.concat_tables([kept_rows, removed]).sort_by(
        [("group_id", "ascending"), ("kept", "descending")]
    )
    source = plan.get("source")
    column = text_column or (dataset_metadata(source, storage_options).get("text_column") if source else None)
    if not source or not column:
        return groups
    try:
        texts = read_dataset(source, storage_options, ["id", column])
    except KeyError:  # the source has no such column
        return groups
    where = pc.index_in(groups.column("id"), texts.column("id"))
    return groups.append_column("text", texts.column(column).take(where))
