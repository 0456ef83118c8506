"""Read Parquet / JSON Lines / Arrow IPC corpora and cut them into deterministic shards.

A shard is a row range of one file. Parquet shards follow row-group boundaries (a row group larger
than ``rows_per_shard`` is split into even row ranges), Arrow IPC shards follow record batches, and
JSON Lines shards are line ranges located by byte offsets found once at planning time. The same files
and options always give the same shards.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.io.storage import filesystem, with_retries

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".arrows": "arrow",
}
GLOB_CHARS = "*?["


class CorpusError(ValueError):
    """Bad input data; the message names the file (and the row where there is one)."""


@dataclass(frozen=True)
class Shard:
    shard_id: int
    url: str
    format: str
    row_start: int  # first row of the shard within its file
    row_end: int  # one past the last row
    byte_start: int = 0  # JSON Lines only: where row_start begins
    byte_end: int = 0
    id_prefix: str = ""  # for generated ids: the file's path relative to its input

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Shard:
        return cls(**data)


@dataclass(frozen=True)
class SourceFile:
    url: str
    format: str
    size: int
    id_prefix: str


def file_format(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return FORMATS[suffix]
    raise CorpusError(f"{url}: unknown file type; expected .parquet, .jsonl/.json/.ndjson or .arrow/.feather")


def input_base(url: str, fs, path: str) -> str:
    """The folder that generated ids are relative to: the part of the input before any glob."""
    cut = min((path.find(c) for c in GLOB_CHARS if c in path), default=-1)
    if cut >= 0:
        return path[:cut].rsplit("/", 1)[0]
    return path.rstrip("/") if with_retries(lambda: fs.isdir(path), what=url) else posixpath.dirname(path)


def list_sources(inputs: Sequence[str], storage_options: dict | None) -> list[SourceFile]:
    """Every input file, sorted, with its format, size and id prefix."""
    from pipeline.io.storage import expand_inputs

    sources: dict[str, SourceFile] = {}
    for url in inputs:
        fs, path = filesystem(url, storage_options)
        base = input_base(url, fs, path)
        for file_url in expand_inputs([url], storage_options):
            _, file_path = filesystem(file_url, storage_options)
            if file_url in sources:
                continue
            size = with_retries(lambda f=fs, p=file_path: f.size(p), what=file_url)
            prefix = posixpath.relpath(file_path, base) if base else file_path
            sources[file_url] = SourceFile(file_url, file_format(file_url), int(size or 0), prefix)
    return [sources[k] for k in sorted(sources)]


def split_rows(start: int, count: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """Even row ranges of at most rows_per_shard rows."""
    pieces = max(1, -(-count // rows_per_shard))
    bounds = [start + (count * i) // pieces for i in range(pieces + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(pieces)]


def group_units(unit_rows: Sequence[int], rows_per_shard: int) -> list[tuple[int, int]]:
    """Row ranges from consecutive units (row groups, record batches), split when a unit is too big."""
    ranges: list[tuple[int, int]] = []
    start = position = 0
    for rows in unit_rows:
        if rows > rows_per_shard:
            if position > start:
                ranges.append((start, position))
            ranges.extend(split_rows(position, rows, rows_per_shard))
            position += rows
            start = position
            continue
        if position + rows - start > rows_per_shard and position > start:
            ranges.append((start, position))
            start = position
        position += rows
    if position > start:
        ranges.append((start, position))
    return ranges


def read_whole(fs, path: str, url: str, kind: str, read):
    """``read(handle)`` with transient storage errors retried; decoding errors are a CorpusError at once."""

    def attempt():
        try:
            with fs.open(path, "rb") as handle:
                return read(handle)
        except Exception as exc:
            if is_corruption(exc):
                raise CorpusError(f"{url}: unreadable or corrupt {kind} file ({exc})") from None
            raise

    return with_retries(attempt, what=url)


def parquet_unit_rows(fs, path: str, url: str) -> tuple[list[int], pa.Schema]:
    def read(handle):
        meta = pq.ParquetFile(handle).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)], meta.schema.to_arrow_schema()

    return read_whole(fs, path, url, "Parquet", read)


def arrow_unit_rows(fs, path: str, url: str) -> tuple[list[int], pa.Schema]:
    def read(handle):
        data = handle.read()
        try:
            reader = ipc.open_file(pa.BufferReader(data))
            return [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)], reader.schema
        except pa.ArrowInvalid:
            stream = ipc.open_stream(pa.BufferReader(data))
            batches = list(stream)
            return [b.num_rows for b in batches], stream.schema

    return read_whole(fs, path, url, "Arrow IPC", read)


def jsonl_line_offsets(fs, path: str, url: str) -> list[int]:
    """Byte offset of every non-blank line start, plus the file length at the end."""

    def read(handle) -> list[int]:
        offsets: list[int] = []
        position = 0
        for line in handle:
            if line.strip():
                offsets.append(position)
            position += len(line)
        return [*offsets, position]

    return read_whole(fs, path, url, "JSON Lines", read)


# Default shard size: about AUTO_SHARDS shards, each between these bounds. A large corpus gets shards
# big enough that a part's fixed costs (commit, receipt) stay a few percent of its time at GPU speed; a
# small one keeps enough shards to spread over the workers.
AUTO_SHARDS = 64
MIN_AUTO_SHARD_ROWS = 10_000
MAX_AUTO_SHARD_ROWS = 250_000


def auto_shard_rows(total_rows: int) -> int:
    return min(max(total_rows // AUTO_SHARDS, MIN_AUTO_SHARD_ROWS), MAX_AUTO_SHARD_ROWS)


def plan_auto_shards(sources: Sequence[SourceFile], storage_options: dict | None) -> list[Shard]:
    """Shards of `auto_shard_rows` rows: planned at the smallest size, then neighbours within one file
    merged up to the size the whole corpus calls for (one pass over the files, deterministic)."""
    small = plan_shards(sources, MIN_AUTO_SHARD_ROWS, storage_options)
    target = auto_shard_rows(sum(s.rows for s in small))
    merged: list[Shard] = []
    for shard in small:
        last = merged[-1] if merged else None
        adjacent = last is not None and last.url == shard.url and last.row_end == shard.row_start
        if adjacent and last.rows + shard.rows <= target:
            merged[-1] = replace(last, row_end=shard.row_end, byte_end=shard.byte_end)
            continue
        merged.append(replace(shard, shard_id=len(merged)))
    return merged


def plan_shards(
    sources: Sequence[SourceFile], rows_per_shard: int, storage_options: dict | None
) -> list[Shard]:
    """Deterministic shards over the sorted files."""
    if rows_per_shard <= 0:
        raise ValueError("rows_per_shard must be positive")
    shards: list[Shard] = []
    for source in sources:
        fs, path = filesystem(source.url, storage_options)
        if source.format == "jsonl":
            offsets = jsonl_line_offsets(fs, path, source.url)
            for start, end in split_rows(0, len(offsets) - 1, rows_per_shard) if len(offsets) > 1 else []:
                shards.append(
                    Shard(
                        len(shards),
                        source.url,
                        "jsonl",
                        start,
                        end,
                        offsets[start],
                        offsets[end],
                        source.id_prefix,
                    )
                )
            continue
        reader = parquet_unit_rows if source.format == "parquet" else arrow_unit_rows
        units, _ = reader(fs, path, source.url)
        for start, end in group_units(units, rows_per_shard):
            shards.append(
                Shard(len(shards), source.url, source.format, start, end, id_prefix=source.id_prefix)
            )
    return shards


def source_schema(source: SourceFile, storage_options: dict | None) -> pa.Schema:
    """The file's schema (JSON Lines: inferred from its first lines)."""
    fs, path = filesystem(source.url, storage_options)
    if source.format == "parquet":
        return parquet_unit_rows(fs, path, source.url)[1]
    if source.format == "arrow":
        return arrow_unit_rows(fs, path, source.url)[1]
    head = read_whole(
        fs,
        path,
        source.url,
        "JSON Lines",
        lambda handle: b"".join(line for _, line in zip(range(100), handle, strict=False)),
    )
    return parse_jsonl(head, source.url, 0).schema


