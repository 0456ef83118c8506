"""The reembed job: keep a versioned store of a corpus's embeddings current, embedding only what changed.

Layout under the store URL (``--output``)::

    v00001/ v00002/ ...     complete embed datasets (parts: id, embedding, kept columns, content_hash;
                            _parts/ receipts, _manifest.json, _SUCCESS), never modified once complete
    _LATEST                 {"version": "v00002", ...}: committed atomically, last; readers start here
    _LOCK                   the running job's claim on the store, created exclusively
    _staging/v00003/        the run in progress: delta/ (new + changed rows) and embedded/ (embed job)

A run, holding ``_LOCK`` throughout: hash every row's prompt and text by id on the driver
(``content_hash`` = sha256 of prompt, NUL, text); diff with the (id, content_hash) columns of the
version ``_LATEST`` names; embed only new and changed rows with the embed job (into staging, so a crashed
run resumes its committed shards); write the next version from the old parts filtered to unchanged ids
(their vectors copied bit for bit) plus the embedded delta, every part with its receipt, then the
manifest and ``_SUCCESS``; then ``_LATEST``; then drop staging and prune. A changed model fingerprint
(which covers truncate_dim), prompt, precision, dtype or id type re-embeds everything; an unchanged
corpus writes no version. Kept columns always come from the current corpus.

Ids must come from a column: generated file:row ids would change meaning whenever a file is edited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import corpus
from pipeline.io.corpus import CorpusError, Shard
from pipeline.io.dataset import (
    MANIFEST_FILE,
    PLAN_FILE,
    SUCCESS_FILE,
    DatasetError,
    dataset_metadata,
    embeddings_of,
    finalize,
    join,
    quantize,
    read_json_file,
    write_part,
)
from pipeline.io.storage import (
    commit_bytes,
    create_exclusive,
    filesystem,
    parse_storage_options,
    redact,
    with_retries,
    write_json_atomic,
)
from pipeline.spec import EmbedSpec, ReembedSpec, SpecError

LATEST_FILE = "_LATEST"
LOCK_FILE = "_LOCK"
STAGING_DIR = "_staging"
HASH_COLUMN = "content_hash"
VERSION_NAME = re.compile(r"^v(\d{5,})$")
# Options that change the vectors: a snapshot made with other values is not reused, only replaced.
VECTOR_OPTIONS = ("fingerprint", "prompt", "precision", "dtype", "id_type")

Log = Callable[[str], None]


class ReembedError(RuntimeError):
    """The run cannot go on; the message names the store (and version or lock) and what to do."""


class LockHeld(ReembedError):
    """Another run holds the store's ``_LOCK`` (or a crashed one left it)."""


def version_name(number: int) -> str:
    return f"v{number:05d}"


def version_number(name: str) -> int | None:
    match = VERSION_NAME.match(name)
    return int(match.group(1)) if match else None


def content_hash(prompt: str, text: str) -> str:
    """What a vector depends on besides the model and options; the NUL keeps prompt and text apart."""
    return hashlib.sha256(prompt.encode() + b"\0" + text.encode()).hexdigest()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- the store ------------------------------------------------------------------------------------


