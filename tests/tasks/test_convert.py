"""`embedpipe convert`: mining outputs between ST's triplet / n-tuple and labeled-pair layouts.

The main input is a real mine output (the tiny random model on synthetic pairs, one local Ray cluster
for the module), several parts, anchors with up to three positives. Conversions must round-trip
(triplet -> labeled-pair -> triplet is the identity), match ``training_formats.to_labeled_pair`` /
``to_triplet`` on the whole table, commit part files and ``.embedpipe/SUCCESS`` to local disk or S3, and refuse
bad input with exit code 2 before writing anything.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.io.training_formats import build_table, to_labeled_pair, to_triplet
from pipeline.spec import ConvertSpec, MineSpec, SpecError, build_spec
from pipeline.tasks.convert import ConvertError, run_convert
from pipeline.tasks.mine import run_mine
from tests.support.s3server import option_flags

A, P = "question", "answer"
WORDS = str.split(
    "list array file directory manual page question answer install package remove duplicate elements "
    "indentation statements grep searches patterns line python perl debian kernel module network socket "
    "user group permission shell script variable loop function return value error message log"
)


def quiet(_message: str) -> None:
    pass


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The mining runs here use the session's local Ray cluster."""


@pytest.fixture(scope="module")
def mined(ray_cluster, tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A triplet mine output: 30 anchors (every fifth with three positives), 3 parts."""
    rng = random.Random(5)
    rows = []
    for i in range(30):
        anchor = f"{sentence(rng, 6)} {i}?"
        for j in range(3 if i % 5 == 0 else 1):
            rows.append((anchor, f"{sentence(rng, 12)} {i}.{j}."))
    root = tmp_path_factory.mktemp("convert")
    pairs = root / "pairs.parquet"
    pq.write_table(pa.table({A: [r[0] for r in rows], P: [r[1] for r in rows]}), pairs)
    output = root / "mined"
    run_mine(
        build_spec(
            MineSpec,
            {
                "model": str(tiny_model_dir),
                "input": [str(pairs)],
                "output": str(output),
                "num_negatives": 3,
                "anchors_per_block": 10,
                "workers": 1,
                "progress": False,
            },
        ),
        log=quiet,
    )
    return output


def read_folder(root: Path) -> pa.Table:
    parts = sorted(root.glob("part-*.parquet"))
    assert parts and (root / ".embedpipe/SUCCESS").exists()
    return pa.concat_tables([pq.read_table(p) for p in parts])


def convert(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = cli.main(["convert", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def test_round_trip_on_a_mine_output(mined: Path, tmp_path: Path, capsys) -> None:
    triplets = read_folder(mined)
    assert triplets.column_names == [A, P, "negative"]
    code, summary, _ = convert(capsys, "--to", "labeled-pair", str(mined), str(tmp_path / "pairs"))
    assert code == 0
    pairs = read_folder(tmp_path / "pairs")
    # Anchors never span mine parts, so the parts are converted one by one, one output part each.
    assert summary["streamed"] and summary["parts"] == summary["input_parts"] == 3
    assert summary["rows_in"] == triplets.num_rows and summary["rows_out"] == pairs.num_rows
    assert (summary["anchor_column"], summary["positive_column"]) == (A, P)
    assert pairs.schema == pa.schema([(A, pa.string()), (P, pa.string()), ("label", pa.int64())])
    assert pairs.equals(to_labeled_pair(triplets, A, P))
    # label 1 for each distinct positive, 0 for each distinct negative, per anchor.
    for anchor in set(triplets.column(A).to_pylist()):
        rows = [r for r in triplets.to_pylist() if r[A] == anchor]
        got = [(r[P], r["label"]) for r in pairs.to_pylist() if r[A] == anchor]
        expected = [(p, 1) for p in dict.fromkeys(r[P] for r in rows)]
        expected += [(n, 0) for n in dict.fromkeys(r["negative"] for r in rows)]
        assert got == expected

    code, summary, _ = convert(capsys, "--to", "triplet", str(tmp_path / "pairs"), str(tmp_path / "back"))
    assert code == 0 and summary["rows_out"] == triplets.num_rows
    back = read_folder(tmp_path / "back")
    assert back.equals(triplets) and back.schema == triplets.schema.remove_metadata()
    assert back.equals(to_triplet(pairs, A, P))

    # The output loads as a Hugging Face dataset.
    from datasets import load_dataset

    dataset = load_dataset(
        "parquet",
        data_files=[str(p) for p in sorted((tmp_path / "pairs").glob("part-*"))],
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert dataset.column_names == [A, P, "label"] and len(dataset) == pairs.num_rows


def test_n_tuple_file_and_anchors_spanning_parts(tmp_path: Path) -> None:
    common = dict(
        positive_scores=[[0.9, 0.8], [0.7], [0.6]],
        negative_scores=[[0.5, 0.4], [0.3, 0.2], [0.1, 0.0]],
        num_negatives=2,
        anchor_column="q",
        positive_column="d",
    )
    ntuple = build_table(
        "n-tuple",
        anchors=["a", "b", "c"],
        positives=[["p1", "p2"], ["p"], ["r"]],
        negatives=[["n1", "n2"], ["m1", "m2"], ["o1", "o2"]],
        **common,
    )
    # One Parquet file.
    pq.write_table(ntuple, tmp_path / "ntuple.parquet")
    summary = run_convert(
        build_spec(
            ConvertSpec,
            {
                "to": "labeled-pair",
                "input": str(tmp_path / "ntuple.parquet"),
                "output": str(tmp_path / "out1"),
            },
        ),
        log=quiet,
    )
    assert summary["parts"] == 1 and read_folder(tmp_path / "out1").equals(to_labeled_pair(ntuple, "q", "d"))
    # A folder whose parts split anchor "a": converted as one table, so "a" keeps all its rows together.
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(ntuple.slice(0, 1), folder / "part-00000.parquet")
    pq.write_table(ntuple.slice(1), folder / "part-00001.parquet")
    summary = run_convert(
        build_spec(
            ConvertSpec, {"to": "labeled-pair", "input": str(folder), "output": str(tmp_path / "out2")}
        ),
        log=quiet,
    )
    assert not summary["streamed"] and summary["parts"] == 1
    assert read_folder(tmp_path / "out2").equals(to_labeled_pair(ntuple, "q", "d"))


def test_scores_become_score_and_cannot_go_back(tmp_path: Path, capsys) -> None:
    table = build_table(
        "triplet",
        anchors=["a"],
        positives=[["p"]],
        positive_scores=[[0.9]],
        negatives=[["n1", "n2"]],
        negative_scores=[[0.5, 0.4]],
        num_negatives=2,
        output_scores=True,
        anchor_column="anchor",
        positive_column="positive",
    )
    pq.write_table(table, tmp_path / "t.parquet")
    code, _, _ = convert(
        capsys, "--to", "labeled-pair", str(tmp_path / "t.parquet"), str(tmp_path / "scored")
    )
    assert code == 0
    scored = read_folder(tmp_path / "scored")
    assert scored.column_names == ["anchor", "positive", "score"]
    assert scored.column("score").to_pylist() == [0.9, 0.5, 0.4]  # copied from the scores, never recomputed
    code, _, err = convert(capsys, "--to", "triplet", str(tmp_path / "scored"), str(tmp_path / "back"))
    assert code == 2 and "needs a 0/1 'label' column" in err and "cannot tell positives from negatives" in err
    assert not (tmp_path / "back").exists()


def test_writes_to_s3_with_storage_options(mined: Path, s3_bucket, capsys) -> None:
    endpoint = s3_bucket.storage_options["client_kwargs"]["endpoint_url"]
    options = [f"--storage-option={flag}" for flag in option_flags(endpoint)]
    target = s3_bucket.path("training", "pairs")
    code, summary, _ = convert(capsys, "--to", "labeled-pair", str(mined), target, *options)
    assert code == 0 and summary["parts"] == 3
    names = sorted(n.rsplit("/", 1)[-1] for n in s3_bucket.fs.ls(f"{s3_bucket.name}/training/pairs"))
    assert names == [
        ".embedpipe",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    with s3_bucket.fs.open(f"{s3_bucket.name}/training/pairs/part-00001.parquet", "rb") as handle:
        part = pq.read_table(handle)
    assert part.equals(to_labeled_pair(pq.read_table(mined / "part-00001.parquet"), A, P))
    # Back from S3 to S3.
    code, summary, _ = convert(
        capsys, "--to", "triplet", target, s3_bucket.path("training", "triplets"), *options
    )
    assert code == 0 and summary["rows_out"] == read_folder(mined).num_rows


def _labeled(tmp_path: Path, name: str, table: pa.Table) -> str:
    pq.write_table(table, tmp_path / name)
    return str(tmp_path / name)


def test_bad_input_fails_with_exit_code_2_and_writes_nothing(mined: Path, tmp_path: Path, capsys) -> None:
    pairs = _labeled(tmp_path, "pairs.parquet", pa.table({"q": ["a", "a"], "d": ["p", "n"], "label": [1, 0]}))
    triplet = _labeled(tmp_path, "triplet.parquet", pa.table({"q": ["a"], "d": ["p"], "negative": ["n"]}))
    bad_labels = _labeled(
        tmp_path, "labels.parquet", pa.table({"q": ["a", "a"], "d": ["p", "n"], "label": [1, 2]})
    )
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / ".embedpipe").mkdir()
    for name in ("part-00000.parquet", ".embedpipe/plan.json"):
        (incomplete / name).write_bytes((mined / name).read_bytes())
    complete = tmp_path / "complete"
    (complete / ".embedpipe").mkdir(parents=True)
    (complete / ".embedpipe/SUCCESS").write_bytes(b"")
    cases = [
        (
            ["--to", "labeled-pair", pairs],
            "not a triplet or n-tuple table: no 'negative' or 'negative_<i>' column",
        ),
        (["--to", "triplet", triplet], "to make triplets the input needs a 0/1 'label' column"),
        (
            ["--to", "labeled-pair", "--anchor-column", "query", triplet],
            "missing anchor column 'query'; has q, d",
        ),
        (
            ["--to", "labeled-pair", "--positive-column", "q", triplet],
            "the anchor and positive columns must differ",
        ),
        (["--to", "triplet", bad_labels], "labels must be 0 or 1, found [2]"),
        (["--to", "labeled-pair", str(tmp_path / "missing.parquet")], "missing.parquet: not found"),
        (["--to", "labeled-pair", str(incomplete)], "an incomplete embedpipe output (no .embedpipe/SUCCESS)"),
    ]
    for number, (args, message) in enumerate(cases):
        output = tmp_path / f"out-{number}"
        code, _, err = convert(capsys, *args, str(output))
        assert code == 2, args
        assert err.startswith("embedpipe convert: error: ") and message in err, (args, err)
        assert not output.exists(), args
    # An output that already holds a complete result is not touched.
    code, _, err = convert(capsys, "--to", "labeled-pair", str(mined), str(complete))
    assert code == 2 and "already holds a complete output" in err
    assert sorted(str(p.relative_to(complete)) for p in complete.rglob("*")) == [
        ".embedpipe",
        ".embedpipe/SUCCESS",
    ]
    # Usage errors (a missing or bad --to, no output): exit code 2, from argparse or from the spec's check.
    for args in (
        ["convert", str(mined), str(tmp_path / "x")],
        ["convert", "--to", "pairs", str(mined), "x"],
        ["convert", "--to", "triplet", str(mined)],
    ):
        try:
            code = cli.main(args)
        except SystemExit as exit_info:
            code = exit_info.code
        assert code == 2, args
    with pytest.raises(SpecError, match="to: 'pairs' is not one of"):
        build_spec(ConvertSpec, {"to": "pairs", "input": "x", "output": "y"})
    with pytest.raises(ConvertError, match="not found"):
        run_convert(
            build_spec(ConvertSpec, {"to": "triplet", "input": str(tmp_path / "nope"), "output": "y"})
        )


def test_console_script(mined: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("embedpipe")
    if not script.exists():
        pytest.skip("the embedpipe console script is not installed in this environment")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    ok = subprocess.run(
        [str(script), "convert", "--to", "labeled-pair", str(mined), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rows_out"] == read_folder(tmp_path / "out").num_rows
    bad = subprocess.run(
        [str(script), "convert", "--to", "triplet", str(mined), str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "needs a 0/1 'label' column" in bad.stderr
    assert not (tmp_path / "bad").exists()
