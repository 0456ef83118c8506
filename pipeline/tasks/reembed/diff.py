"""What changed in a corpus since the last version: each row's content hash by id, and a diff of two such indexes.

``content_hash`` = sha256 of prompt, NUL, text: what a vector depends on besides the model and options.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import corpus
from pipeline.io.corpus import CorpusError, Shard
from pipeline.io.rows import texts_of

HASH_COLUMN = "content_hash"


def content_hash(prompt: str, text: str) -> str:
    """What a vector depends on besides the model and options; the NUL keeps prompt and text apart."""
    return hashlib.sha256(prompt.encode() + b"\0" + text.encode()).hexdigest()


@dataclass
class CorpusIndex:
    """Every current row: id, content_hash, where it is (shard, file row) and its kept columns."""

    table: pa.Table
    skipped_rows: int
    keep_digest: str | None


def index_corpus(
    shards: list[Shard], columns, prompt: str, on_null: str, storage_options: dict
) -> CorpusIndex:
    """One read of the text, id and kept columns: a row's hash, place and kept values; texts are dropped.
    Every id must occur once (the error names both rows)."""
    parts: list[pa.Table] = []
    skipped = 0
    for number, shard in enumerate(shards):
        table = corpus.read_shard(shard, columns.read, storage_options)
        ids = corpus.ids_of(table, shard, columns.id)
        texts, keep = texts_of(table, shard, columns.text, on_null)
        rows = np.arange(shard.row_start, shard.row_end, dtype=np.int64)
        if not keep.all():
            mask = pa.array(keep)
            table, ids, rows = table.filter(mask), pc.filter(ids, mask), rows[keep]
            skipped += int((~keep).sum())
        kept = {name: table.column(name).combine_chunks() for name in columns.keep}
        parts.append(
            pa.table(
                {
                    "id": ids,
                    HASH_COLUMN: pa.array([content_hash(prompt, t) for t in texts], pa.string()),
                    "__shard": pa.array(np.full(len(rows), number, dtype=np.int32)),
                    "__row": pa.array(rows),
                    **{f"keep:{name}": array for name, array in kept.items()},
                }
            )
        )
    table = pa.concat_tables(parts, promote_options="permissive").combine_chunks()
    check_unique(table, shards)
    return CorpusIndex(table, skipped, kept_digest(table, columns.keep))


def kept_digest(table: pa.Table, keep: tuple[str, ...], batch_rows: int = 65536) -> str | None:
    """sha256 of (id, kept columns) in id order: kept values can change while the text does not, and such a
    corpus is not unchanged. Independent of file order and sharding; freshly taken batches serialize the
    same way every time."""
    if not keep:
        return None
    selected = table.select(["id", *(f"keep:{name}" for name in keep)]).rename_columns(["id", *keep])
    order = pc.sort_indices(selected.column("id"))
    digest = hashlib.sha256()
    for start in range(0, len(order), batch_rows):
        batch = selected.take(order.slice(start, batch_rows))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()


def check_unique(table: pa.Table, shards: list[Shard]) -> None:
    ids = table.column("id")
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    duplicated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    rows = pc.indices_nonzero(pc.is_in(ids, value_set=duplicated)).to_pylist()
    first = rows[0]
    value = ids[first].as_py()
    second = next(r for r in rows[1:] if ids[r].as_py() == value)

    def where(row: int) -> str:
        shard = shards[table.column("__shard")[row].as_py()]
        return f"{shard.url} row {table.column('__row')[row].as_py()}"

    raise CorpusError(
        f"{where(second)}: duplicate id {value!r} (first at {where(first)}); reembed matches "
        "rows by id, so every id must occur once"
    )


def id_type_of(schemas: dict[str, pa.Schema], id_column: str) -> str:
    """How corpus.ids_of will type the ids: int64 or string."""
    kind = next(iter(schemas.values())).field(id_column).type
    return "int64" if pa.types.is_integer(kind) else "string"


# -- diff -----------------------------------------------------------------------------------------


@dataclass
class Diff:
    """Which current rows are new, changed or unchanged, and how old rows map onto current ones."""

    new: pa.Array  # bool per current row
    changed: pa.Array  # bool per current row
    carried: pa.Table  # old index rows whose id and hash are unchanged, with "__cur": the current row
    deleted: int

    @property
    def counts(self) -> dict:
        new = pc.sum(self.new).as_py() or 0
        changed = pc.sum(self.changed).as_py() or 0
        return {"new": new, "changed": changed, "unchanged": self.carried.num_rows, "deleted": self.deleted}

    @property
    def delta(self) -> pa.Array:
        return pc.or_(self.new, self.changed)


def diff(current: pa.Table, old: pa.Table | None) -> Diff:
    """Two hash lookups over whole columns (never one per row or per part)."""
    rows = current.num_rows
    if old is None:
        empty = pa.table(
            {
                "id": current.column("id").slice(0, 0),
                "__part": pa.array([], pa.int32()),
                "__row": pa.array([], pa.int64()),
                "__cur": pa.array([], pa.int32()),
            }
        )
        return Diff(pa.array(np.ones(rows, bool)), pa.array(np.zeros(rows, bool)), empty, 0)
    current_ids = current.column("id").combine_chunks()
    old_to_current = pc.index_in(old.column("id"), value_set=current_ids)
    present = pc.is_valid(old_to_current)
    same = pc.and_(
        present, pc.equal(old.column(HASH_COLUMN), pc.take(current.column(HASH_COLUMN), old_to_current))
    )
    same = pc.fill_null(same, False)
    carried = old.append_column("__cur", old_to_current).filter(same)
    in_old = pc.is_in(current_ids, value_set=old.column("id").combine_chunks())
    unchanged = np.zeros(rows, bool)
    unchanged[carried.column("__cur").to_numpy()] = True
    new = pc.invert(in_old)
    changed = pc.and_(in_old, pa.array(~unchanged))
    deleted = old.num_rows - (pc.sum(present).as_py() or 0)
    return Diff(new, changed, carried, deleted)
