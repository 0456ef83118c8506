"""Hard-negative selection: sentence-transformers' ``mine_hard_negatives`` rules on precomputed candidates.

The Ray layer embeds anchors and corpus, runs a blockwise exact top-k on each worker and merges the
partial lists on the driver; this module applies the rules to a block of anchors. It reproduces
``sentence_transformers.util.mine_hard_negatives`` (v6.2, ``use_faiss=False``), cross-encoder rescoring
included, and adds two false-negative filters of its own (``exclude_duplicates``,
``max_positive_similarity``).

Inputs, as ST builds them (:func:`group_pairs`)
    * Corpus: ``dict.fromkeys(corpus + positives)``: the optional extra corpus first, then the positive
      column, de-duplicated by exact text, first occurrence wins. Corpus indices are positions in it.
    * Anchors: de-duplicated by exact text, in order of first appearance. An anchor on several rows is
      one query whose positives are the distinct positive texts of all its rows, in row order.
    * ``max_positives``: the most *rows* for one anchor (pandas ``groupby.count``), duplicated
      (anchor, positive) rows included. It only sizes the candidate list.
    * Scores (for the caller): ST embeds anchors with ``encode_query`` and the corpus with
      ``encode_document`` (the model's query/document prompts), always with ``normalize_embeddings=True``;
      candidate scores are ``model.similarity`` and positive scores ``model.similarity_pairwise``.

Candidates (what workers must return)
    ``k = min(range_max + max_positives, corpus_size)`` per anchor (:func:`candidate_count`), by
    descending score. ST takes them with ``torch.topk``, whose order among *exactly equal* scores is
    unspecified. Our tie rule, everywhere (worker top-k, driver merge, re-ranking below): descending
    score, then ascending corpus index. Results equal ST's when the scores are bitwise equal and no exact
    tie sits where it matters. More than ``k`` candidates would change results (ST never sees the extra
    ones), so :func:`select_negatives` re-sorts and truncates to ``k`` itself.

Cross-encoder rescoring (ST ``hard_negatives.py`` lines 596-626)
    Only when a cross-encoder is given *and* one of ``absolute_margin``, ``relative_margin``,
    ``max_score``, ``min_score`` is set (:attr:`MiningOptions.rescore`): every candidate of the
    bi-encoder's top ``k`` and every (anchor, positive) pair is scored by the cross-encoder, and those
    scores replace the bi-encoder's everywhere after: in the rules, in the ranking of the window and in
    the output scores. The candidate *set* stays the bi-encoder's top ``k``. The caller passes the ``k``
    candidates in bi-encoder order with their cross-encoder scores; :func:`select_negatives` then ranks
    by those. A cross-encoder with ``min_score`` alone also widens ``range_max`` (ST line 370).

Rules, in ST's order; each sets a candidate's score to -inf (dropped)
    1. padding (corpus index < 0, or a NaN score);
    2. unless ``include_positives``: a corpus index that is one of the anchor's positives (all of them,
       over all rows of a repeated anchor);
    3. ``exclude_duplicates`` (ours): the caller's mask of candidates in the same near-duplicate group
       as one of the anchor's positives (see ``pipeline.tasks.mine.duplicates``);
    4. ``max_positive_similarity`` (ours): drop if the candidate's bi-encoder score to any of the
       anchor's positives (document to document) is ``>= max_positive_similarity``;
       with ``include_positives`` the positives themselves are exempt from 3 and 4;
    5. ``absolute_margin``: drop if ``score + absolute_margin > p``;
    6. ``relative_margin``: drop if ``score > p - |p| * relative_margin``; in both, ``p`` is the anchor's
       *lowest* positive score (ST: "the harder positive"), not the row's own positive;
    7. ``max_score``: drop if ``score > max_score``;
    8. ``min_score``: drop if ``score < min_score``.
    Arithmetic is float32 with Python-float options, as in ST. Survivors are then re-ranked (dropped ones
    last), the first ``range_max`` kept and the first ``range_min`` skipped: the window is ranks
    ``[range_min, range_max)`` of the *surviving* candidates (positives do not use up ``range_min``).

Sampling
    * ``top``: the first ``num_negatives`` of the window.
    * ``random``: ``num_negatives`` drawn without replacement from the window's finite candidates (all of
      them when there are no more), then put back in rank order. Parity with ST's ``random.sample`` is
      not a goal, the window is the same. Instead of a stateful generator, each (anchor, candidate) gets
      a counter-based key ``splitmix64(seed, global anchor position, corpus index)`` and the smallest keys
      win: the draw depends only on the seed, the anchor's position in the de-duplicated anchor list and
      the window, not on how anchors are split into blocks or how many workers ran.

A block returns only the kept negatives per anchor, so an anchor can get fewer than ``num_negatives``;
the output formats (``pipeline.io.training_formats``) treat such anchors as ST does.

Counters (:class:`MiningStats`) count the candidates each rule drops *newly*. ST's printed
``min_score`` count also includes candidates dropped by earlier rules; ours does not.

Options (:func:`resolve_options`): ``range_max`` defaults to ``range_min + 10 * num_negatives +
max_positives`` when a margin or ``max_score`` is set, or ``min_score`` with a cross-encoder, else
``range_min + num_negatives + max_positives`` (ST lines 365-376). ``include_positives`` forces the
``n-tuple`` format, as in ST.

Grouping without the texts (:func:`first_appearance`, :func:`positive_lists`): the job hashes every
text (128 bits) while streaming the input and groups the hashes, so the driver never holds the texts;
the ids and orders are exactly :func:`group_pairs`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

OUTPUT_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
SAMPLING_STRATEGIES = ("top", "random")

PRESETS: dict[str, dict[str, Any]] = {
    # NV-Retriever's "TopK-PercPos (95%)": negatives at least 5% of |positive score| below the positive.
    "percpos95": {"relative_margin": 0.05},
    # NV-Retriever's "TopK-MarginPos": negatives at least 0.05 below the positive score.
    "marginpos": {"absolute_margin": 0.05},
}

# Order in which the rules apply (ST's, with our two false-negative filters after the positives); also
# the counter names.
RULES = (
    "positives",
    "exclude_duplicates",
    "max_positive_similarity",
    "absolute_margin",
    "relative_margin",
    "max_score",
    "min_score",
)
SCORE_RULES = ("absolute_margin", "relative_margin", "max_score", "min_score")


@dataclass(frozen=True)
class MiningOptions:
    """The options of ``mine_hard_negatives`` that shape the result (names and defaults as in ST)."""

    range_min: int = 0
    range_max: int | None = None
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    num_negatives: int = 3
    sampling_strategy: str = "top"
    seed: int = 0
    include_positives: bool = False
    output_format: str = "triplet"
    output_scores: bool = False
    max_positive_similarity: float | None = None  # ours: drop candidates this close to a positive
    exclude_duplicates: str | None = None  # ours: a dedup output; candidates in a positive's group dropped
    cross_encoder: bool = False  # a cross-encoder was given (with a score rule it rescores)

    @property
    def rescore(self) -> bool:
        """ST rescores with the cross-encoder only when one of the score rules is set (line 597)."""
        return self.cross_encoder and any(getattr(self, name) is not None for name in SCORE_RULES)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> MiningOptions:
        """Build from a spec/flags dict; an unknown key is an error, not silently ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown mining option(s) {unknown}; known options: {sorted(names)}")
        return cls(**dict(options))


