"""Corpus row rules every job follows: which columns, how files' schemas must agree, what a null or
empty text does (``--on-null``), and when ids are unique enough (``--on-duplicate-id``).

Checked on the driver before anything is committed, so the error names the file and the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.io import corpus
from pipeline.io.corpus import CorpusError, Shard


@dataclass(frozen=True)
class Columns:
    text: str
    id: str | None  # None: ids are generated from file and row
    keep: tuple[str, ...]

    @property
    def read(self) -> list[str]:
        names = [self.text] + ([self.id] if self.id else []) + list(self.keep)
        return list(dict.fromkeys(names))


def resolve_columns(spec, schemas: dict[str, pa.Schema]) -> Columns:
    """Check the columns (``spec.text_column``, ``id_column``, ``keep_columns``) against every file's
    schema; files must agree on their types."""
    schemas = {
        url: s for url, s in schemas.items() if s.names
    } or schemas  # empty JSON Lines: no rows, no schema
    id_column = spec.id_column
    if id_column is None and all("id" in s.names for s in schemas.values()):
        id_column = "id"
    wanted = [spec.text_column] + ([id_column] if id_column else []) + list(spec.keep_columns)
    first_url, first = next(iter(schemas.items()))
    for url, schema in schemas.items():
        for name in wanted:
            if name not in schema.names:
                role = "text" if name == spec.text_column else "id" if name == id_column else "kept"
                raise CorpusError(f"{url}: missing {role} column {name!r}; has {', '.join(schema.names)}")
            if not compatible(schema.field(name).type, first.field(name).type):
                raise CorpusError(
                    f"{url}: column {name!r} is {schema.field(name).type} but {first_url} has "
                    f"{first.field(name).type}; the files' schemas disagree"
                )
    text_type = first.field(spec.text_column).type
    if not (
        pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)
    ):
        raise CorpusError(f"{first_url}: text column {spec.text_column!r} is {text_type}, expected strings")
    return Columns(spec.text_column, id_column, tuple(spec.keep_columns))


def compatible(a: pa.DataType, b: pa.DataType) -> bool:
    """Same type, allowing string/large_string, integer widths and all-null JSON columns to mix."""
    if a == b or pa.types.is_null(a) or pa.types.is_null(b):
        return True
    strings = (pa.types.is_string, pa.types.is_large_string)
    if any(f(a) for f in strings) and any(f(b) for f in strings):
        return True
    return pa.types.is_integer(a) and pa.types.is_integer(b)


def check_rows(
    shards: list[Shard], columns: Columns, on_null: str, on_duplicate_id: str, storage_options: dict | None
) -> None:
    """Before anything is committed, read the text and id columns once on the driver: every text
    decodes, no null/empty text under ``--on-null fail``, every id once. The error names file and row,
    so a corpus that would fail half-way leaves no part behind."""
    check_ids = columns.id is not None and on_duplicate_id == "fail"
    seen: dict = {}
    for shard in shards:
        check_texts = True  # every format may hold invalid UTF-8 (a Parquet string column is not validated)
        wanted = ([columns.text] if check_texts else []) + ([columns.id] if check_ids else [])
        if not wanted:
            continue
        table = corpus.read_shard(shard, wanted, storage_options)
        if check_texts:
            texts_of(table, shard, columns.text, on_null)
        if not check_ids:
            continue
        ids = corpus.ids_of(table, shard, columns.id).to_pylist()
        for offset, value in enumerate(ids):
            where = (shard.url, shard.row_start + offset)
            first = seen.setdefault(value, where)
            if first is not where:
                raise CorpusError(
                    f"{where[0]}: row {where[1]}: duplicate id {value!r} (first at {first[0]} row {first[1]}); "
                    "use --on-duplicate-id keep to allow it"
                )


def texts_of(table: pa.Table, shard: Shard, column: str, on_null: str) -> tuple[list[str], np.ndarray]:
    """The shard's texts and a keep-mask; null/empty texts follow --on-null, invalid UTF-8 is an error."""
    array = table.column(column).combine_chunks()
    if pa.types.is_null(array.type):
        array = pa.array([None] * len(array), pa.string())
    try:
        array.validate(full=True)
        texts = array.to_pylist()
    except (pa.ArrowInvalid, UnicodeDecodeError):
        for offset in range(len(array)):
            try:
                array.slice(offset, 1).to_pylist()
            except UnicodeDecodeError:
                raise CorpusError(
                    f"{shard.url}: row {shard.row_start + offset}: invalid UTF-8 in {column!r}"
                ) from None
        raise
    missing = np.fromiter((t is None or t == "" for t in texts), dtype=bool, count=len(texts))
    if missing.any() and on_null == "fail":
        row = shard.row_start + int(np.argmax(missing))
        kind = "null" if texts[int(np.argmax(missing))] is None else "empty"
        raise CorpusError(
            f"{shard.url}: row {row}: {kind} text in column {column!r} (use --on-null skip or empty)"
        )
    if on_null == "empty":
        return ["" if t is None else t for t in texts], np.ones(len(texts), dtype=bool)
    keep = ~missing
    return [t for t, k in zip(texts, keep, strict=True) if k], keep
