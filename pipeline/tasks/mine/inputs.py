"""Mining inputs: the (anchor, positive) pairs and the optional extra corpus, planned and checked on the
driver before Ray starts or anything is written, without holding their texts.

The inputs are read as *pieces*: row ranges of the pair / corpus files (``io/corpus.py`` shards of
``texts_per_task`` rows) or whole parts of an embed output. One streaming pass (:func:`scan_inputs`)
reads each piece once, checks its texts, feeds them to the plan key's digests and keeps a 128-bit hash
per text; the texts are dropped piece by piece. From the hashes alone the driver groups the pairs as
sentence-transformers does (``compute/negatives.py``: distinct anchors in first-appearance order,
corpus = ``dict.fromkeys(extra corpus + positives)``, each anchor's distinct positives in row order).

What the driver keeps afterwards, per input row or distinct text, is integers only: each anchor's first
row, each anchor's positive corpus indices (CSR), and per piece the rows whose text is new to the
corpus. Texts are read again where they are needed: the encoder actors read the texts they encode,
the corpus slice actors the texts of their slice, and the driver the anchors of the part it writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.compute import negatives as rules
from pipeline.io import corpus as corpus_io
from pipeline.io.dataset import complete_manifest, dataset_metadata, float_vectors, read_dataset
from pipeline.io.output import DatasetError, OutputFolder
from pipeline.spec import MineSpec


class MineError(RuntimeError):
    """The mining cannot run as asked; the message says why."""


# -- pieces: row ranges of the inputs ----------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A run of input rows: a shard of a file (``shard``) or one part of an embed output (``root`` and its
    manifest ``entry``). Picklable: actors read their own pieces."""

    url: str  # for messages: the file, or the embed part
    rows: int
    shard: dict | None = None
    root: str | None = None
    entry: dict | None = None

    @property
    def first_row(self) -> int:
        """The piece's first row within its file (0 for an embed part)."""
        return int(self.shard["row_start"]) if self.shard else 0

    def read(self, columns: Sequence[str], storage_options: dict) -> pa.Table:
        if self.shard is not None:
            return corpus_io.read_shard(corpus_io.Shard.from_dict(self.shard), list(columns), storage_options)
        folder = OutputFolder(self.root, storage_options)
        missing = [c for c in columns if c not in folder.read_schema(self.entry["part"]).names]
        if missing:
            raise DatasetError(f"{self.url}: missing column(s) {', '.join(missing)}")
        return folder.read_part(self.entry, list(columns))


def texts_of(table: pa.Table, column: str, piece: Piece) -> list[str]:
    """The column's values as Python strings; a null or non-text value names the file and row."""
    array = table.column(column)
    if (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)) and array.null_count == 0:
        return array.to_pylist()
    for row, value in enumerate(array.to_pylist()):
        if not isinstance(value, str):
            raise corpus_io.CorpusError(
                f"{piece.url}: row {piece.first_row + row}: {column!r} is {value!r}, expected a text"
            )
    return array.to_pylist()


@dataclass(frozen=True)
class Selection:
    """Some rows of some pieces, in order: what an actor reads to get the texts it needs. Picklable."""

    parts: tuple[tuple[Piece, np.ndarray], ...]  # (piece, local rows ascending)
    column: str

    @property
    def rows(self) -> int:
        return sum(len(rows) for _, rows in self.parts)

    def read(self, storage_options: dict) -> list[str]:
        out: list[str] = []
        for piece, rows in self.parts:
            values = texts_of(piece.read([self.column], storage_options), self.column, piece)
            out.extend(values[int(r)] for r in rows)
        return out


def select_rows(pieces: Sequence[Piece], offsets: np.ndarray, rows: np.ndarray, column: str) -> Selection:
    """A Selection of global stream rows (ascending) over consecutive pieces (``offsets``: cumulative)."""
    rows = np.asarray(rows, dtype=np.int64)
    which = np.searchsorted(offsets, rows, side="right") - 1
    parts = []
    for number in np.unique(which).tolist():
        local = (rows[which == number] - offsets[number]).astype(np.int32)  # rows within a piece: small
        parts.append((pieces[number], local))
    return Selection(tuple(parts), column)


# -- listing the inputs (no rows read yet) ------------------------------------------------------------