@dataclass
class MiningStats:
    """Counters for the mining report; add blocks together with ``+``."""

    anchors: int = 0
    candidates: int = 0  # candidate slots looked at (k per anchor, padding included)
    padding: int = 0  # slots with no corpus entry (corpus smaller than k)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))
    negatives: int = 0  # negatives selected
    short_anchors: int = 0  # anchors that got fewer than num_negatives

    def __add__(self, other: MiningStats) -> MiningStats:
        return MiningStats(
            anchors=self.anchors + other.anchors,
            candidates=self.candidates + other.candidates,
            padding=self.padding + other.padding,
            dropped={r: self.dropped.get(r, 0) + other.dropped.get(r, 0) for r in RULES},
            negatives=self.negatives + other.negatives,
            short_anchors=self.short_anchors + other.short_anchors,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MinedBlock:
    """Per anchor of a block: kept negatives (corpus indices, scores) in rank order, plus counters.

    ``extras``: per name given to :func:`select_negatives`, the kept negatives' values of that array
    (e.g. their bi-encoder scores when the ranking used the cross-encoder's). ``samples``: per rule, the
    first few candidates it dropped (global anchor, corpus index, score, and for
    ``max_positive_similarity`` the similarity).
    """

    negative_indices: list[np.ndarray]
    negative_scores: list[np.ndarray]
    stats: MiningStats
    extras: dict[str, list[np.ndarray]] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class PairGroups:
    """(anchor, positive) rows grouped the way ST groups them; see the module docstring."""

    anchors: list[str]  # distinct anchors, first-appearance order
    corpus: list[str]  # distinct texts: extra corpus, then positives
    positive_indices: list[np.ndarray]  # per anchor: distinct positive corpus indices, row order
    max_positives: int  # most rows for one anchor (duplicates included), sizes k


def group_pairs(
    anchors: Sequence[str], positives: Sequence[str], corpus: Sequence[str] | None = None
) -> PairGroups:
    """De-duplicate anchors and corpus exactly as ST does, so corpus indices and output order match ST."""
    if len(anchors) != len(positives):
        raise ValueError(f"{len(anchors)} anchors but {len(positives)} positives")
    if len(anchors) == 0:
        raise ValueError("The dataset is empty: nothing to mine negatives for.")
    texts = list(dict.fromkeys(list(corpus or []) + list(positives)))
    text_idx = {t: i for i, t in enumerate(texts)}
    anchor_idx: dict[str, int] = {}
    rows: list[int] = []
    pos_lists: list[list[int]] = []
    for anchor, positive in zip(anchors, positives, strict=True):
        a = anchor_idx.setdefault(anchor, len(anchor_idx))
        if a == len(pos_lists):
            pos_lists.append([])
            rows.append(0)
        rows[a] += 1
        p = text_idx[positive]
        if p not in pos_lists[a]:
            pos_lists[a].append(p)
    return PairGroups(
        anchors=list(anchor_idx),
        corpus=texts,
        positive_indices=[np.asarray(p, dtype=np.int64) for p in pos_lists],
        max_positives=max(rows),
    )


def apply_preset(options: dict[str, Any], preset: str | None, explicitly_set: set[str]) -> dict[str, Any]:
    """Return ``options`` with the preset's values, except for keys the user set explicitly (they win)."""
    out = dict(options)
    if preset is None:
        return out
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    for key, value in PRESETS[preset].items():
        if key not in explicitly_set:
            out[key] = value
    return out


def default_range_max(options: MiningOptions, max_positives: int) -> int:
    """ST's ``range_max`` default: room for positives, plus 10x the negatives when rules will drop some."""
    if (
        options.absolute_margin is not None
        or options.relative_margin is not None
        or options.max_score is not None
        or (options.cross_encoder and options.min_score is not None)
    ):
        return options.range_min + options.num_negatives * 10 + max_positives
    return options.range_min + options.num_negatives + max_positives


def validate_options(options: MiningOptions, max_positives: int | None = None) -> None:
    """Raise ValueError naming the option; range checks need ``range_max`` or ``max_positives``."""
    if options.output_format not in (*OUTPUT_FORMATS, "n-tuple-scores"):
        raise ValueError(
            f"invalid output_format {options.output_format!r}: must be one of {', '.join(OUTPUT_FORMATS)}"
        )
    if options.sampling_strategy not in SAMPLING_STRATEGIES:
        raise ValueError(
            f"invalid sampling_strategy {options.sampling_strategy!r}: must be one of "
            f"{', '.join(SAMPLING_STRATEGIES)}"
        )
    if options.num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got num_negatives={options.num_negatives}")
    if options.range_min < 0:
        raise ValueError(f"range_min must be non-negative, got range_min={options.range_min}")
    for name in ("absolute_margin", "relative_margin"):
        value = getattr(options, name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be non-negative, got {name}={value}")
    if options.max_positive_similarity is not None and not np.isfinite(options.max_positive_similarity):
        raise ValueError("max_positive_similarity must be a finite number")
    if (
        options.min_score is not None
        and options.max_score is not None
        and options.min_score > options.max_score
    ):
        raise ValueError(
            f"min_score must not exceed max_score, got min_score={options.min_score} and "
            f"max_score={options.max_score}: no candidate could be kept"
        )
    range_max = options.range_max
    if range_max is None and max_positives is not None:
        range_max = default_range_max(options, max_positives)
    if range_max is None:
        return
    if options.range_min >= range_max:
        raise ValueError(
            f"range_min must be smaller than range_max, got range_min={options.range_min} and "
            f"range_max={range_max}"
        )
    window = range_max - options.range_min
    if options.num_negatives > window:
        raise ValueError(
            f"cannot mine num_negatives={options.num_negatives} negatives per anchor: only {window} "
            f"candidates remain after skipping the first range_min={options.range_min} of "
            f"range_max={range_max}; decrease num_negatives or range_min, or increase range_max"
        )


def resolve_options(options: MiningOptions, max_positives: int) -> MiningOptions:
    """Validate and fill in what ST derives: ``range_max``, and the format forced by ``include_positives``."""
    validate_options(options, max_positives)
    changes: dict[str, Any] = {}
    if options.output_format == "n-tuple-scores":  # ST's deprecated alias
        changes.update(output_format="n-tuple", output_scores=True)
    if options.include_positives:
        changes["output_format"] = "n-tuple"
    if options.range_max is None:
        changes["range_max"] = default_range_max(options, max_positives)
    return dataclasses.replace(options, **changes)


def candidate_count(options: MiningOptions, max_positives: int, corpus_size: int) -> int:
    """How many ranked candidates per anchor the workers must return: exactly what ST retrieves."""
    range_max = (
        options.range_max if options.range_max is not None else default_range_max(options, max_positives)
    )
    return min(range_max + max_positives, corpus_size)


def rank_order(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts each row by descending score, then ascending corpus index (our tie
    rule; NaN/-inf last)."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    by_score = torch.argsort(
        torch.nan_to_num(torch.gather(scores, 1, by_index), nan=-torch.inf),
        dim=1,
        descending=True,
        stable=True,
    )
    return torch.gather(by_index, 1, by_score)


def rank_candidates(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by descending score, then ascending corpus index (our tie rule; NaN/-inf last)."""
    order = rank_order(scores, indices)
    return torch.gather(scores, 1, order), torch.gather(indices, 1, order)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Finalizer of splitmix64 over uint64 arrays (wrapping arithmetic): a cheap, well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _random_keys(seed: int, anchor_ids: np.ndarray, corpus_ids: np.ndarray) -> np.ndarray:
    """Key per (anchor, candidate): depends only on seed, global anchor position and corpus index."""
    base = _splitmix64(np.asarray([seed & _MASK64], dtype=np.uint64))
    a = _splitmix64(base ^ anchor_ids.astype(np.uint64))
    return _splitmix64(a[:, None] ^ corpus_ids.astype(np.uint64))


def select_negatives(
    candidate_scores: np.ndarray | torch.Tensor,
    candidate_indices: np.ndarray | torch.Tensor,
    positive_indices: Sequence[np.ndarray | Sequence[int]],
    positive_scores: Sequence[np.ndarray | Sequence[float]],
    options: MiningOptions,
    max_positives: int,
    anchor_offset: int = 0,
    *,
    duplicates: np.ndarray | None = None,
    positive_similarity: np.ndarray | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
    samples: int = 0,
) -> MinedBlock:
    """Apply the rules to one block of anchors; see the module docstring for the exact semantics.

    ``candidate_scores``/``candidate_indices``: [n_anchors, m] global top-m candidates per anchor, any
    order, index -1 = padding, m >= :func:`candidate_count`. With cross-encoder rescoring, pass exactly
    the bi-encoder's top ``k`` with the cross-encoder's scores. ``positive_indices``/``positive_scores``:
    per anchor, its distinct positives (:attr:`PairGroups.positive_indices`) and their scores (the
    cross-encoder's when rescoring). ``options`` must be resolved (:func:`resolve_options`).
    ``anchor_offset``: global position of the block's first anchor (keys of the random draw).
    ``duplicates`` (bool) and ``positive_similarity`` (float), aligned with the candidates: the inputs of
    the ``exclude_duplicates`` and ``max_positive_similarity`` rules. ``extras``: other [n, m] arrays
    aligned with the candidates whose values at the kept negatives come back in ``MinedBlock.extras``.
    ``samples``: how many dropped candidates per rule to keep as examples.
    """
    if options.range_max is None:
        raise ValueError(
            "options must be resolved (resolve_options) before select_negatives: range_max is None"
        )
    scores = torch.as_tensor(candidate_scores).to(torch.float32).clone()
    indices = torch.as_tensor(candidate_indices).to(torch.int64)
    if scores.dim() != 2 or scores.shape != indices.shape:
        raise ValueError(
            f"candidate scores {tuple(scores.shape)} and indices {tuple(indices.shape)} must match [n, m]"
        )
    n = scores.shape[0]
    if len(positive_indices) != n or len(positive_scores) != n:
        raise ValueError(f"{n} anchors in the block but {len(positive_indices)} positive lists")
    aligned: dict[str, torch.Tensor] = {}
    for name, values in (
        ("duplicates", duplicates),
        ("positive_similarity", positive_similarity),
        *((f"extra:{k}", v) for k, v in (extras or {}).items()),
    ):
        if values is not None:
            tensor = torch.as_tensor(np.asarray(values))
            if tensor.shape != scores.shape:
                raise ValueError(
                    f"{name} {tuple(tensor.shape)} must match the candidates {tuple(scores.shape)}"
                )
            aligned[name] = tensor
    stats = MiningStats(anchors=n)
    if n == 0:
        return MinedBlock([], [], stats, {k: [] for k in extras or {}}, {})

    order = rank_order(scores, indices)
    k = options.range_max + max_positives
    order = order[:, :k]
    scores, indices = torch.gather(scores, 1, order), torch.gather(indices, 1, order)
    aligned = {name: torch.gather(values, 1, order) for name, values in aligned.items()}
    stats.candidates = scores.numel()
    neg_inf = -torch.inf
    examples: dict[str, list[dict]] = {}

    def drop(rule: str, removed: torch.Tensor, also: str | None = None) -> None:
        stats.dropped[rule] = int(removed.sum())
        if samples and stats.dropped[rule]:
            rows, cols = np.nonzero(removed.numpy())
            picked = []
            for r, c in zip(rows[:samples].tolist(), cols[:samples].tolist(), strict=True):
                entry = {
                    "anchor": anchor_offset + r,
                    "candidate": int(indices[r, c]),
                    "score": float(scores[r, c]),
                }
                if also is not None:
                    entry[also] = float(aligned[also][r, c])
                picked.append(entry)
            examples[rule] = picked
        scores[removed] = neg_inf

    padding = (indices < 0) | torch.isnan(scores)
    scores[padding] = neg_inf
    stats.padding = int(padding.sum())

    pos_idx = [torch.as_tensor(np.asarray(p, dtype=np.int64)) for p in positive_indices]
    if any(p.numel() == 0 for p in pos_idx):
        raise ValueError("every anchor needs at least one positive")
    width = max(p.numel() for p in pos_idx)
    pos_matrix = torch.full((n, width), -2, dtype=torch.int64)
    for row, p in enumerate(pos_idx):
        pos_matrix[row, : p.numel()] = p
    is_positive = (indices[:, :, None] == pos_matrix[:, None, :]).any(-1) & ~padding
    if not options.include_positives:
        drop("positives", is_positive)

    finite = torch.isfinite(scores)
    if "duplicates" in aligned:
        drop("exclude_duplicates", aligned["duplicates"].to(torch.bool) & finite & ~is_positive)
    if options.max_positive_similarity is not None:
        if "positive_similarity" not in aligned:
            raise ValueError("max_positive_similarity needs the candidates' positive_similarity")
        close = aligned["positive_similarity"].to(torch.float32) >= options.max_positive_similarity
        drop("max_positive_similarity", close & torch.isfinite(scores) & ~is_positive, "positive_similarity")

    if options.absolute_margin is not None or options.relative_margin is not None:
        # ST: "use the _minimum_ positive score (i.e., harder positive) for the margin".
        p = torch.stack([torch.as_tensor(np.asarray(s, dtype=np.float32)).min() for s in positive_scores])
        if options.absolute_margin is not None:
            drop("absolute_margin", scores + options.absolute_margin > p[:, None])
        if options.relative_margin is not None:
            # |p| * margin rather than p * (1 - margin), which is wrong for negative p (ST #3819).
            drop("relative_margin", scores > (p - p.abs() * options.relative_margin)[:, None])
    if options.max_score is not None:
        drop("max_score", scores > options.max_score)
    if options.min_score is not None:
        drop("min_score", (scores < options.min_score) & torch.isfinite(scores))

    # Re-rank survivors (stable: equal scores keep the canonical index order), keep the window.
    window = torch.argsort(scores, dim=1, descending=True, stable=True)[:, : options.range_max]
    window = window[:, options.range_min :]
    scores = torch.gather(scores, 1, window)
    indices = torch.gather(indices, 1, window)
    kept_extras = {
        name.removeprefix("extra:"): torch.gather(values, 1, window)
        for name, values in aligned.items()
        if name.startswith("extra:")
    }
    finite = torch.isfinite(scores)

    num = options.num_negatives
    if options.sampling_strategy == "top" or scores.shape[1] <= num:
        keep = finite.clone()
        keep[:, num:] = False
    else:
        anchor_ids = np.arange(anchor_offset, anchor_offset + n, dtype=np.int64)
        keys = _random_keys(options.seed, anchor_ids, indices.clamp(min=0).numpy())
        keys[~finite.numpy()] = np.iinfo(np.uint64).max  # never drawn while a finite candidate is left
        chosen = np.argsort(keys, axis=1, kind="stable")[:, :num]
        keep_np = np.zeros(keys.shape, dtype=bool)
        np.put_along_axis(keep_np, chosen, True, axis=1)
        keep = torch.from_numpy(keep_np) & finite

    scores_np = scores.numpy()
    indices_np = indices.numpy()
    keep_np = keep.numpy()
    neg_idx = [indices_np[r][keep_np[r]].copy() for r in range(n)]
    neg_scores = [scores_np[r][keep_np[r]].copy() for r in range(n)]
    out_extras = {
        name: [values.numpy()[r][keep_np[r]].copy() for r in range(n)] for name, values in kept_extras.items()
    }
    stats.negatives = int(keep_np.sum())
    stats.short_anchors = int((keep_np.sum(1) < num).sum())
    return MinedBlock(neg_idx, neg_scores, stats, out_extras, examples)


# -- grouping from hashes, without the texts ------------------------------------------------------------


def first_appearance(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``hashes`` ([n, 2] uint64: a 128-bit hash per row) in order of first appearance.

    Returns ``(ids, firsts)``: ``ids[r]`` is row r's distinct-value number (0 for the first value seen,
    ...), ``firsts[i]`` the row where value i first appears (ascending). Exactly ``dict.fromkeys`` order.
    """
    hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1, 2)
    n = len(hashes)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))  # stable: equal hashes stay in row order
    sorted_hashes = hashes[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = (sorted_hashes[1:] != sorted_hashes[:-1]).any(axis=1)
    del sorted_hashes
    group = np.cumsum(starts) - 1  # group number of each sorted row
    first_rows = order[starts]  # the first (smallest) row of each group
    rank = np.empty(len(first_rows), dtype=np.int64)
    by_row = np.argsort(first_rows, kind="stable")
    rank[by_row] = np.arange(len(first_rows), dtype=np.int64)
    ids = np.empty(n, dtype=np.int64)
    ids[order] = rank[group]
    return ids, first_rows[by_row].astype(np.int64)


def positive_lists(anchor_ids: np.ndarray, positive_ids: np.ndarray, n_anchors: int) -> tuple:
    """Per anchor, its distinct positives in row order (ST's ``positive_indices``), as CSR arrays.

    Returns ``(ptr, idx, max_positives)``: anchor a's positives are ``idx[ptr[a]:ptr[a + 1]]``;
    ``max_positives`` is the most rows for one anchor, duplicates included (ST's ``groupby.count``).
    """
    anchor_ids = np.asarray(anchor_ids, dtype=np.int64)
    positive_ids = np.asarray(positive_ids, dtype=np.int64)
    rows = np.arange(len(anchor_ids), dtype=np.int64)
    order = np.lexsort((rows, positive_ids, anchor_ids))
    a, p = anchor_ids[order], positive_ids[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (p[1:] != p[:-1])
    kept_rows = order[first]
    del a, p, first
    kept_rows = kept_rows[np.lexsort((kept_rows, anchor_ids[kept_rows]))]
    counts = np.bincount(anchor_ids[kept_rows], minlength=n_anchors)
    ptr = np.zeros(n_anchors + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    rows_per_anchor = np.bincount(anchor_ids, minlength=n_anchors)
    return ptr, positive_ids[kept_rows], int(rows_per_anchor.max()) if len(rows_per_anchor) else 0
