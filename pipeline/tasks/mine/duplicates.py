"""``--exclude-duplicates DEDUP_OUTPUT``: near-duplicate groups of a dedup output, mapped onto corpus indices.

A dedup output has ``duplicates.parquet`` (``id, group_id, kept_id, score``: each removed row, its group
and the row kept for it) and, in its manifest, the embed dataset it ran on (``source``: an embed output,
or ``<dedup>/embeddings`` for a raw corpus), whose parts hold the ids and the texts.

The rule, by text: a mining corpus text (extra corpus or positive) belongs to group G when a row of the
dedup source with *exactly the same text* is in G (a removed row, or the kept row of G); the first such
row wins if identical texts sit in different groups. Texts of rows in no group, and texts the dedup
never saw, have no group. A candidate is not a negative for an anchor when it has a group and one of the
anchor's positives has the same group. So a near-copy of a positive, or a text the dedup grouped with
it, never comes back as that positive's negative. (The positive itself is dropped by the positives rule.)

Only the grouped rows' texts are hashed (128 bits); the driver keeps, per grouped corpus index, its
group number, nothing per ungrouped text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.io.dataset import complete_manifest, dataset_metadata
from pipeline.io.output import PLAN_FILE, DatasetError, OutputFolder
from pipeline.io.storage import redact

DUPLICATES_FILE = "duplicates.parquet"


@dataclass
class DuplicateGroups:
    """Group numbers of the corpus indices that have one (ascending ``corpus_rows``)."""

    source: str
    digest: str  # the duplicates file's sha256: what the plan key records
    by_hash: dict[bytes, int]
    corpus_rows: np.ndarray = None  # type: ignore[assignment]
    groups: np.ndarray = None  # type: ignore[assignment]

    def map_corpus(self, distinct_hashes: np.ndarray) -> None:
        """Give corpus index i the group of its text (``distinct_hashes[i]``); then drop the text hashes."""
        data = np.ascontiguousarray(distinct_hashes, dtype=np.uint64).tobytes()
        rows, groups = [], []
        lookup = self.by_hash.get
        for i in range(len(distinct_hashes)):
            group = lookup(data[16 * i : 16 * i + 16])
            if group is not None:
                rows.append(i)
                groups.append(group)
        self.corpus_rows = np.asarray(rows, dtype=np.int64)
        self.groups = np.asarray(groups, dtype=np.int64)
        self.by_hash = {}

    @property
    def mapped(self) -> int:
        return 0 if self.corpus_rows is None else len(self.corpus_rows)

    def group_of(self, indices: np.ndarray) -> np.ndarray:
        """Each corpus index's group, -1 for none (or for padding)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.full(indices.shape, -1, dtype=np.int64)
        if not self.mapped:
            return out
        at = np.clip(np.searchsorted(self.corpus_rows, indices), 0, len(self.corpus_rows) - 1)
        hit = self.corpus_rows[at] == indices
        out[hit] = self.groups[at[hit]]
        return out

    def mask(self, candidates: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
        """[n, k] True where the candidate shares a group with one of its anchor's positives."""
        candidate_groups = self.group_of(candidates)
        out = np.zeros(candidate_groups.shape, dtype=bool)
        for row, anchor_positives in enumerate(positives):
            groups = self.group_of(anchor_positives)
            groups = groups[groups >= 0]
            if len(groups):
                out[row] = np.isin(candidate_groups[row], groups) & (candidate_groups[row] >= 0)
        return out


def load_duplicate_groups(url: str, storage_options: dict) -> DuplicateGroups:
    """Read a complete dedup output's groups and its source's texts (only the grouped rows are kept)."""
    folder = OutputFolder(url.rstrip("/"), storage_options)
    plan = folder.read_json(PLAN_FILE) or {}
    if plan.get("job") not in (None, "dedup") or not folder.exists(DUPLICATES_FILE):
        raise DatasetError(f"{redact(folder.url)}: not a dedup output (no {DUPLICATES_FILE})")
    manifest = complete_manifest(folder)
    entry = next((p for p in manifest.get("parts", []) if p["part"] == DUPLICATES_FILE), None)
    if entry is None:
        raise DatasetError(f"{redact(folder.url)}: {DUPLICATES_FILE} is not in its manifest")
    duplicates = folder.read_part(entry, ["id", "group_id", "kept_id"])
    group_of_id: dict = {}
    for ident, group, kept in zip(
        duplicates.column("id").to_pylist(),
        duplicates.column("group_id").to_pylist(),
        duplicates.column("kept_id").to_pylist(),
        strict=True,
    ):
        group_of_id.setdefault(ident, int(group))
        group_of_id.setdefault(kept, int(group))
    source_url = manifest.get("source")
    if not source_url:
        raise DatasetError(f"{redact(folder.url)}: its manifest does not name the dataset it deduplicated")
    by_hash: dict[bytes, int] = {}
    if group_of_id:
        metadata = dataset_metadata(source_url, storage_options)
        column = metadata.get("text_column") or "text"
        source = OutputFolder(source_url, storage_options)
        for part in complete_manifest(source).get("parts", []):
            names = source.read_schema(part["part"]).names
            if column not in names or "id" not in names:
                raise DatasetError(
                    f"{redact(source.url_of(part['part']))}: the dedup source has no {column!r} text column "
                    "(embed it with --keep-columns so --exclude-duplicates can match texts)"
                )
            table = source.read_part(part, ["id", column])
            for ident, text in zip(
                table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True
            ):
                group = group_of_id.get(ident)
                if group is not None and isinstance(text, str):
                    key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                    by_hash.setdefault(key, group)
    return DuplicateGroups(folder.url, entry["sha256"], by_hash)