@dataclass
class Inputs:
    """Where the pairs and the extra corpus are, and which columns to read."""

    pairs: list[Piece]
    anchor_column: str
    positive_column: str
    extra: list[Piece] = field(default_factory=list)
    extra_column: str = "text"
    embed_root: str | None = None  # the extra corpus is this embed output
    embed_metadata: dict | None = None
    reuse_vectors: bool = False  # same model and prompt: its vectors are used, not re-encoded
    where: str = ""
    columns_chosen: str = "as given"  # how the anchor and positive columns were picked (logged, reported)

    @property
    def reused_from(self) -> str | None:
        return self.embed_root if self.reuse_vectors else None

    def columns_line(self) -> str:
        return (
            f"pairs {self.where}: anchor column {self.anchor_column!r}, positive column "
            f"{self.positive_column!r} ({self.columns_chosen})"
        )

    def columns_record(self) -> dict:
        """The chosen columns as the report records them."""
        return {"anchor": self.anchor_column, "positive": self.positive_column, "chosen": self.columns_chosen}


def file_pieces(
    urls: list[str], rows_per_piece: int, storage_options: dict
) -> tuple[list[Piece], pa.Schema | None]:
    sources = corpus_io.list_sources(urls, storage_options)
    schema = corpus_io.source_schema(sources[0], storage_options) if sources else None
    shards = corpus_io.plan_shards(sources, rows_per_piece, storage_options)
    return [Piece(s.url, s.rows, shard=s.to_dict()) for s in shards], schema


# sentence-transformers' and HF datasets' usual names, most specific first.
ANCHOR_NAMES = ("anchor", "query", "question")
POSITIVE_NAMES = ("positive", "answer", "document", "text")


def pair_columns(schema: pa.Schema, spec: MineSpec, where: str) -> tuple[str, str, str]:
    """The anchor and positive columns and how they were chosen: as given; else by their conventional
    names; else, with exactly two text columns, those two in order (as sentence-transformers takes the
    first two). More candidates than that is a refusal naming them: a silent guess mines the wrong text."""
    text_columns = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    for role, name in (("anchor", spec.anchor_column), ("positive", spec.positive_column)):
        if name is not None and name not in schema.names:
            raise corpus_io.CorpusError(
                f"{where}: missing {role} column {name!r}; has {', '.join(schema.names)}"
            )
    anchor, positive = spec.anchor_column, spec.positive_column
    if anchor is None:
        anchor = next((c for c in ANCHOR_NAMES if c in text_columns and c != positive), None)
    if positive is None:
        positive = next((c for c in POSITIVE_NAMES if c in text_columns and c != anchor), None)
    if spec.anchor_column and spec.positive_column:
        how = "as given"
    elif anchor and positive:
        how = "given or by their conventional names"
    else:
        left = [c for c in text_columns if c not in (anchor, positive)]
        needed = (anchor is None) + (positive is None)
        if len(left) != needed:
            found = ", ".join(text_columns) or "none"
            raise corpus_io.CorpusError(
                f"{where}: cannot tell the anchor and positive columns apart (text columns: {found}); "
                "name them with --anchor-column and --positive-column"
            )
        if anchor is None:
            anchor, left = left[0], left[1:]
        if positive is None:
            positive = left[0]
        how = "the only text columns"
    return anchor, positive, how


