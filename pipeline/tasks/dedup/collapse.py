"""Dedup stage 1b, exact collapse: rows with identical content are grouped by hash before any scoring.

Content is the vector's stored bytes for an embed output, and the text itself for a raw corpus (which
this job embedded, so identical texts may differ in a vector's last bit through batch padding). One
representative per identical set, its lowest row, goes to the similarity search; the others join it
when the groups are made. Identical copies score with each other what the representative scores with
itself, and with everyone else what the representative scores, so the groups are the ones all pairs
would give (see ``groups.identity_edges``) while boilerplate copied 100,000 times costs one row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.io.dataset import embeddings_of
from pipeline.io.output import OutputFolder
from pipeline.tasks.dedup.source import Source

COLLAPSE_DIR = "collapse"
COLLAPSED_FILE = f"{COLLAPSE_DIR}/identical.parquet"


@dataclass(frozen=True)
class Collapse:
    """Every row's representative (the lowest row with the same content; itself for a representative),
    and each member's self-score (the representative scored against itself)."""

    rep_of: np.ndarray  # int64, one per row
    self_score: np.ndarray  # float32, one per row (meaningful for members and their representatives)

    @property
    def reps(self) -> np.ndarray:
        """The representatives' rows, ascending: the compact index space the search runs in."""
        return np.flatnonzero(self.rep_of == np.arange(len(self.rep_of)))

    @property
    def members(self) -> np.ndarray:
        """Rows that are copies of a lower row."""
        return np.flatnonzero(self.rep_of != np.arange(len(self.rep_of)))

    def local_rows(self, offsets: list[int]) -> tuple[np.ndarray, ...]:
        """Per part, the local indices of its representatives."""
        reps = self.reps
        return tuple(
            reps[(reps >= offsets[p]) & (reps < offsets[p + 1])] - offsets[p] for p in range(len(offsets) - 1)
        )

    def table(self) -> pa.Table:
        members = self.members
        return pa.table(
            {
                "row": pa.array(members, pa.int64()),
                "rep_row": pa.array(self.rep_of[members], pa.int64()),
                "self_score": pa.array(self.self_score[members], pa.float32()),
            }
        )

    @classmethod
    def from_table(cls, rows: int, table: pa.Table) -> Collapse:
        rep_of = np.arange(rows, dtype=np.int64)
        self_score = np.zeros(rows, dtype=np.float32)
        members = table.column("row").to_numpy()
        rep_of[members] = table.column("rep_row").to_numpy()
        self_score[members] = table.column("self_score").to_numpy()
        return cls(rep_of, self_score)


def representatives(digests: np.ndarray) -> np.ndarray:
    """rep_of for one digest per row: the first row holding each digest."""
    if not len(digests):
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    return first[inverse.ravel()].astype(np.int64)


def self_scores(vectors: np.ndarray, fn: str) -> np.ndarray:
    """Each row scored against itself in float32, row by row as the search's kernels do: 1 for cosine
    (0 for a zero vector, as torch's normalize gives), |v|^2 for dot, 0 for the negated distances."""
    import torch
    import torch.nn.functional as F

    v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    if fn == "cosine":
        unit = F.normalize(v, p=2, dim=1)
        return (unit * unit).sum(dim=1).numpy()
    if fn == "dot":
        return (v * v).sum(dim=1).numpy()
    return np.zeros(len(v), dtype=np.float32)


def collapse(source: Source, fn: str, output: OutputFolder) -> Collapse:
    """The identical sets of the source (committed as ``collapsed.parquet``; a resumed run reads it back)."""
    done = output.committed(COLLAPSE_DIR)
    if 0 in done:
        return Collapse.from_table(source.rows, output.read_part(done[0]))
    text_column = source.metadata.get("text_column") if source.raw else None
    digests = []
    for index in range(len(source.parts)):
        columns = ["embedding"] + ([text_column] if text_column else [])
        table = source.read_part(index, columns)
        if text_column:
            values = [(t or "").encode() for t in table.column(text_column).to_pylist()]
        else:
            raw = np.ascontiguousarray(embeddings_of(table))
            values = [row.tobytes() for row in raw]
        digests.extend(hashlib.blake2b(v, digest_size=16).digest() for v in values)
    rep_of = representatives(np.array(digests, dtype="S16"))
    result = Collapse(rep_of, np.zeros(len(rep_of), dtype=np.float32))
    with_members = np.unique(rep_of[result.members])
    if len(with_members):
        vectors = source.rows_of(with_members, "embedding")
        scores = self_scores(np.stack([vectors[int(r)] for r in with_members]), fn)
        result.self_score[with_members] = scores
        result.self_score[result.members] = result.self_score[rep_of[result.members]]
    output.commit_part(COLLAPSED_FILE, 0, result.table())
    return result
