"""One job output: an `OutputFolder` owns every byte a job writes under its output URL, and how.

Every job (embed, dedup, mine, reembed) has the same lifecycle, in the spirit of Ray Data's Datasink:

1. **claim**: `.embedpipe/plan.json` records the job kind and a key over everything that decides the
   result. The same key resumes; another key is refused (naming the job that made it), or with
   `--overwrite` the old job's files are removed, the success marker first.
2. **commit parts**: a part is written under a temporary name and moved into place, then its receipt
   (`.embedpipe/receipts/<part>.json`: rows, bytes, sha256 and the job's own details) is committed. A part
   counts as done only when its receipt is visible and the part has the recorded size, so a crash between
   the two redoes the part, which identical input makes harmless.
3. **finish**: every expected part is checked against its receipt, `.embedpipe/manifest.json` is written,
   then `.embedpipe/SUCCESS`, always last. A re-run that finds the output incomplete removes it first.

All bookkeeping sits in the hidden `.embedpipe/` folder, so the visible files are the data alone and
the usual dataset readers open an output folder as it is.

Every storage call goes through `with_retries` (bounded, transient errors only), and reading a part
back verifies its sha256 against the receipt or manifest, so jobs never touch fsspec themselves.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.storage import TEMP_PREFIX, commit_bytes, filesystem, redact, with_retries, write_json_atomic

# A job's bookkeeping lives in one hidden folder, so the data files are all that dataset readers see:
# HF datasets, pandas, pyarrow and Ray Data skip dot-named folders (Polars and DuckDB take a glob).
BOOKKEEPING_DIR = ".embedpipe"
PLAN_FILE = f"{BOOKKEEPING_DIR}/plan.json"
MANIFEST_FILE = f"{BOOKKEEPING_DIR}/manifest.json"
SUCCESS_FILE = f"{BOOKKEEPING_DIR}/SUCCESS"
RECEIPTS_DIR = f"{BOOKKEEPING_DIR}/receipts"
# Where embedpipe 0.1 kept them, at the top of the output: recognised, refused with a way out.
LEGACY_FILES = ("_plan.json", "_manifest.json", "_SUCCESS", "_parts")
METADATA_KEY = b"embedpipe"


class DatasetError(ValueError):
    """An output that cannot be used as asked (wrong plan, missing part, checksum mismatch)."""


def plan_key(material: dict) -> str:
    """What must match for an existing output to be resumed rather than refused: a hash of the material."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def plan_fields(job: str, key: str, owned: Sequence[str] | Callable[[str], bool]) -> dict:
    """What every plan records: the job kind (named in refusals), the key, and the top-level names the
    job owns as glob patterns (what an ``--overwrite`` by any job removes)."""
    return {"job": job, "key": key, "owns": [] if callable(owned) else list(owned)}


def owner(owned: Sequence[str] | Callable[[str], bool], recorded: Sequence[str]) -> Callable[[str], bool]:
    """Whether a top-level name is ours or the old plan's: patterns (or a predicate) and recorded patterns."""
    patterns = [BOOKKEEPING_DIR, *LEGACY_FILES, *recorded, *([] if callable(owned) else owned)]

    def owns(name: str) -> bool:
        return (callable(owned) and owned(name)) or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return owns


def part_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if name else root.rstrip("/")


def parquet_bytes(
    table: pa.Table,
    metadata: dict | None = None,
    row_group_size: int | None = None,
    split_floats: Sequence[str] = (),
) -> bytes:
    """A table as zstd Parquet bytes, with the ``embedpipe`` key-value metadata when given.
    ``split_floats``: float columns written with Parquet's BYTE_STREAM_SPLIT encoding and no dictionary
    (for embeddings: faster to write and a little smaller than zstd alone)."""
    if metadata is not None:
        schema = table.schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        table = table.cast(schema)
    sink = pa.BufferOutputStream()
    options: dict[str, Any] = {}
    if split_floats:
        options["use_dictionary"] = [n for n in table.column_names if n not in split_floats]
        options["column_encoding"] = dict.fromkeys(split_floats, "BYTE_STREAM_SPLIT")
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size, **options)
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class Receipt:
    """Proof that one part is committed: its name, rows, size and checksum, plus the job's own details
    (tokens and timings for embed, mining statistics for mine). One format for every job."""

    shard_id: int
    part: str  # path relative to the output root
    rows: int
    bytes: int
    sha256: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "shard_id": self.shard_id,
            "part": self.part,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
            **self.details,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Receipt:
        core = ("shard_id", "part", "rows", "bytes", "sha256")
        return cls(*(data[k] for k in core), details={k: v for k, v in data.items() if k not in core})


def receipts_folder(folder: str) -> str:
    """Where the receipts of the parts under ``folder`` live: ``kept`` -> ``.embedpipe/receipts/kept``
    (and ``.embedpipe/scores`` -> ``.embedpipe/receipts/scores``)."""
    inner = folder.removeprefix(BOOKKEEPING_DIR + "/") if folder != BOOKKEEPING_DIR else ""
    return join(RECEIPTS_DIR, inner)