def list_inputs(
    spec: MineSpec, storage_options: dict, fingerprint: str | None, corpus_prompt: str | None
) -> Inputs:
    """The pieces of the pairs and of the extra corpus, their columns checked (only schemas are read).
    ``fingerprint`` / ``corpus_prompt``: the model's; an embed output made with both has its vectors reused
    (None: never reused, e.g. when re-filtering candidates)."""
    where = ", ".join(spec.input)
    pairs, schema = file_pieces(spec.input, spec.texts_per_task, storage_options)
    if not sum(p.rows for p in pairs) or schema is None:
        raise MineError(f"pairs {where}: no rows")
    anchor, positive, how = pair_columns(schema, spec, where)
    if anchor == positive:
        raise ValueError(f"anchor and positive columns must differ, both are {anchor!r}")
    inputs = Inputs(
        pairs, anchor, positive, extra_column=spec.corpus_text_column, where=where, columns_chosen=how
    )
    if not spec.corpus:
        return inputs
    url = spec.corpus[0].rstrip("/")
    if len(spec.corpus) == 1 and OutputFolder(url, storage_options).is_complete():
        metadata = dataset_metadata(url, storage_options)
        column = metadata.get("text_column") or spec.corpus_text_column
        folder = OutputFolder(url, storage_options)
        entries = complete_manifest(folder).get("parts") or []
        if entries and column not in folder.read_schema(entries[0]["part"]).names:
            raise DatasetError(
                f"{url}: the embed output has no text column {column!r} (embed it with --keep-columns {column})"
            )
        inputs.extra = [Piece(folder.url_of(e["part"]), int(e["rows"]), root=url, entry=e) for e in entries]
        inputs.extra_column = column
        inputs.embed_root, inputs.embed_metadata = url, metadata
        inputs.reuse_vectors = (
            fingerprint is not None
            and metadata.get("fingerprint") == fingerprint
            and (metadata.get("prompt") or "") == corpus_prompt
        )
    else:
        inputs.extra, corpus_schema = file_pieces(spec.corpus, spec.texts_per_task, storage_options)
        if corpus_schema is not None and spec.corpus_text_column not in corpus_schema.names:
            raise corpus_io.CorpusError(
                f"{', '.join(spec.corpus)}: missing corpus text column "
                f"{spec.corpus_text_column!r}; has {', '.join(corpus_schema.names)}"
            )
    if not sum(p.rows for p in inputs.extra):
        raise MineError(f"corpus {', '.join(spec.corpus)}: no rows")
    return inputs


# -- the streaming pass ------------------------------------------------------------------------------


def give_back_memory(trim: bool = False) -> None:
    """Return freed memory to the system: Arrow's pool keeps the pages of every row group it decoded, and
    glibc keeps its heap's top, so a streaming pass would otherwise leave the driver at its high-water mark."""
    pa.default_memory_pool().release_unused()
    if trim:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def hash_column(table: pa.Table, column: str, piece: Piece, digest, out: np.ndarray) -> None:
    """Check a text column and write :func:`text_hashes` of it into ``out`` ([rows, 2] uint64), straight
    from Arrow's UTF-8 buffers: no Python string per row, so streaming a large input leaves no heap behind."""
    array = table.column(column)
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)) or array.null_count:
        texts_of(table, column, piece)  # raises, naming the file and row
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    _, offsets_buffer, data_buffer = array.buffers()
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=width)[array.offset : array.offset + len(array) + 1]
    data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
    digests = bytearray()
    update, blake2b = digest.update, hashlib.blake2b
    for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        text = data[start:stop]
        update((stop - start).to_bytes(8, "little"))
        update(text)
        digests += blake2b(text, digest_size=16).digest()
    out[:] = np.frombuffer(bytes(digests), dtype=np.uint64).reshape(-1, 2)


@dataclass
class CorpusChunk:
    """The rows of one piece whose text is new to the corpus: corpus indices ``start .. start + len(rows)``."""

    piece: Piece
    column: str
    rows: np.ndarray  # local rows, ascending
    start: int
    from_embed: bool  # a part of the extra corpus' embed output

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass
class MinePlan:
    """The grouped input, as integers: see the module docstring."""

    inputs: Inputs
    pairs: int
    anchors: int
    corpus_size: int
    max_positives: int
    anchor_rows: np.ndarray  # first pairs row of each anchor
    positive_ptr: np.ndarray  # anchor a's positives: positive_idx[positive_ptr[a]:positive_ptr[a + 1]]
    positive_idx: np.ndarray
    chunks: list[CorpusChunk]  # the corpus, in corpus-index order
    pairs_digest: str
    corpus_digest: str
    pair_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    def positives(self, start: int, stop: int) -> list[np.ndarray]:
        ptr, idx = self.positive_ptr, self.positive_idx
        return [idx[ptr[a] : ptr[a + 1]] for a in range(start, stop)]

    def anchor_selection(self, start: int, stop: int) -> Selection:
        """Where the texts of anchors ``start .. stop`` are (their first rows)."""
        return select_rows(
            self.inputs.pairs, self.pair_offsets, self.anchor_rows[start:stop], self.inputs.anchor_column
        )


def compact(values: np.ndarray) -> np.ndarray:
    """int32 when every value fits (the plan's arrays are what the driver keeps per pair)."""
    if len(values) and (values.max() >= 2**31 or values.min() < -(2**31)):
        return values
    return values.astype(np.int32)


def offsets_of(pieces: Sequence[Piece]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([p.rows for p in pieces], dtype=np.int64)]).astype(np.int64)


