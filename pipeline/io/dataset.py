"""Embedding datasets: parts, per-part receipts, plan, manifest and ``_SUCCESS``.

Layout under the output URL::

    part-00000.parquet ...     one per shard: id, embedding, kept columns; key-value metadata "embedpipe"
    _parts/part-00000.json     receipt committed after its part: rows, bytes, sha256, timings
    _plan.json                 the shards and the options that produced them (resume checks it)
    _manifest.json             every part, rows, bytes, checksums, timings, versions, summary
    _SUCCESS                   last: every planned part is there and matches the manifest

Parts and receipts are committed atomically, so a part without a receipt is simply redone on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.storage import TEMP_PREFIX, commit_bytes, filesystem, redact, with_retries, write_json_atomic

PRECISIONS = ("float32", "float16", "int8", "ubinary")
METADATA_KEY = b"embedpipe"
PLAN_FILE = "_plan.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
RECEIPTS_DIR = "_parts"


class DatasetError(ValueError):
    """An output that cannot be used as asked (wrong plan, missing part, bad metadata)."""


def part_name(shard_id: int) -> str:
    return f"part-{shard_id:05d}.parquet"


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


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
    return pa.FixedSizeListArray.from_arrays(values, width) if n else pa.array([], pa.list_(values.type, width))


def embeddings_of(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """The embedding column as a 2-D numpy array (its stored dtype)."""
    array = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(array.type):
        raise DatasetError(f"column {column!r} is {array.type}, expected a fixed_size_list")
    width = array.type.list_size
    if array.null_count:
        raise DatasetError(f"column {column!r} has null embeddings")
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), width)


# -- parts and receipts -------------------------------------------------------------------------


@dataclass(frozen=True)
class PartReceipt:
    shard_id: int
    part: str
    rows: int
    bytes: int
    sha256: str
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    attempt: int = 1
    skipped_rows: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parquet_bytes(table: pa.Table, metadata: dict) -> bytes:
    schema = table.schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    sink = io.BytesIO()
    pq.write_table(table.cast(schema), sink, compression="zstd", row_group_size=16384)
    return sink.getvalue()


def write_part(root: str, storage_options: dict | None, shard_id: int, table: pa.Table, metadata: dict,
               **receipt_fields) -> PartReceipt:
    """Commit a part, then its receipt: a part is only counted done once its receipt is visible."""
    fs, path = filesystem(root, storage_options)
    data = parquet_bytes(table, metadata)
    name = part_name(shard_id)
    with_retries(lambda: commit_bytes(fs, join(path, name), data), what=join(root, name))
    receipt = PartReceipt(shard_id, name, table.num_rows, len(data), hashlib.sha256(data).hexdigest(),
                          **receipt_fields)
    receipt_path = join(path, f"{RECEIPTS_DIR}/{name.replace('.parquet', '.json')}")
    with_retries(lambda: write_json_atomic(fs, receipt_path, receipt.to_dict()), what=join(root, RECEIPTS_DIR))
    return receipt


def read_receipts(root: str, storage_options: dict | None) -> dict[int, PartReceipt]:
    """Receipts whose part is visible with the recorded size: the shards that are done."""
    fs, path = filesystem(root, storage_options)
    receipts_dir = join(path, RECEIPTS_DIR)
    if not with_retries(lambda: fs.exists(receipts_dir), what=join(root, RECEIPTS_DIR)):
        return {}
    sizes = {info["name"].rsplit("/", 1)[-1]: int(info.get("size") or 0)
             for info in with_retries(lambda: fs.ls(path, detail=True), what=root)}
    done: dict[int, PartReceipt] = {}
    for entry in with_retries(lambda: fs.ls(receipts_dir, detail=False), what=join(root, RECEIPTS_DIR)):
        name = entry.rsplit("/", 1)[-1]
        if not (name.startswith("part-") and name.endswith(".json")):
            continue
        receipt = PartReceipt(**json.loads(with_retries(lambda e=entry: fs.cat_file(e), what=entry)))
        if sizes.get(receipt.part) == receipt.bytes:
            done[receipt.shard_id] = receipt
    return done


# -- plan, manifest, success --------------------------------------------------------------------


def read_json_file(root: str, name: str, storage_options: dict | None) -> dict | None:
    fs, path = filesystem(root, storage_options)
    target = join(path, name)
    if not with_retries(lambda: fs.exists(target), what=join(root, name)):
        return None
    return json.loads(with_retries(lambda: fs.cat_file(target), what=join(root, name)))


def write_json_file(root: str, name: str, data: dict, storage_options: dict | None) -> None:
    fs, path = filesystem(root, storage_options)
    with_retries(lambda: write_json_atomic(fs, join(path, name), data), what=join(root, name))


def is_complete(root: str, storage_options: dict | None) -> bool:
    fs, path = filesystem(root, storage_options)
    return bool(with_retries(lambda: fs.exists(join(path, SUCCESS_FILE)), what=root))


def finalize(root: str, storage_options: dict | None, shard_ids: Sequence[int], manifest: dict) -> dict:
    """Check every planned part against its receipt, then write the manifest and ``_SUCCESS`` last."""
    receipts = read_receipts(root, storage_options)
    missing = [i for i in shard_ids if i not in receipts]
    if missing:
        raise DatasetError(f"{root}: {len(missing)} planned part(s) missing, e.g. {part_name(missing[0])}")
    extra = sorted(set(receipts) - set(shard_ids))
    if extra:
        raise DatasetError(f"{root}: parts outside the plan, e.g. {part_name(extra[0])}")
    manifest = dict(manifest, parts=[receipts[i].to_dict() for i in shard_ids])
    manifest["rows"] = sum(receipts[i].rows for i in shard_ids)
    manifest["bytes"] = sum(receipts[i].bytes for i in shard_ids)
    write_json_file(root, MANIFEST_FILE, manifest, storage_options)
    fs, path = filesystem(root, storage_options)
    with_retries(lambda: commit_bytes(fs, join(path, SUCCESS_FILE), b""), what=join(root, SUCCESS_FILE))
    return manifest


def check_writable(root: str, storage_options: dict | None) -> None:
    """Fail before any work when the output cannot be written (no such bucket, a file in the way, no access)."""
    fs, path = filesystem(root, storage_options)
    probe = join(path, f"{TEMP_PREFIX}probe-{uuid.uuid4().hex[:16]}")
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path, exist_ok=True)
        with_retries(lambda: fs.pipe_file(probe, b""), what=root)
        with_retries(lambda: fs.rm_file(probe), what=root)
    except Exception as exc:
        raise DatasetError(redact(f"{root}: the output cannot be written ({type(exc).__name__}: {exc})")) from None


def is_dataset_file(name: str) -> bool:
    """Names an embed output owns (parts, receipts, plan, manifest, ``_SUCCESS``)."""
    return name in (SUCCESS_FILE, MANIFEST_FILE, PLAN_FILE, RECEIPTS_DIR) or (
        name.startswith("part-") and name.endswith(".parquet"))


def clear_output(root: str, storage_options: dict | None, owned: Callable[[str], bool] = is_dataset_file) -> None:
    """Remove what an earlier run wrote (only the names ``owned`` accepts), ``_SUCCESS`` first so that the
    output stops looking complete before anything else goes; for --overwrite."""
    fs, path = filesystem(root, storage_options)
    if not with_retries(lambda: fs.exists(path), what=root):
        return
    success = join(path, SUCCESS_FILE)
    if owned(SUCCESS_FILE) and with_retries(lambda: fs.exists(success), what=root):
        with_retries(lambda: fs.rm(success), what=join(root, SUCCESS_FILE))
    for entry in with_retries(lambda: fs.ls(path, detail=False), what=root):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name != SUCCESS_FILE and owned(name):
            with_retries(lambda e=entry: fs.rm(e, recursive=True), what=join(root, name))


def claim_output(root: str, key: str, plan: dict, storage_options: dict | None, *, job: str, overwrite: bool,
                 owned: Callable[[str], bool], log: Callable[[str], None]) -> dict | None:
    """One output belongs to one plan (``key``): the same key resumes it and returns its stored plan;
    another key is refused, or with ``overwrite`` the old output is cleared. A new output gets ``plan``."""
    existing = read_json_file(root, PLAN_FILE, storage_options)
    if existing is not None and existing.get("key") != key:
        if not overwrite:
            raise DatasetError(f"{root}: holds a {job} output made with other input or options; use --overwrite "
                               "or choose another --output")
        log(f"replacing the existing {job} output at {root}")
        clear_output(root, storage_options, owned)
        existing = None
    if existing is None:
        write_json_file(root, PLAN_FILE, dict(plan, key=key), storage_options)
    return existing


# -- reading datasets back ----------------------------------------------------------------------


def dataset_metadata(root: str, storage_options: dict | None) -> dict:
    """The ``embedpipe`` metadata of a complete dataset (from its first part)."""
    manifest = read_json_file(root, MANIFEST_FILE, storage_options)
    if manifest is None or not is_complete(root, storage_options):
        raise DatasetError(f"{root}: not a complete embedpipe dataset (no _SUCCESS / _manifest.json)")
    parts = manifest.get("parts") or []
    if not parts:
        raise DatasetError(f"{root}: the dataset has no parts")
    fs, path = filesystem(root, storage_options)
    with fs.open(join(path, parts[0]["part"]), "rb") as handle:
        meta = pq.read_schema(handle).metadata or {}
    if METADATA_KEY not in meta:
        raise DatasetError(f"{join(root, parts[0]['part'])}: no 'embedpipe' metadata")
    return json.loads(meta[METADATA_KEY])


def iter_parts(root: str, storage_options: dict | None, columns: Iterable[str] | None = None):
    """(part name, table) for every part of a complete dataset, in part order."""
    manifest = read_json_file(root, MANIFEST_FILE, storage_options)
    if manifest is None or not is_complete(root, storage_options):
        raise DatasetError(f"{root}: not a complete embedpipe dataset (no _SUCCESS / _manifest.json)")
    fs, path = filesystem(root, storage_options)
    for part in manifest.get("parts", []):
        target = join(path, part["part"])
        data = with_retries(lambda t=target: fs.cat_file(t), what=join(root, part["part"]))
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise DatasetError(f"{join(root, part['part'])}: checksum does not match the manifest")
        yield part["part"], pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)


def read_dataset(root: str, storage_options: dict | None = None, columns: Iterable[str] | None = None) -> pa.Table:
    tables = [table for _, table in iter_parts(root, storage_options, columns)]
    if not tables:
        raise DatasetError(f"{root}: the dataset has no parts")
    return pa.concat_tables(tables)


# -- vectors for scoring ------------------------------------------------------------------------


def float_vectors(table: pa.Table, metadata: dict, where: str) -> np.ndarray:
    """Embeddings as float32 for scoring: int8 is de-quantized; NaN, infinity and wrong widths are errors."""
    precision = metadata.get("precision", "float32")
    if precision == "ubinary":
        raise DatasetError(f"{where}: ubinary embeddings cannot be scored; embed with float32, float16 or int8")
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
        vectors = (raw.astype(np.float32) + 128.0) * steps + np.asarray(calibration["starts"], dtype=np.float32)
    else:
        vectors = raw.astype(np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DatasetError(f"{where}: row {int(np.argmin(finite))}: embedding has NaN or infinite values")
    return vectors


@dataclass(frozen=True)
class PartsLoader:
    """Picklable: reads a run of parts' vectors (for an actor holding one slice of the corpus)."""

    root: str
    parts: tuple[str, ...]
    storage_options: dict
    metadata: dict

    def __call__(self) -> np.ndarray:
        fs, path = filesystem(self.root, self.storage_options)
        arrays = []
        for name in self.parts:
            data = with_retries(lambda n=name: fs.cat_file(join(path, n)), what=join(self.root, name))
            table = pq.read_table(pa.BufferReader(data), columns=["embedding"])
            arrays.append(float_vectors(table, self.metadata, join(self.root, name)))
        dim = self.metadata.get("dim") or (arrays[0].shape[1] if arrays else 0)
        return np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
