"""The command line: a YAML spec and the same flags make the same job; bad specs fail in one line
naming the field (exit code 2, no traceback); `embedpipe inspect` says what the encoder will do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.io.dataset import PLAN_FILE, embeddings_of, read_dataset
from tests.support.tiny_models import real_model_path

ROOT = Path(__file__).resolve().parents[1]
EMBEDPIPE = Path(sys.executable).parent / "embedpipe"


def summary_from(stdout: str) -> dict:
    """The JSON summary `embedpipe embed` prints last on stdout."""
    start = stdout.rindex('{\n  "output"')
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


@pytest.fixture
def corpus_texts() -> list[str]:
    words = str.split("the quick brown fox jumps over a lazy dog while python and perl packages install")
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) for i in range(20)]


def test_spec_file_and_flags_make_the_same_job(ray_local, tiny_model_dir, corpus_texts, tmp_path, capsys) -> None:
    """The spec run writes the output; the flags run on the same output is accepted as the same job (same
    model, columns, options and shards) and finds every shard done. The output shows each option took."""
    texts = corpus_texts
    texts[3] = None
    corpus = tmp_path / "in"
    corpus.mkdir()
    for name, rows in (("a", range(0, 12)), ("b", range(12, 20))):
        pq.write_table(pa.table({
            "doc": [f"doc-{i}" for i in rows], "body": [texts[i] for i in rows],
            "lang": ["en"] * len(rows), "extra": list(rows), "unused": [0] * len(rows),
        }), corpus / f"{name}.parquet", row_group_size=5)
    output = tmp_path / "out"
    spec = {
        "model": str(tiny_model_dir),
        "input": str(corpus / "*.parquet"),  # a string; the flags give a list
        "output": str(output),
        "text_column": "body",
        "id_column": "doc",
        "keep_columns": ["lang", "extra"],
        "rows_per_shard": 5,
        "precision": "float16",
        "on_null": "skip",
        "max_attempts": 2,
        "workers": 1,
        "progress": False,
        "storage_option": ["auto_mkdir=true"],
    }
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["embed", "--spec", str(spec_file)]) == 0
    from_spec = summary_from(capsys.readouterr().out)

    flags = [
        "embed", "--model", str(tiny_model_dir), "--input", str(corpus / "a.parquet"), str(corpus / "b.parquet"),
        "--output", str(output), "--text-column", "body", "--id-column", "doc", "--keep-columns", "lang,extra",
        "--rows-per-shard", "5", "--precision", "float16", "--on-null", "skip", "--max-attempts", "2",
        "--workers", "1", "--no-progress", "--storage-option", "auto_mkdir=true",
    ]
    assert main(flags) == 0
    from_flags = summary_from(capsys.readouterr().out)
    assert from_spec["shards"] == {"total": 5, "done": 5, "skipped": 0, "retried": 0}
    assert from_flags["shards"] == {"total": 5, "done": 0, "skipped": 5, "retried": 0}
    for key in ("rows", "skipped_rows", "tokens", "padded_token_ratio"):
        assert from_spec[key] == from_flags[key], key

    table = read_dataset(str(output))
    assert table.column_names == ["id", "embedding", "lang", "extra"]
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(20) if i != 3]
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    assert table.column("extra").to_pylist() == [i for i in range(20) if i != 3]
    plan = json.loads((output / PLAN_FILE).read_text())
    assert [(Path(s["url"]).name, s["row_start"], s["row_end"]) for s in plan["shards"]] == [
        ("a.parquet", 0, 5), ("a.parquet", 5, 10), ("a.parquet", 10, 12), ("b.parquet", 0, 5), ("b.parquet", 5, 8)]
    assert plan["metadata"]["precision"] == "float16" and plan["metadata"]["text_column"] == "body"
    assert np.isfinite(embeddings_of(table).astype(np.float32)).all()


def test_unknown_spec_key_exits_2_naming_it(tmp_path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump({"model": "m", "input": "x.parquet", "output": "out",
                                         "text_colum": "body"}))
    result = subprocess.run([str(EMBEDPIPE), "embed", "--spec", str(spec_file)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "text_colum" in result.stderr and "unknown key" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("values, field", [
    ({"rows_per_shard": "many"}, "rows_per_shard"),
    ({"precision": "int4"}, "precision"),
    ({"on_null": "drop"}, "on_null"),
    ({"keep_columns": {"a": 1}}, "keep_columns"),
    ({"model": None}, "model"),
])
def test_bad_spec_values_name_the_field(tmp_path, capsys, values, field) -> None:
    spec = {"model": "m", "input": ["x.parquet"], "output": "out", **values}
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["embed", "--spec", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embedpipe embed: error: ") and field in err and "Traceback" not in err


def test_inspect_packaged_model(capsys) -> None:
    model = real_model_path()
    assert main(["inspect", str(model)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert lines["pooling"].strip() == "mean"
    assert lines["normalized"].strip() == "True"
    assert lines["dim"].strip() == "384"
    assert lines["similarity_fn_name"].strip() == "cosine"
    assert lines["max_seq_length"].strip() == "256"

    assert main(["inspect", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["pooling"], info["normalized"], info["dim"], info["similarity_fn_name"]) == (
        ["mean"], True, 384, "cosine")
