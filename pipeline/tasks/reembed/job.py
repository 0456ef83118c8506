"""The reembed job: keep a versioned store of a corpus's embeddings current, embedding only what changed.

Layout under the store URL (``--output``)::

    v00001/ v00002/ ...     complete embed datasets (parts: id, embedding, kept columns, content_hash;
                            .embedpipe/: receipts, manifest, SUCCESS), never modified once complete
    _LATEST                 {"version": "v00002", ...}: committed atomically, last; readers start here
    _LOCK                   the running job's claim on the store, created exclusively
    _staging/v00003/        the run in progress: delta/ (new + changed rows) and embedded/ (embed job)

A run, holding ``_LOCK`` throughout: hash every row's prompt and text by id on the driver
(``content_hash`` = sha256 of prompt, NUL, text); diff with the (id, content_hash) columns of the
version ``_LATEST`` names; embed only new and changed rows with the embed job (into staging, so a crashed
run resumes its committed shards); write the next version from the old parts filtered to unchanged ids
(their vectors copied bit for bit) plus the embedded delta, every part with its receipt, then the
manifest and ``.embedpipe/SUCCESS``; then ``_LATEST``; then drop staging and prune. A changed model fingerprint
(which covers truncate_dim), prompt, precision, dtype or id type re-embeds everything; an unchanged
corpus writes no version. Kept columns always come from the current corpus.

Ids must come from a column: generated file:row ids would change meaning whenever a file is edited.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import corpus
from pipeline.io.corpus import CorpusError, Shard
from pipeline.io.dataset import dataset_metadata, embeddings_of, quantize, write_embedding_part
from pipeline.io.output import MANIFEST_FILE, OutputFolder, parquet_bytes
from pipeline.io.rows import resolve_columns, texts_of
from pipeline.io.storage import parse_storage_options, redact
from pipeline.io.versioned_store import (
    LATEST_FILE,
    STAGING_DIR,
    Log,
    Snapshot,
    Store,
    StoreError,
    clean_leftovers,
    load_snapshot,
    now,
    part_index,
    prune,
    store_lock,
)
from pipeline.spec import EmbedSpec, ReembedSpec, SpecError
from pipeline.tasks.reembed.diff import HASH_COLUMN, CorpusIndex, diff, id_type_of, index_corpus

# Options that change the vectors: a snapshot made with other values is not reused, only replaced.
VECTOR_OPTIONS = ("fingerprint", "prompt", "role", "precision", "dtype", "id_type")


class ReembedError(StoreError):
    """The run cannot go on; the message names the store (and version) and what to do."""


# -- staging: the delta corpus and its embedding --------------------------------------------------


def write_delta(
    store: Store,
    stage: str,
    shards: list[Shard],
    columns,
    index: CorpusIndex,
    delta: pa.Array,
    on_null: str,
    rows_per_file: int,
) -> str:
    """Copy the new and changed rows (id and text) into ``_staging/<version>/delta/``, reading again only
    the shards that hold any. The same delta gives byte-identical files, so a re-run after a crash meets
    the same embed plan and resumes its committed shards. Returns the folder's URL."""
    chosen = index.table.select(["id", "__shard"]).filter(delta)
    store.remove(STAGING_DIR, stage, "delta")
    buffer: list[pa.Table] = []
    files = 0

    def flush(final: bool = False) -> None:
        nonlocal buffer, files
        while buffer and (final or sum(t.num_rows for t in buffer) >= rows_per_file):
            table = pa.concat_tables(buffer).combine_chunks()
            piece, rest = table.slice(0, rows_per_file), table.slice(rows_per_file)
            name = f"{STAGING_DIR}/{stage}/delta/delta-{files:05d}.parquet"
            store.write_bytes(name, parquet_bytes(piece, row_group_size=rows_per_file))
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


def staging_spec(
    spec: ReembedSpec, inputs: list[str], output: str, columns, precision: str, on_null: str
) -> EmbedSpec:
    """The embed job's spec for this run: the reembed options it shares, ids from the resolved column,
    no kept columns (those come from the corpus index), and overwrite so a different delta replaces
    a crashed run's leftovers while an identical one resumes."""
    shared = {f.name: getattr(spec, f.name) for f in dataclasses.fields(EmbedSpec) if hasattr(spec, f.name)}
    shared.update(
        input=inputs,
        output=output,
        id_column=columns.id,
        text_column=columns.text,
        keep_columns=[],
        precision=precision,
        on_null=on_null,
        on_duplicate_id="keep",
        overwrite=True,
    )
    return EmbedSpec(**shared)