def parse_jsonl(data: bytes, url: str, first_row: int) -> pa.Table:
    """Parse JSON Lines bytes; a bad line is reported with its row number."""
    try:
        return pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(block_size=1 << 26))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    rows = []
    for offset, line in enumerate(x for x in data.splitlines() if x.strip()):
        row = first_row + offset
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{url}: row {row}: invalid UTF-8 at byte {exc.start} of the line") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{url}: row {row}: invalid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise CorpusError(f"{url}: row {row}: expected a JSON object, got {type(value).__name__}")
        rows.append(value)
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise CorpusError(
            f"{url}: rows {first_row}-{first_row + len(rows) - 1}: inconsistent types ({exc})"
        ) from None


def read_shard(shard: Shard, columns: Sequence[str] | None, storage_options: dict | None) -> pa.Table:
    """The shard's rows (only the given columns, when given); transient storage errors are retried."""
    fs, path = filesystem(shard.url, storage_options)
    table = with_retries(lambda: read_rows(fs, path, shard, columns), what=shard.url)
    if table.num_rows != shard.rows:
        raise CorpusError(
            f"{shard.url}: expected {shard.rows} rows from row {shard.row_start}, read {table.num_rows} "
            "(the file changed since the job was planned?)"
        )
    if columns is not None:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise CorpusError(
                f"{shard.url}: missing column(s) {', '.join(missing)}; has {', '.join(table.column_names)}"
            )
        table = table.select(list(columns))
    return table


