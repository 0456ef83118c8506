"""Embedding datasets: parts, per-part receipts, plan, manifest and success marker.

Layout under the output URL (the parts are all a dataset reader sees; the rest is hidden)::

    part-00000.parquet ...              one per shard: id, embedding, kept columns; metadata "embedpipe"
    .embedpipe/receipts/part-00000.json receipt committed after its part: rows, bytes, sha256, timings
    .embedpipe/plan.json                the shards and the options that produced them (resume checks it)
    .embedpipe/manifest.json            every part, rows, bytes, checksums, timings, versions, summary
    .embedpipe/SUCCESS                  last: every planned part is there and matches the manifest

Parts and receipts are committed atomically, so a part without a receipt is simply redone on resume.
The lifecycle (claim, commit, finish) is `pipeline.io.output.OutputFolder`'s; this module knows what an
embedding part holds: precision, metadata, vectors for scoring.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.io.output import (
    MANIFEST_FILE,
    METADATA_KEY,
    PLAN_FILE,
    RECEIPTS_DIR,
    SUCCESS_FILE,
    DatasetError,
    OutputFolder,
    Receipt,
    parquet_bytes,
    part_name,
)
from pipeline.io.storage import redact

__all__ = ["MANIFEST_FILE", "PLAN_FILE", "RECEIPTS_DIR", "SUCCESS_FILE", "DatasetError"]

PRECISIONS = ("float32", "float16", "int8", "ubinary")
EMBEDDING_ROW_GROUP = 16384


# -- precision ----------------------------------------------------------------------------------


def calibrate_int8(sample: np.ndarray) -> dict:
    """Per-dimension ranges from a sample of the whole job (sentence-transformers' int8 scheme)."""
    low = sample.min(axis=0).astype(np.float64)
    high = sample.max(axis=0).astype(np.float64)
    steps = np.where(high > low, (high - low) / 255.0, 1.0)
    return {"starts": low.tolist(), "steps": steps.tolist()}


def quantize(vectors: np.ndarray, precision: str, calibration: dict | None = None) -> pa.Array:
    """The embedding column: fixed_size_list of float32 / float16 / int8 / packed-bit uint8."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if precision == "float32":
        values, width = pa.array(vectors.reshape(-1), pa.float32()), dim
    elif precision == "float16":
        values, width = pa.array(vectors.reshape(-1).astype(np.float16), pa.float16()), dim
    elif precision == "int8":
        if calibration is None:
            raise ValueError("int8 precision needs calibration ranges")
        starts = np.asarray(calibration["starts"], dtype=np.float64)
        steps = np.asarray(calibration["steps"], dtype=np.float64)
        scaled = np.clip(np.round((vectors - starts) / steps - 128.0), -128, 127).astype(np.int8)
        values, width = pa.array(scaled.reshape(-1), pa.int8()), dim
    elif precision == "ubinary":
        packed = np.packbits(vectors > 0, axis=1)
        values, width = pa.array(packed.reshape(-1), pa.uint8()), packed.shape[1]
    else:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return (
        pa.FixedSizeListArray.from_arrays(values, width) if n else pa.array([], pa.list_(values.type, width))
    )


def embeddings_of(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """The embedding column as a 2-D numpy array (its stored dtype)."""
    array = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(array.type):
        raise DatasetError(f"column {column!r} is {array.type}, expected a fixed_size_list")
    width = array.type.list_size
    if array.null_count:
        raise DatasetError(f"column {column!r} has null embeddings")
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), width)


# -- parts ----------------------------------------------------------------------------------------


def write_embedding_part(
    folder: OutputFolder, shard_id: int, table: pa.Table, metadata: dict, **details
) -> Receipt:
    """Commit one part of an embedding dataset (with its ``embedpipe`` metadata), then its receipt."""
    embedding = table.schema.field("embedding").type if "embedding" in table.column_names else None
    floats = embedding is not None and pa.types.is_float32(getattr(embedding, "value_type", embedding))
    data = parquet_bytes(
        table, metadata, row_group_size=EMBEDDING_ROW_GROUP, split_floats=("embedding",) if floats else ()
    )
    return folder.commit_part(part_name(shard_id), shard_id, data, rows=table.num_rows, **details)


# -- reading datasets back ----------------------------------------------------------------------


def complete_manifest(folder: OutputFolder) -> dict:
    """The manifest of a complete dataset (success marker present), or a DatasetError saying it is not one."""
    complete = folder.is_complete()
    manifest = folder.read_json(MANIFEST_FILE)
    if manifest is None or not complete:
        raise DatasetError(
            f"{redact(folder.url)}: not a complete embedpipe dataset (no {SUCCESS_FILE} / {MANIFEST_FILE})"
        )
    return manifest


def dataset_metadata(root: str, storage_options: dict | None) -> dict:
    """The ``embedpipe`` metadata of a complete dataset (from its first part)."""
    folder = OutputFolder(root, storage_options)
    parts = complete_manifest(folder).get("parts") or []
    if not parts:
        raise DatasetError(f"{redact(root)}: the dataset has no parts")
    meta = folder.read_schema(parts[0]["part"]).metadata or {}
    if METADATA_KEY not in meta:
        raise DatasetError(f"{redact(folder.url_of(parts[0]['part']))}: no 'embedpipe' metadata")
    return json.loads(meta[METADATA_KEY])


def iter_parts(root: str, storage_options: dict | None, columns: Iterable[str] | None = None):
    """(part name, table) for every part of a complete dataset, in part order, checksums verified."""
    folder = OutputFolder(root, storage_options)
    for part in complete_manifest(folder).get("parts", []):
        yield part["part"], folder.read_part(part, columns)


def read_dataset(
    root: str, storage_options: dict | None = None, columns: Iterable[str] | None = None
) -> pa.Table:
    tables = [table for _, table in iter_parts(root, storage_options, columns)]
    if not tables:
        raise DatasetError(f"{redact(root)}: the dataset has no parts")
    return pa.concat_tables(tables)


# -- vectors for scoring ------------------------------------------------------------------------


def float_vectors(table: pa.Table, metadata: dict, where: str) -> np.ndarray:
    """Embeddings as float32 for scoring: int8 is de-quantized; NaN, infinity and wrong widths are errors."""
    precision = metadata.get("precision", "float32")
    if precision == "ubinary":
        raise DatasetError(
            f"{where}: ubinary embeddings cannot be scored; embed with float32, float16 or int8"
        )
    try:
        raw = embeddings_of(table)
    except DatasetError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    dim = metadata.get("dim")
    if dim is not None and raw.shape[1] != dim:
        raise DatasetError(f"{where}: embeddings have {raw.shape[1]} dimensions, the dataset says {dim}")
    if precision == "int8":
        calibration = metadata["int8_calibration"]
        steps = np.asarray(calibration["steps"], dtype=np.float32)
        vectors = (raw.astype(np.float32) + 128.0) * steps + np.asarray(
            calibration["starts"], dtype=np.float32
        )
    else:
        vectors = raw.astype(np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DatasetError(f"{where}: row {int(np.argmin(finite))}: embedding has NaN or infinite values")
    return vectors


@dataclass(frozen=True)
class PartsLoader:
    """Picklable: reads a run of parts' vectors (for an actor holding one slice of the corpus), each part
    checked against its manifest entry."""

    root: str
    parts: tuple[dict, ...]  # manifest entries: part, rows, sha256
    storage_options: dict
    metadata: dict
    rows: tuple | None = None  # per part, the local rows to keep (None: all), e.g. one row per identical set

    def __call__(self) -> np.ndarray:
        folder = OutputFolder(self.root, self.storage_options)
        arrays = []
        for number, part in enumerate(self.parts):
            vectors = float_vectors(
                folder.read_part(part, ["embedding"]), self.metadata, folder.url_of(part["part"])
            )
            picked = None if self.rows is None else self.rows[number]
            arrays.append(vectors if picked is None else vectors[np.asarray(picked, dtype=np.int64)])
        dim = self.metadata.get("dim") or (arrays[0].shape[1] if arrays else 0)
        return np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