# -- the next version -----------------------------------------------------------------------------


class PartWriter:
    """Buffers rows and commits parts of ``rows_per_part`` rows (each with its receipt) into one folder,
    so a store's parts stay the size of an embed job's however many runs carried them."""

    def __init__(self, folder: OutputFolder, metadata: dict, rows_per_part: int) -> None:
        self.folder, self.metadata = folder, metadata
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
        write_embedding_part(self.folder, self.parts, piece, self.metadata)
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
    manifest = OutputFolder(staging, store.storage_options).read_json(MANIFEST_FILE) or {}
    staged = part_index(staging, manifest.get("parts") or [], ["id"], store.storage_options)
    current = pc.index_in(staged.column("id"), value_set=index.table.column("id").combine_chunks())
    wanted = int(pc.sum(expected).as_py() or 0)
    found = current.drop_null()
    if (
        current.null_count
        or len(found) != wanted
        or pc.count_distinct(found).as_py() != wanted
        or not pc.all(pc.take(expected, found)).as_py()
    ):
        raise ReembedError(
            f"{staging}: the embedded rows do not match the {wanted} rows planned; the corpus "
            "changed during the run: run again"
        )
    return staged.append_column("__cur", current)


def assemble(
    store: Store,
    name: str,
    index: CorpusIndex,
    carried: pa.Table,
    old: Snapshot | None,
    staging: str | None,
    staged: pa.Table | None,
    metadata: dict,
    spec: ReembedSpec,
    columns,
    calibration: dict | None,
) -> int:
    """Write version ``name``: carried rows (old vectors, bit for bit), then the embedded ones."""
    store.remove(name)  # what a crashed attempt at this version left
    writer = PartWriter(store.child(name), metadata, spec.rows_per_shard)
    if old is not None:
        for part, rows in groups_by_part(carried):
            table = old.read_part(part)
            vectors = table.column("embedding").combine_chunks().take(rows.column("__row"))
            writer.add(output_rows(index.table, rows.column("__cur"), vectors, columns.keep))
    if staging is not None and staged is not None:
        staged_folder = OutputFolder(staging, store.storage_options)
        parts = (staged_folder.read_json(MANIFEST_FILE) or {}).get("parts") or []
        for part, rows in groups_by_part(staged):
            table = staged_folder.read_part(parts[part])
            vectors = table.column("embedding").combine_chunks().take(rows.column("__row"))
            if calibration is not None:  # a delta embedded as float32, quantized with the store's int8 ranges
                vectors = quantize(embeddings_of(pa.table({"embedding": vectors})), "int8", calibration)
            writer.add(output_rows(index.table, rows.column("__cur"), vectors, columns.keep))
    return writer.close()


# -- the job --------------------------------------------------------------------------------------