@dataclass
class Store:
    """The snapshot store: URL, filesystem and the few files that coordinate runs."""

    url: str
    storage_options: dict

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.fs, self.path = filesystem(self.url, self.storage_options)
        self.path = self.path.rstrip("/")

    def url_of(self, *names: str) -> str:
        return "/".join([self.url, *names])

    def path_of(self, *names: str) -> str:
        return "/".join([self.path, *names])

    def exists(self, *names: str) -> bool:
        target = self.path_of(*names)
        return bool(with_retries(lambda: self.fs.exists(target), what=self.url_of(*names)))

    def read_bytes(self, *names: str) -> bytes | None:
        target = self.path_of(*names)
        try:
            return with_retries(lambda: self.fs.cat_file(target), what=self.url_of(*names))
        except FileNotFoundError:
            return None

    def remove(self, *names: str) -> None:
        """Remove a file or folder; a version loses its _SUCCESS first, so a half-removed one reads as
        incomplete rather than as a dataset with missing parts."""
        target = self.path_of(*names)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.isdir(target):
                if self.exists(*names, SUCCESS_FILE):
                    self.fs.rm_file(self.path_of(*names, SUCCESS_FILE))
                self.fs.rm(target, recursive=True)
            else:
                self.fs.rm_file(target)

    def versions(self) -> dict[str, bool]:
        """Every version folder in the store -> whether it is complete (has _SUCCESS)."""
        self.fs.invalidate_cache(self.path)
        try:
            entries = with_retries(lambda: self.fs.ls(self.path, detail=True), what=self.url)
        except FileNotFoundError:
            return {}
        found = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory" and version_number(name) is not None:
                found[name] = self.exists(name, SUCCESS_FILE)
        return dict(sorted(found.items(), key=lambda item: version_number(item[0]) or 0))

    def latest(self) -> str | None:
        """The version _LATEST names (JSON, or a bare name written by hand for a rollback), checked complete."""
        data = self.read_bytes(LATEST_FILE)
        if data is None:
            if self.exists(SUCCESS_FILE) or self.exists(PLAN_FILE):
                raise ReembedError(f"{self.url}: holds a plain embed output, not a reembed store (no {LATEST_FILE}); "
                                   "choose an empty --output for the store")
            return None
        text = data.decode("utf-8", "replace").strip()
        try:
            parsed = json.loads(text)
            name = parsed.get("version") if isinstance(parsed, dict) else parsed
        except json.JSONDecodeError:
            name = text
        if not isinstance(name, str) or version_number(name) is None:
            raise ReembedError(f"{self.url_of(LATEST_FILE)}: does not name a version like v00001 ({text[:80]!r})")
        if not self.exists(name, SUCCESS_FILE):
            raise ReembedError(f"{self.url_of(LATEST_FILE)}: names {name}, which is not a complete version "
                               f"(no {self.url_of(name, SUCCESS_FILE)})")
        return name

    def write_latest(self, name: str, info: dict) -> None:
        target = self.path_of(LATEST_FILE)
        with_retries(lambda: write_json_atomic(self.fs, target, {"version": name, **info}),
                     what=self.url_of(LATEST_FILE))


def latest_version_url(store_url: str, storage_options: dict | None = None) -> str:
    """The URL of the version a store's _LATEST names: what dedup, mine or a reader should take as input."""
    store = Store(store_url, dict(storage_options or {}))
    name = store.latest()
    if name is None:
        raise ReembedError(f"{store.url}: no {LATEST_FILE}; no reembed run has finished here")
    return store.url_of(name)


# -- the lock -------------------------------------------------------------------------------------


def describe_lock(holder: dict | None) -> str:
    if not holder:
        return "its holder is unknown (the lock file is empty or unreadable)"
    text = (f"held by run {holder.get('run', '?')} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')}) "
            f"since {holder.get('started', '?')}")
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            text += "; that process is gone, so the lock is stale"
        except OSError:
            pass
    return text


def read_lock(store: Store) -> dict | None:
    data = store.read_bytes(LOCK_FILE)
    if data is None:
        return None
    try:
        holder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def store_lock(store: Store, break_lock: bool, log: Log) -> Iterator[dict]:
    """Hold ``_LOCK`` for the run: created exclusively (one of two concurrent runs wins), removed at the
    end only if it is still ours. A run that dies leaves it behind on purpose: nothing can tell a crashed
    run from a slow one, so the operator clears it (``--break-lock``)."""
    token = {"run": uuid.uuid4().hex[:16], "host": socket.gethostname(), "pid": os.getpid(), "started": now()}
    lock_url = store.url_of(LOCK_FILE)
    if break_lock:
        holder = read_lock(store)
        if holder is not None:
            log(f"--break-lock: removing {lock_url} ({describe_lock(holder)})")
            store.remove(LOCK_FILE)
    data = json.dumps(token).encode()
    try:
        created = with_retries(lambda: create_exclusive(store.fs, store.path_of(LOCK_FILE), data), what=lock_url)
    except Exception as exc:
        raise ReembedError(redact(f"{lock_url}: cannot create the lock ({type(exc).__name__}: {exc})")) from None
    if not created:
        holder = read_lock(store)
        if not (holder and holder.get("run") == token["run"]):  # our own write, seen again after a retry
            raise LockHeld(
                f"{lock_url} exists: {describe_lock(holder)}. Another reembed is writing this store, or a crashed "
                f"run left the lock. If no run is active, re-run with --break-lock (break_lock: true in a spec) "
                f"or delete {lock_url}."
            )
    try:
        yield token
    finally:
        holder = read_lock(store)
        if holder and holder.get("run") == token["run"]:
            store.remove(LOCK_FILE)
        else:
            log(f"warning: {lock_url} was taken over by another run ({describe_lock(holder)}); left in place")