def is_corruption(exc: BaseException) -> bool:
    """pyarrow's own decoding errors (as opposed to the network's), which no retry can fix."""
    if isinstance(exc, pa.ArrowInvalid | EOFError):
        return True
    text = str(exc).lower()
    words = ("parquet", "thrift", "ipc", "arrow", "magic", "corrupt", "compressed", "invalid", "deserializ")
    return type(exc) is OSError and any(w in text for w in words)


def read_rows(fs, path: str, shard: Shard, columns: Sequence[str] | None) -> pa.Table:
    try:
        if shard.format == "jsonl":
            data = fs.cat_file(path, start=shard.byte_start, end=shard.byte_end)
            return parse_jsonl(data, shard.url, shard.row_start)
        with fs.open(path, "rb") as handle:
            if shard.format == "parquet":
                return read_parquet_rows(handle, shard, columns)
            return read_arrow_rows(handle, shard)
    except Exception as exc:
        if is_corruption(exc):
            where = f"rows {shard.row_start}-{shard.row_end - 1}"
            raise CorpusError(f"{shard.url}: {where}: unreadable or corrupt ({exc})") from None
        raise


def read_parquet_rows(handle, shard: Shard, columns: Sequence[str] | None) -> pa.Table:
    """Only the row groups that overlap the shard are read."""
    parquet = pq.ParquetFile(handle)
    meta = parquet.metadata
    groups, first_row, position = [], 0, 0
    for i in range(meta.num_row_groups):
        rows = meta.row_group(i).num_rows
        if position + rows > shard.row_start and position < shard.row_end:
            first_row = position if not groups else first_row
            groups.append(i)
        position += rows
    present = [c for c in columns if c in parquet.schema_arrow.names] if columns is not None else None
    table = parquet.read_row_groups(groups, columns=present)
    return table.slice(shard.row_start - first_row, shard.rows)


def read_arrow_rows(handle, shard: Shard) -> pa.Table:
    data = handle.read()
    try:
        table = ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid:
        table = ipc.open_stream(pa.BufferReader(data)).read_all()
    return table.slice(shard.row_start, shard.rows)


def ids_of(table: pa.Table, shard: Shard, id_column: str | None) -> pa.Array:
    """The shard's ids: the id column cast to int64 or string, or generated from file and row."""
    if id_column is None:
        rows = range(shard.row_start, shard.row_end)
        return pa.array([f"{shard.id_prefix}:{r}" for r in rows], pa.string())
    ids = table.column(id_column).combine_chunks()
    if ids.null_count:
        row = shard.row_start + pc.index(pc.is_null(ids), True).as_py()
        raise CorpusError(f"{shard.url}: row {row}: null id in column {id_column!r}")
    if pa.types.is_integer(ids.type):
        return ids.cast(pa.int64())
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        return ids.cast(pa.string())
    raise CorpusError(
        f"{shard.url}: id column {id_column!r} has type {ids.type}; expected integers or strings"
    )