def run_reembed(spec: ReembedSpec, log: Log | None = None) -> dict:
    """Bring the store up to date with the corpus; returns the summary (also in the new version's manifest)."""
    from pipeline.model.config import resolve_role
    from pipeline.model.files import fingerprint, local_model_dir
    from pipeline.model.modules import check_model
    from pipeline.stages.embed import run_embed, versions

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    store = Store(spec.output, storage_options)

    # Model, prompt and columns are checked before the lock is taken or anything is read in bulk.
    model_dir = local_model_dir(spec.model, storage_options)
    model_config = check_model(model_dir, spec.allow_pickle)
    model_fingerprint = fingerprint(model_dir, {"truncate_dim": spec.truncate_dim})
    try:
        prompt = resolve_role(model_config, spec.role, spec.prompt_name, spec.prompt).prompt
    except ValueError as exc:
        raise ReembedError(str(exc)) from None
    sources = corpus.list_sources(spec.input, storage_options)
    schemas = {s.url: corpus.source_schema(s, storage_options) for s in sources}
    columns = resolve_columns(spec, schemas)
    if columns.id is None:
        raise SpecError(
            f"id_column: reembed matches rows by id, and {', '.join(spec.input)} has no 'id' column; "
            "name the column holding stable ids with --id-column (id_column in a spec)"
        )
    options = {
        "fingerprint": model_fingerprint,
        "prompt": prompt,
        "role": spec.role,
        "precision": spec.precision,
        "dtype": spec.dtype,
        "id_type": id_type_of(schemas, columns.id),
    }

    with store_lock(store, spec.break_lock, log):
        latest = store.latest()
        old = load_snapshot(store, latest) if latest else None
        following = clean_leftovers(store, latest, log)
        reasons = [] if old else ["no earlier version"]
        if old:
            reasons += [
                f"{key} changed ({short(old.options.get(key))} -> {short(options[key])})"
                for key in VECTOR_OPTIONS
                if old.options.get(key) != options[key]
            ]
        full = bool(reasons)

        shards = corpus.plan_shards(sources, spec.rows_per_shard, storage_options)
        index = index_corpus(shards, columns, prompt, spec.on_null, storage_options)
        if index.table.num_rows == 0:
            raise CorpusError(f"{', '.join(spec.input)}: the corpus has no rows")
        comparable = old is not None and old.options.get("id_type") == options["id_type"]
        old_index = old.index(["id", HASH_COLUMN]) if comparable else None
        changes = diff(index.table, old_index)
        if old is not None and not comparable:
            changes.deleted = int(old.manifest.get("rows") or 0)
        counts = changes.counts
        old_digest = (old.manifest.get("reembed") or {}).get("keep_digest") if old else None
        kept_changed = old is not None and index.keep_digest != old_digest
        log(
            f"{index.table.num_rows} rows: {counts['new']} new, {counts['changed']} changed, "
            f"{counts['unchanged']} unchanged, {counts['deleted']} deleted"
            + (f"; full re-embed: {'; '.join(reasons)}" if full else "")
        )

        summary: dict = {
            "store": redact(store.url),
            "version": latest,
            "written": False,
            "previous": latest,
            "full": full,
            "reason": "; ".join(reasons) or None,
            "rows": index.table.num_rows,
            **counts,
            "embedded": 0,
            "skipped_rows": index.skipped_rows,
            "kept_columns_changed": kept_changed,
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
                inputs = [
                    write_delta(
                        store, following, shards, columns, index, embedded, spec.on_null, spec.rows_per_shard
                    )
                ]
                precision, on_null = spec.precision, "empty"
                if spec.precision == "int8":  # new rows must use the store's ranges, not their own
                    precision = "float32"
                    calibration = dataset_metadata(old.url, storage_options).get("int8_calibration")
                    if calibration is None:
                        raise ReembedError(f"{old.url}: an int8 version without int8_calibration metadata")
            embed_summary = run_embed(
                staging_spec(spec, inputs, staging, columns, precision, on_null), log=log
            )
            staged = staged_rows(store, staging, index, embedded)
            metadata = dataset_metadata(staging, storage_options)
            if metadata.get("fingerprint") != model_fingerprint or (metadata.get("prompt") or "") != prompt:
                raise ReembedError(
                    f"{staging}: embedded with another model or prompt than planned "
                    "(did the model change during the run?); run again"
                )
            if calibration is not None:
                metadata.update(precision="int8", int8_calibration=calibration)
        else:
            metadata = dataset_metadata(old.url, storage_options)
        metadata["snapshot"] = following

        summary.update(version=following, written=True, embedded=int(pc.sum(embedded).as_py() or 0))
        if embed_summary:
            summary["embed"] = {
                k: embed_summary.get(k)
                for k in ("rows", "tokens", "seconds", "shards", "workers", "rows_per_second")
            }
        parts = assemble(
            store,
            following,
            index,
            changes.carried,
            None if full else old,
            staging if staged is not None else None,
            staged,
            metadata,
            spec,
            columns,
            calibration,
        )
        summary["seconds"] = round(time.perf_counter() - started, 2)
        manifest = {
            "metadata": metadata,
            "summary": summary,
            "versions": versions(),
            "input": [redact(u) for u in spec.input],
            "reembed": {
                "version": following,
                "previous": latest,
                "options": options,
                "keep_columns": list(columns.keep),
                "keep_digest": index.keep_digest,
                "hash": "sha256(prompt + NUL + text)",
            },
        }
        store.child(following).finish(manifest, expected={"": list(range(parts))})
        store.write_latest(following, {"previous": latest, "rows": index.table.num_rows, "created": now()})
        log(
            f"{store.url_of(following)}: {index.table.num_rows} rows in {parts} part(s); {LATEST_FILE} updated"
        )
        store.remove(STAGING_DIR)
        summary["pruned"] = prune(store, spec.keep, following, log)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        return summary


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