# -- the corpus, hashed ---------------------------------------------------------------------------


@dataclass
class CorpusIndex:
    """Every current row: id, content_hash, where it is (shard, file row) and its kept columns."""

    table: pa.Table
    skipped_rows: int
    keep_digest: str | None


def index_corpus(shards: list[Shard], columns, prompt: str, on_null: str, storage_options: dict) -> CorpusIndex:
    """One read of the text, id and kept columns: a row's hash, place and kept values; texts are dropped.
    Every id must occur once (the error names both rows)."""
    from pipeline.tasks.embed import texts_of

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
        parts.append(pa.table({
            "id": ids, HASH_COLUMN: pa.array([content_hash(prompt, t) for t in texts], pa.string()),
            "__shard": pa.array(np.full(len(rows), number, dtype=np.int32)), "__row": pa.array(rows),
            **{f"keep:{name}": array for name, array in kept.items()},
        }))
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

    raise CorpusError(f"{where(second)}: duplicate id {value!r} (first at {where(first)}); reembed matches "
                      "rows by id, so every id must occur once")


def id_type_of(schemas: dict[str, pa.Schema], id_column: str) -> str:
    """How corpus.ids_of will type the ids: int64 or string."""
    kind = next(iter(schemas.values())).field(id_column).type
    return "int64" if pa.types.is_integer(kind) else "string"


# -- the previous version -------------------------------------------------------------------------


@dataclass
class Snapshot:
    """One complete version: its manifest and the (id, content_hash) of every row, part by part."""

    store: Store
    name: str
    manifest: dict

    @property
    def url(self) -> str:
        return self.store.url_of(self.name)

    @property
    def options(self) -> dict:
        return (self.manifest.get("reembed") or {}).get("options") or {}

    @property
    def parts(self) -> list[dict]:
        return self.manifest.get("parts") or []

    def index(self) -> pa.Table:
        """id, content_hash, part number and row within the part, for every row (no vectors read)."""
        return part_index(self.url, self.parts, ["id", HASH_COLUMN], self.store.storage_options)


def part_index(root: str, parts: list[dict], columns: list[str], storage_options: dict) -> pa.Table:
    """The given columns of every part (Parquet projection), with "__part" (its position in the manifest)
    and "__row" (within the part), so later steps can find each row's vector without a lookup per part."""
    fs, path = filesystem(root, storage_options)
    tables = []
    for number, part in enumerate(parts):
        target = join(path, part["part"])

        def read(target: str = target) -> pa.Table:
            with fs.open(target, "rb") as handle:
                return pq.read_table(handle, columns=columns)

        table = with_retries(read, what=join(root, part["part"]))
        tables.append(table.append_column("__part", pa.array(np.full(table.num_rows, number, np.int32)))
                      .append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64))))
    if not tables:
        raise DatasetError(f"{root}: the dataset has no parts")
    return pa.concat_tables(tables).combine_chunks()


def read_part(root: str, part: dict, storage_options: dict) -> pa.Table:
    """A whole part, checked against the sha256 its manifest recorded."""
    fs, path = filesystem(root, storage_options)
    data = with_retries(lambda: fs.cat_file(join(path, part["part"])), what=join(root, part["part"]))
    if hashlib.sha256(data).hexdigest() != part["sha256"]:
        raise DatasetError(f"{join(root, part['part'])}: checksum does not match the manifest")
    return pq.read_table(pa.BufferReader(data))


