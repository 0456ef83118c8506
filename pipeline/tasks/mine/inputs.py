"""Mining inputs: the (anchor, positive) pairs and the optional extra corpus, read and checked on the
driver before Ray starts or anything is written."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.io import corpus as corpus_io
from pipeline.io.dataset import dataset_metadata, float_vectors, read_dataset
from pipeline.io.output import DatasetError, OutputFolder
from pipeline.spec import MineSpec


class MineError(RuntimeError):
    """The mining cannot run as asked; the message says why."""


def read_table(urls: list[str], storage_options: dict, what: str) -> pa.Table:
    """All rows of the given files (pairs, or a raw corpus), in file order."""
    sources = corpus_io.list_sources(urls, storage_options)
    shards = corpus_io.plan_shards(sources, 1 << 40, storage_options)
    tables = [corpus_io.read_shard(shard, None, storage_options) for shard in shards]
    if not tables:
        raise MineError(f"{what} {', '.join(urls)}: no rows")
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as exc:
        raise corpus_io.CorpusError(
            f"{what} {', '.join(urls)}: the files' schemas disagree ({exc})"
        ) from None


def pair_columns(table: pa.Table, spec: MineSpec, where: str) -> tuple[str, str]:
    """The anchor and positive columns: as given, else the first two text columns (as sentence-transformers)."""
    text_columns = [
        f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]
    anchor = spec.anchor_column or (text_columns[0] if text_columns else None)
    positive = spec.positive_column or next((c for c in text_columns if c != anchor), None)
    for role, name in (("anchor", anchor), ("positive", positive)):
        if name is None:
            raise corpus_io.CorpusError(
                f"{where}: no {role} column (found text columns: {text_columns or 'none'})"
            )
        if name not in table.column_names:
            raise corpus_io.CorpusError(
                f"{where}: missing {role} column {name!r}; has {', '.join(table.column_names)}"
            )
    return anchor, positive


def texts(table: pa.Table, column: str, where: str) -> list[str]:
    values = table.column(column).to_pylist()
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise corpus_io.CorpusError(f"{where}: row {row}: {column!r} is {value!r}, expected a text")
    return values


@dataclass
class CorpusSource:
    texts: list[str]
    vectors: np.ndarray | None = None  # embeddings reused from an embed output (same model), by text
    reused_from: str | None = None


def read_corpus(spec: MineSpec, storage_options: dict, fingerprint: str, corpus_prompt: str) -> CorpusSource:
    """Extra corpus texts; an embed output with the same model and prompt gives its vectors too."""
    if not spec.corpus:
        return CorpusSource([])
    url = spec.corpus[0].rstrip("/")
    if len(spec.corpus) == 1 and OutputFolder(url, storage_options).is_complete():
        metadata = dataset_metadata(url, storage_options)
        column = metadata.get("text_column") or spec.corpus_text_column
        table = read_dataset(url, storage_options)
        if column not in table.column_names:
            raise DatasetError(
                f"{url}: the embed output has no text column {column!r} "
                f"(embed it with --keep-columns {column})"
            )
        reuse = metadata.get("fingerprint") == fingerprint and (metadata.get("prompt") or "") == corpus_prompt
        vectors = float_vectors(table, metadata, url) if reuse else None
        return CorpusSource(texts(table, column, url), vectors, url if reuse else None)
    table = read_table(spec.corpus, storage_options, "corpus")
    if spec.corpus_text_column not in table.column_names:
        raise corpus_io.CorpusError(
            f"{', '.join(spec.corpus)}: missing corpus text column "
            f"{spec.corpus_text_column!r}; has {', '.join(table.column_names)}"
        )
    return CorpusSource(texts(table, spec.corpus_text_column, ", ".join(spec.corpus)))