def scan_inputs(
    inputs: Inputs, storage_options: dict, on_corpus_hashes: Callable[[np.ndarray], None] | None = None
) -> MinePlan:
    """Read every piece once: check the texts, digest them, hash them; group the hashes as ST groups the
    texts. ``on_corpus_hashes`` gets the distinct corpus texts' hashes (corpus-index order) before they are
    dropped (to map a dedup output onto corpus indices)."""
    corpus_digest, anchors_digest, positives_digest = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    n_extra = sum(p.rows for p in inputs.extra)
    n_pairs = sum(p.rows for p in inputs.pairs)
    # One array per stream, filled piece by piece (no per-piece arrays left scattered over the heap).
    corpus_hashes = np.empty((n_extra + n_pairs, 2), dtype=np.uint64)
    anchor_hashes = np.empty((n_pairs, 2), dtype=np.uint64)
    at = 0
    for piece in inputs.extra:
        table = piece.read([inputs.extra_column], storage_options)
        hash_column(table, inputs.extra_column, piece, corpus_digest, corpus_hashes[at : at + piece.rows])
        at += piece.rows
        del table
        give_back_memory()
    row = 0
    for piece in inputs.pairs:
        table = piece.read([inputs.anchor_column, inputs.positive_column], storage_options)
        hash_column(table, inputs.anchor_column, piece, anchors_digest, anchor_hashes[row : row + piece.rows])
        hash_column(
            table,
            inputs.positive_column,
            piece,
            positives_digest,
            corpus_hashes[at + row : at + row + piece.rows],
        )
        row += piece.rows
        del table
        give_back_memory()
    corpus_ids, corpus_firsts = rules.first_appearance(corpus_hashes)
    if on_corpus_hashes is not None:
        on_corpus_hashes(corpus_hashes[corpus_firsts])
    del corpus_hashes
    positive_ids = corpus_ids[n_extra:].copy()
    del corpus_ids
    anchor_ids, anchor_firsts = rules.first_appearance(anchor_hashes)
    del anchor_hashes
    ptr, idx, max_positives = rules.positive_lists(anchor_ids, positive_ids, len(anchor_firsts))
    del anchor_ids, positive_ids
    give_back_memory(trim=True)

    # Per piece of the corpus stream (extra corpus, then the pairs' positives): its new rows.
    is_first = np.zeros(n_extra + sum(p.rows for p in inputs.pairs), dtype=bool)
    is_first[corpus_firsts] = True
    chunks: list[CorpusChunk] = []
    position = start = 0
    stream = [(p, inputs.extra_column, inputs.embed_root is not None) for p in inputs.extra]
    stream += [(p, inputs.positive_column, False) for p in inputs.pairs]
    for piece, column, from_embed in stream:
        local = np.flatnonzero(is_first[position : position + piece.rows]).astype(np.int32)
        if len(local):
            chunks.append(CorpusChunk(piece, column, local, start, from_embed))
            start += len(local)
        position += piece.rows
    return MinePlan(
        inputs=inputs,
        pairs=sum(p.rows for p in inputs.pairs),
        anchors=len(anchor_firsts),
        corpus_size=len(corpus_firsts),
        max_positives=max_positives,
        anchor_rows=compact(anchor_firsts),
        positive_ptr=compact(ptr),
        positive_idx=compact(idx),
        chunks=chunks,
        pairs_digest=hashlib.sha256(
            f"{anchors_digest.hexdigest()} {positives_digest.hexdigest()}".encode()
        ).hexdigest(),
        corpus_digest=corpus_digest.hexdigest(),
        pair_offsets=offsets_of(inputs.pairs),
    )


# -- whole-corpus reading (inspection and tests; the job itself streams) ------------------------------


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
    """The whole extra corpus in memory (texts, and an embed output's vectors when the model and prompt
    match): for inspection and tests. The job streams it instead (:func:`list_inputs`)."""
    if not spec.corpus:
        return CorpusSource([])
    url = spec.corpus[0].rstrip("/")
    if len(spec.corpus) == 1 and OutputFolder(url, storage_options).is_complete():
        metadata = dataset_metadata(url, storage_options)
        column = metadata.get("text_column") or spec.corpus_text_column
        table = read_dataset(url, storage_options)
        if column not in table.column_names:
            raise DatasetError(
                f"{url}: the embed output has no text column {column!r} (embed it with --keep-columns {column})"
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