def load_snapshot(store: Store, name: str) -> Snapshot:
    manifest = read_json_file(store.url_of(name), MANIFEST_FILE, store.storage_options)
    if manifest is None:
        raise ReembedError(f"{store.url_of(name)}: no {MANIFEST_FILE}")
    return Snapshot(store, name, manifest)


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
        empty = pa.table({"id": current.column("id").slice(0, 0), "__part": pa.array([], pa.int32()),
                          "__row": pa.array([], pa.int64()), "__cur": pa.array([], pa.int32())})
        return Diff(pa.array(np.ones(rows, bool)), pa.array(np.zeros(rows, bool)), empty, 0)
    current_ids = current.column("id").combine_chunks()
    old_to_current = pc.index_in(old.column("id"), value_set=current_ids)
    present = pc.is_valid(old_to_current)
    same = pc.and_(present, pc.equal(old.column(HASH_COLUMN),
                                     pc.take(current.column(HASH_COLUMN), old_to_current)))
    same = pc.fill_null(same, False)
    carried = old.append_column("__cur", old_to_current).filter(same)
    in_old = pc.is_in(current_ids, value_set=old.column("id").combine_chunks())
    unchanged = np.zeros(rows, bool)
    unchanged[carried.column("__cur").to_numpy()] = True
    new = pc.invert(in_old)
    changed = pc.and_(in_old, pa.array(~unchanged))
    deleted = old.num_rows - (pc.sum(present).as_py() or 0)
    return Diff(new, changed, carried, deleted)


# -- staging: the delta corpus and its embedding --------------------------------------------------


def write_delta(store: Store, stage: str, shards: list[Shard], columns, index: CorpusIndex, delta: pa.Array,
                on_null: str, rows_per_file: int) -> str:
    """Copy the new and changed rows (id and text) into ``_staging/<version>/delta/``, reading again only
    the shards that hold any. The same delta gives byte-identical files, so a re-run after a crash meets
    the same embed plan and resumes its committed shards. Returns the folder's URL."""
    from pipeline.tasks.embed import texts_of

    chosen = index.table.select(["id", "__shard"]).filter(delta)
    store.remove(STAGING_DIR, stage, "delta")
    buffer: list[pa.Table] = []
    files = 0

    def flush(final: bool = False) -> None:
        nonlocal buffer, files
        while buffer and (final or sum(t.num_rows for t in buffer) >= rows_per_file):
            table = pa.concat_tables(buffer).combine_chunks()
            piece, rest = table.slice(0, rows_per_file), table.slice(rows_per_file)
            sink = pa.BufferOutputStream()
            pq.write_table(piece, sink, row_group_size=rows_per_file, compression="zstd")
            data = sink.getvalue().to_pybytes()
            name = f"delta-{files:05d}.parquet"
            target = store.path_of(STAGING_DIR, stage, "delta", name)
            with_retries(lambda target=target, data=data: commit_bytes(store.fs, target, data),
                         what=store.url_of(STAGING_DIR, stage, "delta", name))
            files += 1
            buffer = [rest] if rest.num_rows else []

    shard_of_row = chosen.column("__shard").to_numpy()
    for number in np.unique(shard_of_row):
        shard = shards[int(number)]
        wanted = chosen.column("id").filter(pa.array(shard_of_row == number)).combine_chunks()
        table = corpus.read_shard(shard, [columns.text, columns.id], store.storage_options)
        ids = corpus.ids_of(table, shard, columns.id)
        texts, keep = texts_of(table, shard, columns.text, on_null)
        if not keep.all():
            ids = pc.filter(ids, pa.array(keep))
        picked = pa.table({columns.id: ids, columns.text: pa.array(texts, pa.string())})
        buffer.append(picked.filter(pc.is_in(ids, value_set=wanted)))
        flush()
    flush(final=True)
    return store.url_of(STAGING_DIR, stage, "delta")