def receipt_path(part: str) -> str:
    """``kept/part-00001.parquet`` -> ``.embedpipe/receipts/kept/part-00001.json``."""
    folder, base = posixpath.split(part)
    return join(receipts_folder(folder), posixpath.splitext(base)[0] + ".json")


class OutputFolder:
    """An output URL and its storage options: claiming, committing, listing, reading back, finishing.

    Picklable (the filesystem is opened lazily), so Ray actors commit their own parts.
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"OutputFolder({redact(self.url)!r})"

    @cached_property
    def _fs(self) -> tuple[Any, str]:
        fs, path = filesystem(self.url, self.storage_options)
        return fs, path.rstrip("/")

    @property
    def fs(self):
        return self._fs[0]

    def path_of(self, name: str = "") -> str:
        return join(self._fs[1], name)

    def url_of(self, name: str = "") -> str:
        return join(self.url, name)

    def child(self, name: str) -> OutputFolder:
        """The folder ``name`` under this one, with the same storage options."""
        return OutputFolder(self.url_of(name), self.storage_options)

    # -- single files, every call retried -------------------------------------------------------------

    def exists(self, name: str = "") -> bool:
        return bool(with_retries(lambda: self.fs.exists(self.path_of(name)), what=self.url_of(name)))

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return with_retries(lambda: self.fs.cat_file(self.path_of(name)), what=self.url_of(name))
        except (FileNotFoundError, NotADirectoryError):  # NotADirectory: the URL names a file, not a folder
            return None

    def read_json(self, name: str) -> dict | None:
        data = self.read_bytes(name)
        return None if data is None else json.loads(data)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Commit ``data`` atomically (as readers see it): whole or absent."""
        with_retries(lambda: commit_bytes(self.fs, self.path_of(name), data), what=self.url_of(name))

    def write_json(self, name: str, obj: Any) -> None:
        with_retries(lambda: write_json_atomic(self.fs, self.path_of(name), obj), what=self.url_of(name))

    def read_table(
        self, name: str, columns: Iterable[str] | None = None, sha256: str | None = None
    ) -> pa.Table:
        """A Parquet file; with ``sha256`` its bytes are checked first (DatasetError naming the file)."""
        data = self.read_bytes(name)
        if data is None:
            raise DatasetError(f"{redact(self.url_of(name))}: missing")
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise DatasetError(
                f"{redact(self.url_of(name))}: checksum does not match its receipt or manifest"
            )
        return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns is not None else None)

    def is_folder(self, name: str = "") -> bool:
        return bool(with_retries(lambda: self.fs.isdir(self.path_of(name)), what=self.url_of(name)))

    def read_schema(self, name: str) -> pa.Schema:
        def read() -> pa.Schema:
            with self.fs.open(self.path_of(name), "rb") as handle:
                return pq.read_schema(handle)

        return with_retries(read, what=self.url_of(name))

    def list(self, folder: str = "") -> dict[str, int]:
        """Names directly under ``folder`` (files and folders, hidden ones too) with their sizes; {} when absent."""
        target = self.path_of(folder)

        def ls() -> dict[str, int]:
            try:
                entries = self.fs.ls(target, detail=True, refresh=True)
            except FileNotFoundError:
                return {}
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}

        return with_retries(ls, what=self.url_of(folder))

    def remove(self, name: str) -> None:
        """Remove a file or a folder and all under it; nothing there is fine."""
        target = self.path_of(name)

        def rm() -> None:
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)

        with_retries(rm, what=self.url_of(name))

    # -- claiming ---------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail before any work when the output cannot be written (no such bucket, a file in the way)."""
        probe = self.path_of(f"{TEMP_PREFIX}probe-{uuid.uuid4().hex[:16]}")
        try:
            if isinstance(self.fs, LocalFileSystem):
                self.fs.makedirs(self.path_of(), exist_ok=True)
            with_retries(lambda: self.fs.pipe_file(probe, b""), what=self.url)
            with_retries(lambda: self.fs.rm_file(probe), what=self.url)
        except Exception as exc:
            raise DatasetError(
                redact(f"{self.url}: the output cannot be written ({type(exc).__name__}: {exc})")
            ) from None

    def plan(self) -> dict | None:
        plan = self.read_json(PLAN_FILE)
        if plan is None and self.exists(LEGACY_FILES[0]):
            # An older layout: its plan is only good for naming the job (refusal, or --overwrite).
            return {"job": (self.read_json(LEGACY_FILES[0]) or {}).get("job", "embedpipe"), "key": None}
        return plan

    def claim(
        self,
        job: str,
        key: str,
        plan: dict,
        *,
        overwrite: bool,
        owned: Sequence[str] | Callable[[str], bool],
        log: Callable[[str], None],
        write: bool = True,
    ) -> dict | None:
        """One output belongs to one plan: the same ``key`` resumes it and returns its stored plan; another
        is refused, naming the kind of job that made it, or with ``overwrite`` the top-level names matching
        ``owned`` (glob patterns) or the patterns the old plan recorded are removed, so another job's files
        never stay beside the new ones. A new output gets ``plan`` (with `plan_fields`) unless ``write`` is
        False (the job writes it itself later)."""
        existing = self.plan()
        if existing is not None and existing.get("key") != key:
            kind = existing.get("job", job)
            if not overwrite:
                made = "with other input or options" if kind == job else "by another job"
                if existing.get("key") is None:
                    made = f"by an earlier embedpipe ({LEGACY_FILES[0]} at the top)"
                article = "an" if kind[:1] in "aeiou" else "a"
                raise DatasetError(
                    f"{redact(self.url)}: holds {article} {kind} output made {made}; use --overwrite "
                    "or choose another --output"
                )
            log(f"replacing the existing {kind} output at {redact(self.url)}")
            self.clear(owner(owned, existing.get("owns") or []))
            existing = None
        if existing is None:
            self.check_writable()
            if write:
                self.write_json(PLAN_FILE, dict(plan, **plan_fields(job, key, owned)))
        return existing

    def clear(self, owned: Callable[[str], bool]) -> None:
        """Remove what an earlier run wrote (top-level names ``owned`` accepts), the success marker first,
        so the output stops looking complete before anything else goes."""
        for marker in (SUCCESS_FILE, "_SUCCESS"):
            self.remove(marker)
        for name in sorted(self.list()):
            if owned(name):
                self.remove(name)

    # -- parts and receipts -------------------------------------------------------------------------

    def commit_part(
        self, part: str, number: int, data: bytes | pa.Table, rows: int | None = None, **details: Any
    ) -> Receipt:
        """Commit a part, then its receipt: a part counts as done only once its receipt is visible."""
        if isinstance(data, pa.Table):
            rows = data.num_rows if rows is None else rows
            data = parquet_bytes(data)
        if rows is None:
            raise ValueError("rows is needed when the part is given as bytes")
        self.write_bytes(part, data)
        receipt = Receipt(number, part, rows, len(data), hashlib.sha256(data).hexdigest(), details)
        self.write_json(receipt_path(part), receipt.to_dict())
        return receipt

    def committed(self, folder: str = "") -> dict[int, Receipt]:
        """Receipts (by part number) of the parts under ``folder`` that are visible with the recorded size."""
        receipts_dir = receipts_folder(folder)
        entries = self.list(receipts_dir)
        if not entries:
            return {}
        sizes = self.list(folder)
        done: dict[int, Receipt] = {}
        for name in sorted(entries):
            if not name.endswith(".json") or name.startswith(TEMP_PREFIX):
                continue
            data = self.read_json(join(receipts_dir, name))
            if data is None:
                continue
            receipt = Receipt.from_dict(data)
            if sizes.get(posixpath.basename(receipt.part)) == receipt.bytes:
                done[receipt.shard_id] = receipt
        return done

    def read_part(self, receipt: Receipt | dict, columns: Iterable[str] | None = None) -> pa.Table:
        """A committed part, its checksum verified against the receipt (or a manifest's entry)."""
        entry = receipt.to_dict() if isinstance(receipt, Receipt) else receipt
        return self.read_table(entry["part"], columns, sha256=entry["sha256"])

    # -- finishing ---------------------------------------------------------------------------------

    def is_complete(self) -> bool:
        if self.exists(SUCCESS_FILE):
            return True
        # An earlier embedpipe's output has _plan.json beside _SUCCESS (Spark's folders have _SUCCESS alone:
        # they are plain input, not complete embedpipe outputs).
        if self.exists(LEGACY_FILES[2]) and self.exists(LEGACY_FILES[0]):
            raise DatasetError(
                f"{redact(self.url)}: made by an earlier embedpipe (_SUCCESS, _manifest.json, _plan.json and "
                "_parts/ at the top); move them to .embedpipe/SUCCESS, manifest.json, plan.json and "
                "receipts/, or re-run the job that made it with --overwrite"
            )
        return False

    def mark_incomplete(self) -> None:
        """A re-run is about to change the output: it stops looking complete first."""
        if self.is_complete():
            self.remove(SUCCESS_FILE)

    def finish(
        self, manifest: dict, parts: Sequence[Receipt] = (), expected: dict[str, Sequence[int]] | None = None
    ) -> dict:
        """Check the expected parts (folder -> part numbers) against their receipts, then write
        the manifest (listing ``parts`` and the checked ones) and the success marker last."""
        listed = list(parts)
        for folder, numbers in (expected or {}).items():
            receipts = self.committed(folder)
            missing = [n for n in numbers if n not in receipts]
            if missing:
                raise DatasetError(
                    f"{redact(self.url_of(folder))}: {len(missing)} planned part(s) missing, "
                    f"e.g. part {missing[0]}"
                )
            extra = sorted(set(receipts) - set(numbers))
            if extra:
                raise DatasetError(
                    f"{redact(self.url_of(folder))}: parts outside the plan, e.g. {receipts[extra[0]].part}"
                )
            listed.extend(receipts[n] for n in numbers)
        manifest = dict(manifest, parts=[r.to_dict() for r in listed])
        manifest["rows"] = sum(r.rows for r in listed)
        manifest["bytes"] = sum(r.bytes for r in listed)
        self.write_json(MANIFEST_FILE, manifest)
        self.write_bytes(SUCCESS_FILE, b"")
        return manifest
