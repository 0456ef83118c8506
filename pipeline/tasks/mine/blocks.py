"""One anchor block, from its candidate window to its committed parts: shared by a full run (the window
comes from the index actors) and ``--from-candidates`` (the window comes from ``.embedpipe/candidates/``).

A block's *candidate window* (:class:`CandidateBlock`): per anchor, the bi-encoder's top ``k`` corpus
indices in rank order (score descending, corpus index ascending) with their scores, the anchor's
distinct positives with their scores, and where computed the cross-encoder's scores of both and each
candidate's best bi-encoder score to one of the positives. :func:`finish_block` applies the rules
(``compute/negatives.py``), fetches the texts it needs, and commits, in this order:

* ``.embedpipe/candidates/part-NNNNN.parquet`` (with ``--save-candidates``): the window, one row per anchor;
* ``.embedpipe/scores/part-NNNNN.parquet``: the scores behind report.json's histograms (one row of lists), so the
  report never needs every score in memory at once;
* ``part-NNNNN.parquet``: the output rows; its receipt (statistics, a few dropped candidates per rule
  with their texts, score ranges) marks the block done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from pipeline.compute import negatives as rules
from pipeline.io.output import BOOKKEEPING_DIR, OutputFolder, part_name
from pipeline.io.training_formats import build_table

CANDIDATES_DIR = f"{BOOKKEEPING_DIR}/candidates"
SCORES_DIR = f"{BOOKKEEPING_DIR}/scores"
SAMPLES_PER_BLOCK = 3  # dropped candidates kept per rule and block (the report shows the first few)
SAMPLE_CHARS = 240

_F32 = pa.list_(pa.float32())
_I64 = pa.list_(pa.int64())
CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("anchor", pa.int64()),  # global anchor index (distinct anchors, first-appearance order)
        pa.field("candidates", _I64),  # corpus indices, bi-encoder rank order (-1 = padding)
        pa.field("scores", _F32),  # bi-encoder scores
        pa.field("cross_encoder_scores", _F32),  # null when no cross-encoder was given
        pa.field("positive_similarity", _F32),  # best bi-encoder score to one of the anchor's positives
        pa.field("positives", _I64),  # the anchor's distinct positives, row order
        pa.field("positive_scores", _F32),
        pa.field("positive_cross_encoder_scores", _F32),
    ]
)


@dataclass
class CandidateBlock:
    number: int
    start: int  # the block's first global anchor
    candidates: np.ndarray  # [n, k] int64
    scores: np.ndarray  # [n, k] float32
    positives: list[np.ndarray]
    positive_scores: list[np.ndarray]
    cross_encoder_scores: np.ndarray | None = None
    positive_cross_encoder_scores: list[np.ndarray] | None = None
    positive_similarity: np.ndarray | None = None

    @property
    def anchors(self) -> int:
        return len(self.candidates)

    def window(self, k: int) -> CandidateBlock:
        """The first ``k`` candidates (a smaller window is a prefix of a larger one: same rank order)."""
        cut = slice(0, k)
        return replace(
            self,
            candidates=self.candidates[:, cut],
            scores=self.scores[:, cut],
            cross_encoder_scores=None
            if self.cross_encoder_scores is None
            else self.cross_encoder_scores[:, cut],
            positive_similarity=None
            if self.positive_similarity is None
            else self.positive_similarity[:, cut],
        )

    def to_table(self) -> pa.Table:
        n = self.anchors

        def rows(matrix: np.ndarray | None) -> list | None:
            return [None] * n if matrix is None else [row.tolist() for row in matrix]

        def lists(values: list[np.ndarray] | None) -> list:
            return [None] * n if values is None else [np.asarray(v).tolist() for v in values]

        columns = {
            "anchor": np.arange(self.start, self.start + n, dtype=np.int64),
            "candidates": rows(self.candidates),
            "scores": rows(self.scores),
            "cross_encoder_scores": rows(self.cross_encoder_scores),
            "positive_similarity": rows(self.positive_similarity),
            "positives": lists(self.positives),
            "positive_scores": lists(self.positive_scores),
            "positive_cross_encoder_scores": lists(self.positive_cross_encoder_scores),
        }
        return pa.table(
            {f.name: pa.array(columns[f.name], f.type) for f in CANDIDATES_SCHEMA}, schema=CANDIDATES_SCHEMA
        )

    @classmethod
    def from_table(cls, table: pa.Table, number: int) -> CandidateBlock:
        def matrix(name: str, dtype) -> np.ndarray | None:
            column = table.column(name)
            if column.null_count == len(column):
                return None
            return np.asarray(column.to_pylist(), dtype=dtype).reshape(len(column), -1)

        def lists(name: str, dtype) -> list[np.ndarray] | None:
            column = table.column(name)
            if len(column) and column.null_count == len(column):
                return None
            return [np.asarray(v, dtype=dtype) for v in column.to_pylist()]

        anchors = table.column("anchor").to_numpy()
        return cls(
            number=number,
            start=int(anchors[0]) if len(anchors) else 0,
            candidates=matrix("candidates", np.int64),
            scores=matrix("scores", np.float32),
            positives=lists("positives", np.int64),
            positive_scores=lists("positive_scores", np.float32),
            cross_encoder_scores=matrix("cross_encoder_scores", np.float32),
            positive_cross_encoder_scores=lists("positive_cross_encoder_scores", np.float32),
            positive_similarity=matrix("positive_similarity", np.float32),
        )


@dataclass
class BlockWriter:
    """What finishing a block needs besides the block: the options, the output, the columns."""

    options: rules.MiningOptions
    max_positives: int
    anchor_column: str
    positive_column: str
    output: OutputFolder
    duplicates: object | None = None  # duplicates.DuplicateGroups
    save_candidates: bool = False


def _range(values: np.ndarray) -> list:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return [float(values.min()), float(values.max()), int(len(values))] if len(values) else [None, None, 0]


def _clip(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "…"


def finish_block(
    writer: BlockWriter,
    block: CandidateBlock,
    anchors: list[str],
    fetch_texts: Callable[[np.ndarray], dict[int, str]],
) -> dict:
    """Apply the rules to the block's window, build its output table and commit its parts (module
    docstring); returns the output part's receipt as a dict."""
    options = writer.options
    if options.rescore:
        ranking, positive_scores = block.cross_encoder_scores, block.positive_cross_encoder_scores
        extras = {"bi_encoder": block.scores}
    else:
        ranking, positive_scores, extras = block.scores, block.positive_scores, {}
    duplicates = None
    if writer.duplicates is not None:
        duplicates = writer.duplicates.mask(block.candidates, block.positives)
    mined = rules.select_negatives(
        ranking,
        block.candidates,
        block.positives,
        positive_scores,
        options,
        writer.max_positives,
        anchor_offset=block.start,
        duplicates=duplicates,
        positive_similarity=block.positive_similarity,
        extras=extras,
        samples=SAMPLES_PER_BLOCK,
    )
    sample_rows = [s["candidate"] for picked in mined.samples.values() for s in picked]
    needed = np.unique(
        np.concatenate([*block.positives, *mined.negative_indices, np.asarray(sample_rows, np.int64)])
    )
    text = fetch_texts(needed)
    table = build_table(
        options.output_format,
        anchors=anchors,
        positives=[[text[int(p)] for p in idx] for idx in block.positives],
        positive_scores=positive_scores,
        negatives=[[text[int(n)] for n in idx] for idx in mined.negative_indices],
        negative_scores=mined.negative_scores,
        num_negatives=options.num_negatives,
        output_scores=options.output_scores,
        anchor_column=writer.anchor_column,
        positive_column=writer.positive_column,
    )
    samples = {
        rule: [
            dict(
                s,
                anchor_text=_clip(anchors[s["anchor"] - block.start]),
                candidate_text=_clip(text[s["candidate"]]),
            )
            for s in picked
        ]
        for rule, picked in mined.samples.items()
    }

    def flat(values: list[np.ndarray]) -> np.ndarray:
        return (
            np.concatenate([np.asarray(v, np.float32) for v in values]) if values else np.zeros(0, np.float32)
        )

    scores = {"positive": flat(positive_scores), "negative": flat(mined.negative_scores)}
    if options.rescore:
        scores["positive_bi_encoder"] = flat(block.positive_scores)
        scores["negative_bi_encoder"] = flat(mined.extras["bi_encoder"])
    name = part_name(block.number)
    if writer.save_candidates:
        writer.output.commit_part(f"{CANDIDATES_DIR}/{name}", block.number, block.to_table())
    writer.output.commit_part(
        f"{SCORES_DIR}/{name}",
        block.number,
        pa.table({kind: pa.array([values.tolist()], _F32) for kind, values in scores.items()}),
    )
    receipt = writer.output.commit_part(
        name,
        block.number,
        table,
        anchors_out=len(set(table.column(writer.anchor_column).to_pylist())),
        stats=mined.stats.as_dict(),
        samples=samples,
        score_ranges={kind: _range(values) for kind, values in scores.items()},
        **({"cross_encoder_pairs": cross_encoder_pairs(block)} if options.rescore else {}),
    )
    return receipt.to_dict()


def cross_encoder_pairs(block: CandidateBlock) -> int:
    """(anchor, text) pairs of the block with a cross-encoder score: its window's corpus entries and the
    anchors' positives."""
    return int((block.candidates >= 0).sum()) + sum(len(p) for p in block.positives)
