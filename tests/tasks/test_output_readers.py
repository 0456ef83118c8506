"""Every output opens as it is with the usual readers: HF datasets, pandas, pyarrow, Ray Data, DuckDB and
Polars, each giving exactly the rows embedpipe committed (its bookkeeping hidden in ``.embedpipe/``).

The outputs are made by the jobs themselves (embed, dedup, mine with saved candidates, so hidden Parquet
files sit beside the data too). DuckDB and Polars take a glob, as their documentation says for a folder.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.dataset import read_dataset
from pipeline.spec import DedupSpec, MineSpec, build_spec
from pipeline.tasks.dedup import run_dedup
from pipeline.tasks.dedup.source import DedupError
from pipeline.tasks.mine import run_mine
from tests.tasks.test_embed import embed, make_texts


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def outputs(ray_local, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readers")
    texts = make_texts(40, seed=11)
    texts += texts[:6]  # byte-identical copies: dedup removes them
    corpus = root / "corpus.parquet"
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts}), corpus)
    embed(tiny_model_dir, corpus, root / "embed", rows_per_shard=15)
    run_dedup(
        build_spec(
            DedupSpec,
            {
                "input": [str(root / "embed")],
                "output": str(root / "dedup"),
                "threshold": 0.999,
                "progress": False,
            },
        ),
        log=quiet,
    )
    pairs = root / "pairs.parquet"
    pq.write_table(pa.table({"question": texts[:30], "answer": texts[10:40]}), pairs)
    mine = {
        "model": str(tiny_model_dir),
        "input": [str(pairs)],
        "output": str(root / "mine"),
        "anchors_per_block": 12,
        "save_candidates": True,
        "output_scores": True,
        "workers": 1,
        "progress": False,
    }
    run_mine(build_spec(MineSpec, mine), log=quiet)
    run_dedup(
        build_spec(
            DedupSpec,
            {
                "input": [str(corpus)],
                "model": str(tiny_model_dir),
                "output": str(root / "dedup-raw"),
                "threshold": 0.999,
                "with_text": True,
                "progress": False,
            },
        ),
        log=quiet,
    )
    return {
        "corpus": corpus,
        "dedup-raw": root / "dedup-raw",
        "embed": root / "embed",
        "dedup kept/": root / "dedup" / "kept",
        "dedup pairs/": root / "dedup" / "pairs",
        "dedup duplicates.parquet": root / "dedup" / "duplicates.parquet",
        "mine": root / "mine",
    }


def committed_rows(path: Path) -> pa.Table:
    """What embedpipe committed: the visible parts (or the one file), read by pyarrow file by file."""
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def with_hf(path: Path, cache: Path) -> pa.Table:
    import datasets

    if path.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(cache))
    else:
        ds = datasets.load_dataset("parquet", data_dir=str(path), split="train", cache_dir=str(cache))
    return ds.data.table


def with_pandas(path: Path, _cache: Path) -> pa.Table:
    import pandas as pd

    return pa.Table.from_pandas(pd.read_parquet(path), preserve_index=False)


def with_pyarrow(path: Path, _cache: Path) -> pa.Table:
    import pyarrow.dataset as ds

    return ds.dataset(path, format="parquet").to_table()


def with_ray(path: Path, _cache: Path) -> pa.Table:
    import ray

    return pa.Table.from_pylist(ray.data.read_parquet(str(path)).take_all())


def with_duckdb(path: Path, _cache: Path) -> pa.Table:
    import duckdb

    target = str(path) if path.is_file() else f"{path}/*.parquet"
    result = duckdb.connect().execute(f"select * from read_parquet('{target}')")
    return (getattr(result, "to_arrow_table", None) or result.fetch_arrow_table)()  # DuckDB 2 renamed it


def with_polars(path: Path, _cache: Path) -> pa.Table:
    import polars

    return polars.read_parquet(str(path) if path.is_file() else f"{path}/*.parquet").to_arrow()


READERS = {
    "datasets": with_hf,
    "pandas": with_pandas,
    "pyarrow": with_pyarrow,
    "ray": with_ray,
    "duckdb": with_duckdb,
    "polars": with_polars,
}
OUTPUTS = ["embed", "dedup kept/", "dedup pairs/", "dedup duplicates.parquet", "mine"]


def canonical(table: pa.Table) -> list[tuple]:
    """The rows as sorted tuples of plain values, columns in name order (readers may reorder rows)."""
    names = sorted(table.column_names)
    columns = [table.column(n).to_pylist() for n in names]
    return sorted(zip(*columns, strict=True), key=repr)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("reader", READERS)
def test_output_opens_with_reader(outputs: dict[str, Path], tmp_path: Path, output: str, reader: str) -> None:
    path = outputs[output]
    want = committed_rows(path)
    assert want.num_rows > 0, f"{output}: nothing to read"
    got = READERS[reader](path, tmp_path / "cache")
    assert sorted(got.column_names) == sorted(want.column_names), f"{reader} on {output}"
    assert canonical(got) == canonical(want), f"{reader} on {output}: other rows"


def test_visible_files_are_the_data(outputs: dict[str, Path]) -> None:
    """Only data files are visible; the bookkeeping (and mine's report, scores, candidates) is hidden."""
    for name in ("embed", "mine"):
        visible = sorted(p.name for p in outputs[name].iterdir() if not p.name.startswith("."))
        assert visible and all(v.startswith("part-") and v.endswith(".parquet") for v in visible), visible
    hidden = outputs["mine"] / ".embedpipe"
    assert {"SUCCESS", "manifest.json", "plan.json", "report.json", "candidates", "scores"} <= {
        p.name for p in hidden.iterdir()
    }
    embedded = read_dataset(str(outputs["embed"]), None)
    assert sorted(embedded.column("id").to_pylist()) == sorted(
        committed_rows(outputs["embed"]).column("id").to_pylist()
    )


def test_duplicates_with_text(outputs: dict[str, Path], tmp_path: Path) -> None:
    """``--with-text``: each removed row's text and its kept row's, as in the corpus."""
    corpus = pq.read_table(outputs["corpus"]).to_pylist()
    text_of = {row["id"]: row["text"] for row in corpus}
    duplicates = pq.read_table(outputs["dedup-raw"] / "duplicates.parquet").to_pylist()
    assert len(duplicates) == 6
    for row in duplicates:
        assert row["text"] == text_of[row["id"]] and row["kept_text"] == text_of[row["kept_id"]]
        assert row["text"] == row["kept_text"]  # the planted copies are byte-identical
    # An embed output that did not keep its texts: refused before any work, naming the part and the fix.
    spec = {
        "input": [str(outputs["embed"])],
        "output": str(tmp_path / "d"),
        "threshold": 0.9,
        "with_text": True,
    }
    with pytest.raises(
        DedupError, match=r"part-00000.parquet: no text column 'text' \(embed with --keep-columns text\)"
    ):
        run_dedup(build_spec(DedupSpec, {**spec, "progress": False}), log=quiet)
    assert not (tmp_path / "d").exists()
