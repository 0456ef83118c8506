"""Mining output tables with exactly the columns, types and row order of ST's ``mine_hard_negatives``.

Input is one block of anchors, already grouped the ST way (distinct anchors in first-appearance order;
per anchor its distinct positives in row order with their scores, and its kept negatives in rank order
with their scores; see ``pipeline.compute.negatives``). Every format keeps an anchor's rows together and
in anchor order, so the tables of consecutive blocks concatenate to the whole-dataset table.

Formats (``A``/``P``: the input's anchor/positive column names; scores are float64 holding the float32
values; text columns are ``string``):

* ``triplet``: ``A, P, negative`` (+ ``scores: list<double>`` = [positive, negative]). One row per
  anchor x positive x kept negative, positive-major; an anchor without negatives has no rows.
* ``n-tuple``: ``A, P, negative_1 .. negative_N`` (+ ``scores`` = [positive, n_1 .. n_N]). One row per
  anchor x positive, only when all N negatives were found; other anchors are dropped.
* ``labeled-pair``: ``A, P, label: int64`` or, with scores, ``A, P, score: double`` (no label). Per
  anchor: its positives (1 / score), then its kept negatives (0 / score), once per anchor, not per
  positive. Anchors without negatives keep their positive rows.
* ``labeled-list``: ``A, P: list<string>, labels: list<int64>`` or ``scores: list<double>``. One row per
  anchor x positive with at least one negative: [positive, *negatives], [1, 0, ...] or their scores.

One deliberate difference: for an empty result ST (``datasets``) infers ``null`` columns; we keep the
typed schema.

Conversions (pure pyarrow, no ``datasets``): :func:`to_labeled_pair` turns a triplet or n-tuple table
into ST's labeled-pair layout (grouped by anchor in first-appearance order; distinct positives with label
1, then distinct negatives with label 0, int64 as ST; a ``scores`` column becomes ``score``).
:func:`to_triplet` goes back: per anchor, every positive x every negative, positive-major, both in row
order, which is ST's triplet order, so triplet -> labeled-pair -> triplet is the identity on ST triplets.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
_SCORES = pa.list_(pa.float64())
Texts = Sequence[Sequence[str]]
Scores = Sequence[Sequence[float]]


def _check_names(anchor_column: str, positive_column: str, reserved: Sequence[str]) -> None:
    """ST would silently overwrite a clashing column; refuse instead."""
    if anchor_column == positive_column:
        raise ValueError(f"anchor and positive columns must differ, both are {anchor_column!r}")
    for name in (anchor_column, positive_column):
        if name in reserved:
            raise ValueError(
                f"column name {name!r} clashes with an output column of this format: {list(reserved)}"
            )


def build_table(
    output_format: str,
    *,
    anchors: Sequence[str],
    positives: Sequence[Sequence[str]],
    positive_scores: Sequence[Sequence[float]],
    negatives: Sequence[Sequence[str]],
    negative_scores: Sequence[Sequence[float]],
    num_negatives: int,
    output_scores: bool = False,
    anchor_column: str = "anchor",
    positive_column: str = "positive",
) -> pa.Table:
    """One block's mining output in ST's layout for ``output_format`` (see the module docstring)."""
    n = len(anchors)
    if not (len(positives) == len(positive_scores) == len(negatives) == len(negative_scores) == n):
        raise ValueError("anchors, positives, positive_scores, negatives and negative_scores must align")
    if output_format == "triplet":
        return _triplet(
            anchors,
            positives,
            positive_scores,
            negatives,
            negative_scores,
            output_scores,
            anchor_column,
            positive_column,
        )
    if output_format == "n-tuple":
        return _n_tuple(
            anchors,
            positives,
            positive_scores,
            negatives,
            negative_scores,
            num_negatives,
            output_scores,
            anchor_column,
            positive_column,
        )
    if output_format == "labeled-pair":
        return _labeled_pair(
            anchors,
            positives,
            positive_scores,
            negatives,
            negative_scores,
            output_scores,
            anchor_column,
            positive_column,
        )
    if output_format == "labeled-list":
        return _labeled_list(
            anchors,
            positives,
            positive_scores,
            negatives,
            negative_scores,
            output_scores,
            anchor_column,
            positive_column,
        )
    raise ValueError(f"invalid output_format {output_format!r}: must be one of {', '.join(FORMATS)}")


def _floats(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


def _triplet(
    anchors: Sequence[str],
    positives: Texts,
    pos_scores: Scores,
    negatives: Texts,
    neg_scores: Scores,
    output_scores: bool,
    a_col: str,
    p_col: str,
) -> pa.Table:
    _check_names(a_col, p_col, ("negative", "scores") if output_scores else ("negative",))
    cols: dict[str, list] = {a_col: [], p_col: [], "negative": [], "scores": []}
    for anchor, pos, ps, neg, ns in zip(anchors, positives, pos_scores, negatives, neg_scores, strict=True):
        for p_text, p_score in zip(pos, ps, strict=True):
            for n_text, n_score in zip(neg, ns, strict=True):
                cols[a_col].append(anchor)
                cols[p_col].append(p_text)
                cols["negative"].append(n_text)
                cols["scores"].append([float(p_score), float(n_score)])
    fields = [pa.field(a_col, pa.string()), pa.field(p_col, pa.string()), pa.field("negative", pa.string())]
    if output_scores:
        fields.append(pa.field("scores", _SCORES))
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in fields}, schema=pa.schema(fields))


def _n_tuple(
    anchors: Sequence[str],
    positives: Texts,
    pos_scores: Scores,
    negatives: Texts,
    neg_scores: Scores,
    num_negatives: int,
    output_scores: bool,
    a_col: str,
    p_col: str,
) -> pa.Table:
    neg_names = [f"negative_{i}" for i in range(1, num_negatives + 1)]
    _check_names(a_col, p_col, [*neg_names, "scores"] if output_scores else neg_names)
    cols: dict[str, list] = {name: [] for name in (a_col, p_col, *neg_names, "scores")}
    for anchor, pos, ps, neg, ns in zip(anchors, positives, pos_scores, negatives, neg_scores, strict=True):
        if len(neg) < num_negatives:  # ST keeps only rows where all num_negatives were found
            continue
        for p_text, p_score in zip(pos, ps, strict=True):
            cols[a_col].append(anchor)
            cols[p_col].append(p_text)
            for name, n_text in zip(neg_names, neg, strict=True):
                cols[name].append(n_text)
            cols["scores"].append([float(p_score), *_floats(ns[:num_negatives])])
    fields = [pa.field(name, pa.string()) for name in (a_col, p_col, *neg_names)]
    if output_scores:
        fields.append(pa.field("scores", _SCORES))
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in fields}, schema=pa.schema(fields))


def _labeled_pair(
    anchors: Sequence[str],
    positives: Texts,
    pos_scores: Scores,
    negatives: Texts,
    neg_scores: Scores,
    output_scores: bool,
    a_col: str,
    p_col: str,
) -> pa.Table:
    value_col, value_type = ("score", pa.float64()) if output_scores else ("label", pa.int64())
    _check_names(a_col, p_col, (value_col,))
    cols: dict[str, list] = {a_col: [], p_col: [], value_col: []}
    for anchor, pos, ps, neg, ns in zip(anchors, positives, pos_scores, negatives, neg_scores, strict=True):
        for text, score, label in [
            *zip(pos, ps, [1] * len(pos), strict=True),
            *zip(neg, ns, [0] * len(neg), strict=True),
        ]:
            cols[a_col].append(anchor)
            cols[p_col].append(text)
            cols[value_col].append(float(score) if output_scores else label)
    fields = [pa.field(a_col, pa.string()), pa.field(p_col, pa.string()), pa.field(value_col, value_type)]
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in fields}, schema=pa.schema(fields))


def _labeled_list(
    anchors: Sequence[str],
    positives: Texts,
    pos_scores: Scores,
    negatives: Texts,
    neg_scores: Scores,
    output_scores: bool,
    a_col: str,
    p_col: str,
) -> pa.Table:
    value_col, value_type = ("scores", _SCORES) if output_scores else ("labels", pa.list_(pa.int64()))
    _check_names(a_col, p_col, (value_col,))
    cols: dict[str, list] = {a_col: [], p_col: [], value_col: []}
    for anchor, pos, ps, neg, ns in zip(anchors, positives, pos_scores, negatives, neg_scores, strict=True):
        if len(neg) == 0:  # ST drops rows without any negative
            continue
        for p_text, p_score in zip(pos, ps, strict=True):
            cols[a_col].append(anchor)
            cols[p_col].append([p_text, *neg])
            cols[value_col].append([float(p_score), *_floats(ns)] if output_scores else [1] + [0] * len(neg))
    fields = [
        pa.field(a_col, pa.string()),
        pa.field(p_col, pa.list_(pa.string())),
        pa.field(value_col, value_type),
    ]
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in fields}, schema=pa.schema(fields))


def _group(anchors: list, items: list[tuple]) -> dict:
    """Anchor -> {text: score} of its distinct texts (first occurrence wins); anchors in first-seen order."""
    groups: dict = {}
    for anchor, (text, score) in zip(anchors, items, strict=True):
        groups.setdefault(anchor, {}).setdefault(text, score)
    return groups


def to_labeled_pair(table: pa.Table, anchor_col: str, positive_col: str) -> pa.Table:
    """Triplet or n-tuple table -> ST labeled-pair layout: label 1 per positive, 0 per negative, per anchor.

    With a ``scores`` column the result carries ``score`` (as ST's ``output_scores=True``) instead of
    ``label``. Anchors without negatives have no rows in triplet/n-tuple input, so they have none here either.
    """
    names = table.column_names
    for col in (anchor_col, positive_col):
        if col not in names:
            raise ValueError(f"column {col!r} not in table columns {names}")
    if "negative" in names:
        neg_cols = ["negative"]
    else:
        neg_cols = sorted(
            (c for c in names if c.startswith("negative_") and c[9:].isdigit()), key=lambda c: int(c[9:])
        )
    if not neg_cols:
        raise ValueError(f"not a triplet or n-tuple table: no 'negative' or 'negative_<i>' column in {names}")
    with_scores = "scores" in names
    rows = table.num_rows
    anchors = table.column(anchor_col).to_pylist()
    scores = table.column("scores").to_pylist() if with_scores else [None] * rows
    positives = _group(
        anchors,
        [
            (p, s[0] if s else None)
            for p, s in zip(table.column(positive_col).to_pylist(), scores, strict=True)
        ],
    )
    neg_items_anchors: list = []
    neg_items: list[tuple] = []
    neg_values = [table.column(c).to_pylist() for c in neg_cols]
    for r in range(rows):
        for j, values in enumerate(neg_values):
            neg_items_anchors.append(anchors[r])
            neg_items.append((values[r], scores[r][j + 1] if with_scores else None))
    negatives = _group(neg_items_anchors, neg_items)
    value_col, value_type = ("score", pa.float64()) if with_scores else ("label", pa.int64())
    out: dict[str, list] = {anchor_col: [], positive_col: [], value_col: []}
    for anchor, pos in positives.items():
        for text, score in pos.items():
            out[anchor_col].append(anchor)
            out[positive_col].append(text)
            out[value_col].append(score if with_scores else 1)
        for text, score in negatives.get(anchor, {}).items():
            out[anchor_col].append(anchor)
            out[positive_col].append(text)
            out[value_col].append(score if with_scores else 0)
    fields = [
        pa.field(anchor_col, pa.string()),
        pa.field(positive_col, pa.string()),
        pa.field(value_col, value_type),
    ]
    return pa.table({f.name: pa.array(out[f.name], f.type) for f in fields}, schema=pa.schema(fields))


def to_triplet(table: pa.Table, anchor_col: str, positive_col: str, label_col: str = "label") -> pa.Table:
    """Labeled pairs -> triplets: per anchor, every positive (label 1) x every negative (label 0), in order.

    Pairing is positive-major with both sides in row order (ST's triplet order); anchors lacking a
    positive or a negative produce no rows. A ``score``-only table (ST's labeled-pair with scores) cannot
    say which rows are positives, so it is refused.
    """
    names = table.column_names
    for col in (anchor_col, positive_col):
        if col not in names:
            raise ValueError(f"column {col!r} not in table columns {names}")
    if label_col not in names:
        raise ValueError(
            f"to_triplet needs a binary {label_col!r} column (1 = positive, 0 = negative); table has {names}"
        )
    labels = table.column(label_col).to_pylist()
    bad = sorted({v for v in labels if v not in (0, 1)}, key=repr)
    if bad:
        raise ValueError(f"labels must be 0 or 1, found {bad[:5]}")
    anchors = table.column(anchor_col).to_pylist()
    texts = table.column(positive_col).to_pylist()
    groups: dict = {}
    for anchor, text, label in zip(anchors, texts, labels, strict=True):
        pos, neg = groups.setdefault(anchor, ([], []))
        (pos if label == 1 else neg).append(text)
    out: dict[str, list] = {anchor_col: [], positive_col: [], "negative": []}
    for anchor, (pos, neg) in groups.items():
        for p_text in pos:
            for n_text in neg:
                out[anchor_col].append(anchor)
                out[positive_col].append(p_text)
                out["negative"].append(n_text)
    fields = [
        pa.field(anchor_col, pa.string()),
        pa.field(positive_col, pa.string()),
        pa.field("negative", pa.string()),
    ]
    return pa.table({f.name: pa.array(out[f.name], f.type) for f in fields}, schema=pa.schema(fields))