def staging_spec(spec: ReembedSpec, inputs: list[str], output: str, columns, precision: str,
                 on_null: str) -> EmbedSpec:
    """The embed job's spec for this run: the reembed options it shares, ids from the resolved column,
    no kept columns (those come from the corpus index), and overwrite so a different delta replaces
    a crashed run's leftovers while an identical one resumes."""
    shared = {f.name: getattr(spec, f.name) for f in dataclasses.fields(EmbedSpec) if hasattr(spec, f.name)}
    shared.update(input=inputs, output=output, id_column=columns.id, text_column=columns.text, keep_columns=[],
                  precision=precision, on_null=on_null, on_duplicate_id="keep", overwrite=True)
    return EmbedSpec(**shared)


# -- the next version -----------------------------------------------------------------------------


class PartWriter:
    """Buffers rows and commits parts of ``rows_per_part`` rows (each with its receipt) into one folder,
    so a store's parts stay the size of an embed job's however many runs carried them."""

    def __init__(self, root: str, storage_options: dict, metadata: dict, rows_per_part: int) -> None:
        self.root, self.storage_options, self.metadata = root, storage_options, metadata
        self.rows_per_part = rows_per_part
        self.schema: pa.Schema | None = None
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts = 0

    def add(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_part:
            self.write(self.rows_per_part)

    def close(self) -> int:
        if self.buffered:
            self.write(self.buffered)
        return self.parts

    def write(self, rows: int) -> None:
        table = pa.concat_tables(self.buffer).combine_chunks()
        piece, rest = table.slice(0, rows), table.slice(rows)
        write_part(self.root, self.storage_options, self.parts, piece, self.metadata)
        self.parts += 1
        self.buffer, self.buffered = ([rest], rest.num_rows) if rest.num_rows else ([], 0)


def output_rows(index: pa.Table, current: pa.Array, embeddings: pa.Array, keep: tuple[str, ...]) -> pa.Table:
    """A part's rows: id, kept columns and hash from the current corpus; the vectors as given."""
    columns = {"id": index.column("id").take(current), "embedding": embeddings}
    for name in keep:
        columns[name] = index.column(f"keep:{name}").take(current)
    columns[HASH_COLUMN] = index.column(HASH_COLUMN).take(current)
    return pa.table(columns)


def groups_by_part(table: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """(part number, its rows) for an index table sorted by part."""
    parts = table.column("__part").to_numpy()
    bounds = [0, *(np.flatnonzero(np.diff(parts)) + 1).tolist(), len(parts)]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            yield int(parts[start]), table.slice(start, end - start)


def staged_rows(store: Store, staging: str, index: CorpusIndex, expected: pa.Array) -> pa.Table:
    """The embedded rows' places in staging and in the current corpus; every expected row exactly once
    (else the corpus changed under the run, and nothing is written)."""
    manifest = read_json_file(staging, MANIFEST_FILE, store.storage_options) or {}
    staged = part_index(staging, manifest.get("parts") or [], ["id"], store.storage_options)
    current = pc.index_in(staged.column("id"), value_set=index.table.column("id").combine_chunks())
    wanted = int(pc.sum(expected).as_py() or 0)
    found = current.drop_null()
    if (current.null_count or len(found) != wanted or pc.count_distinct(found).as_py() != wanted
            or not pc.all(pc.take(expected, found)).as_py()):
        raise ReembedError(f"{staging}: the embedded rows do not match the {wanted} rows planned; the corpus "
                           "changed during the run: run again")
    return staged.append_column("__cur", current)


def assemble(store: Store, name: str, index: CorpusIndex, carried: pa.Table, old: Snapshot | None,
             staging: str | None, staged: pa.Table | None, metadata: dict, spec: ReembedSpec,
             columns, calibration: dict | None) -> int:
    """Write version ``name``: carried rows (old vectors, bit for bit), then the embedded ones."""
    root = store.url_of(name)
    store.remove(name)  # what a crashed attempt at this version left
    writer = PartWriter(root, store.storage_options, metadata, spec.rows_per_shard)
    if old is not None:
        for part, rows in groups_by_part(carried):
            table = read_part(old.url, old.parts[part], store.storage_options)
            vectors = table.column("embedding").combine_chunks().take(rows.column("__row"))
            writer.add(output_rows(index.table, rows.column("__cur"), vectors, columns.keep))
    if staging is not None and staged is not None:
        parts = (read_json_file(staging, MANIFEST_FILE, store.storage_options) or {}).get("parts") or []
        for part, rows in groups_by_part(staged):
            table = read_part(staging, parts[part], store.storage_options)
            vectors = table.column("embedding").combine_chunks().take(rows.column("__row"))
            if calibration is not None:  # a delta embedded as float32, quantized with the store's int8 ranges
                vectors = quantize(embeddings_of(pa.table({"embedding": vectors})), "int8", calibration)
            writer.add(output_rows(index.table, rows.column("__cur"), vectors, columns.keep))
    return writer.close()


# -- housekeeping ---------------------------------------------------------------------------------


def clean_leftovers(store: Store, latest: str | None, log: Log) -> str:
    """Under the lock: drop incomplete versions (crashed runs) and other runs' staging; name the next version.
    The next version's own staging stays, so its embed job can resume."""
    versions = store.versions()
    for name, complete in versions.items():
        if not complete and name != latest:
            log(f"removing the incomplete version {store.url_of(name)} (left by a crashed run)")
            store.remove(name)
    numbers = [version_number(n) or 0 for n, complete in versions.items() if complete]
    numbers.append(version_number(latest) or 0 if latest else 0)
    following = version_name(max(numbers) + 1)
    if store.exists(STAGING_DIR):
        for entry in with_retries(lambda: store.fs.ls(store.path_of(STAGING_DIR), detail=False),
                                  what=store.url_of(STAGING_DIR)):
            stage = entry.rstrip("/").rsplit("/", 1)[-1]
            if stage != following:
                store.remove(STAGING_DIR, stage)
    return following


def prune(store: Store, keep: int | None, latest: str, log: Log) -> list[str]:
    """Keep the version _LATEST names and the newest ``keep - 1`` others; remove the rest."""
    if keep is None:
        return []
    others = [name for name in store.versions() if name != latest]
    kept = set(others[len(others) - (keep - 1):]) if keep > 1 else set()
    pruned = [name for name in others if name not in kept]
    for name in pruned:
        log(f"pruning {store.url_of(name)}")
        store.remove(name)
    return pruned


# -- the job --------------------------------------------------------------------------------------


def run_reembed(spec: ReembedSpec, log: Log | None = None) -> dict:
    """Bring the store up to date with the corpus; returns the summary (also in the new version's manifest)."""
    from pipeline.model.config import choose_prompt
    from pipeline.model.files import fingerprint, local_model_dir
    from pipeline.model.modules import check_model
    from pipeline.tasks.embed import resolve_columns, run_embed, versions

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    store = Store(spec.output, storage_options)

    # Model, prompt and columns are checked before the lock is taken or anything is read in bulk.
    model_dir = local_model_dir(spec.model, storage_options)
    model_config = check_model(model_dir, spec.allow_pickle)
    model_fingerprint = fingerprint(model_dir, {"truncate_dim": spec.truncate_dim})
    prompt = choose_prompt(model_config, spec.prompt_name, spec.prompt)
    sources = corpus.list_sources(spec.input, storage_options)
    schemas = {s.url: corpus.source_schema(s, storage_options) for s in sources}
    columns = resolve_columns(spec, schemas)
    if columns.id is None:
        raise SpecError(f"id_column: reembed matches rows by id, and {', '.join(spec.input)} has no 'id' column; "
                        "name the column holding stable ids with --id-column (id_column in a spec)")
    options = {"fingerprint": model_fingerprint, "prompt": prompt, "precision": spec.precision,
               "dtype": spec.dtype, "id_type": id_type_of(schemas, columns.id)}

    with store_lock(store, spec.break_lock, log):
        latest = store.latest()
        old = load_snapshot(store, latest) if latest else None
        following = clean_leftovers(store, latest, log)
        reasons = [] if old else ["no earlier version"]
        if old:
            reasons += [f"{key} changed ({short(old.options.get(key))} -> {short(options[key])})"
                        for key in VECTOR_OPTIONS if old.options.get(key) != options[key]]
        full = bool(reasons)

        shards = corpus.plan_shards(sources, spec.rows_per_shard, storage_options)
        index = index_corpus(shards, columns, prompt, spec.on_null, storage_options)
        if index.table.num_rows == 0:
            raise CorpusError(f"{', '.join(spec.input)}: the corpus has no rows")
        comparable = old is not None and old.options.get("id_type") == options["id_type"]
        old_index = old.index() if comparable else None
        changes = diff(index.table, old_index)
        if old is not None and not comparable:
            changes.deleted = int(old.manifest.get("rows") or 0)
        counts = changes.counts
        old_digest = (old.manifest.get("reembed") or {}).get("keep_digest") if old else None
        kept_changed = old is not None and index.keep_digest != old_digest
        log(f"{index.table.num_rows} rows: {counts['new']} new, {counts['changed']} changed, "
            f"{counts['unchanged']} unchanged, {counts['deleted']} deleted"
            + (f"; full re-embed: {'; '.join(reasons)}" if full else ""))

        summary: dict = {
            "store": redact(store.url), "version": latest, "written": False, "previous": latest,
            "full": full, "reason": "; ".join(reasons) or None, "rows": index.table.num_rows, **counts,
            "embedded": 0, "skipped_rows": index.skipped_rows, "kept_columns_changed": kept_changed,
        }
        if not full and not (counts["new"] or counts["changed"] or counts["deleted"] or kept_changed):
            log(f"the corpus is unchanged since {latest}; no new version")
            summary["pruned"] = prune(store, spec.keep, latest, log)
            summary["seconds"] = round(time.perf_counter() - started, 2)
            return summary

        # Embed what must be (everything, or the delta), into staging.
        staging = store.url_of(STAGING_DIR, following, "embedded")
        embedded = pa.array(np.ones(index.table.num_rows, bool)) if full else changes.delta
        calibration = None
        embed_summary = None
        staged = None
        if pc.any(embedded).as_py():
            if full:
                inputs = list(spec.input)
                precision, on_null = spec.precision, "empty" if spec.on_null == "fail" else spec.on_null
            else:
                inputs = [write_delta(store, following, shards, columns, index, embedded, spec.on_null,
                                      spec.rows_per_shard)]
                precision, on_null = spec.precision, "empty"
                if spec.precision == "int8":  # new rows must use the store's ranges, not their own
                    precision = "float32"
                    calibration = dataset_metadata(old.url, storage_options).get("int8_calibration")
                    if calibration is None:
                        raise ReembedError(f"{old.url}: an int8 version without int8_calibration metadata")
            embed_summary = run_embed(staging_spec(spec, inputs, staging, columns, precision, on_null), log=log)
            staged = staged_rows(store, staging, index, embedded)
            metadata = dataset_metadata(staging, storage_options)
            if metadata.get("fingerprint") != model_fingerprint or (metadata.get("prompt") or "") != prompt:
                raise ReembedError(f"{staging}: embedded with another model or prompt than planned "
                                   "(did the model change during the run?); run again")
            if calibration is not None:
                metadata.update(precision="int8", int8_calibration=calibration)
        else:
            metadata = dataset_metadata(old.url, storage_options)
        metadata["snapshot"] = following

        summary.update(version=following, written=True, embedded=int(pc.sum(embedded).as_py() or 0))
        if embed_summary:
            summary["embed"] = {k: embed_summary.get(k) for k in
                                ("rows", "tokens", "seconds", "shards", "workers", "rows_per_second")}
        parts = assemble(store, following, index, changes.carried, None if full else old,
                         staging if staged is not None else None, staged, metadata, spec, columns, calibration)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        manifest = {
            "metadata": metadata, "summary": summary, "versions": versions(),
            "input": [redact(u) for u in spec.input],
            "reembed": {"version": following, "previous": latest, "options": options,
                        "keep_columns": list(columns.keep), "keep_digest": index.keep_digest,
                        "hash": "sha256(prompt + NUL + text)"},
        }
        finalize(store.url_of(following), storage_options, list(range(parts)), manifest)
        store.write_latest(following, {"previous": latest, "rows": index.table.num_rows, "created": now()})
        log(f"{store.url_of(following)}: {index.table.num_rows} rows in {parts} part(s); {LATEST_FILE} updated")
        store.remove(STAGING_DIR)
        summary["pruned"] = prune(store, spec.keep, following, log)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        return summary


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
