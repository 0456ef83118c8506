"""Incremental re-embedding into a versioned snapshot store, end to end on the module's local Ray.

One full run of a 200-row corpus is made once (``first_run``) and copied into each test that needs a
store (locally, or onto the moto S3 server), so only three more runs start encoder actors: the local
delta run, and on S3 a full re-embed forced by another model and an int8 delta after it. Runs that only
delete rows, change kept columns, change nothing, or fail on the lock never touch Ray.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.corpus import CorpusError
from pipeline.io.dataset import MANIFEST_FILE, SUCCESS_FILE, embeddings_of, quantize, read_dataset
from pipeline.io.storage import create_exclusive
from pipeline.model import load_encoder
from pipeline.spec import ReembedSpec, SpecError, build_spec
from pipeline.tasks.reembed import (
    LATEST_FILE,
    LOCK_FILE,
    STAGING_DIR,
    LockHeld,
    latest_version_url,
    run_reembed,
)
from tests.support.float32 import forward_error
from tests.support.s3server import option_flags
from tests.support.tiny_models import build_tiny_model

N_ROWS = 200
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "kernel",
    "module",
    "python",
    "perl",
    "debian",
    "package",
    "manual",
    "fortune",
    "cookie",
    "why",
    "how",
    "does",
    "the",
    "list",
    "array",
    "file",
    "directory",
    "grep",
    "pattern",
    "line",
    "Fuchs",
    "renard",
    "東京",
    "Ünïcödé",
]


# --------------------------------------------------------------------------- helpers


def make_rows(ids: range, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "id": f"doc-{i:04d}",
            "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))),
            "url": f"https://example.org/{i}",
        }
        for i in ids
    ]


def corpus_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        rows, schema=pa.schema([("id", pa.string()), ("text", pa.string()), ("url", pa.string())])
    )


def write_corpus(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(corpus_table(rows), folder / "corpus.parquet", row_group_size=50)
    return folder


def edit(rows: list[dict], seed: int) -> tuple[list[dict], dict[str, set]]:
    """1% of the texts changed, 1% of the rows deleted, 1% added; one kept value changed on an untouched row."""
    rows = [dict(r) for r in rows]
    changed = {rows[3]["id"], rows[150]["id"]}
    deleted = {rows[10]["id"], rows[120]["id"]}
    for row in rows:
        if row["id"] in changed:
            row["text"] += " (revised)"
    rows = [r for r in rows if r["id"] not in deleted]
    rows[40]["url"] = "https://example.org/moved"
    added = make_rows(range(9000, 9002), seed)
    return rows + added, {"changed": changed, "deleted": deleted, "new": {r["id"] for r in added}}


def spec_of(model: Path, corpus, store, **options) -> ReembedSpec:
    values = {
        "model": str(model),
        "input": [str(corpus)],
        "output": str(store),
        "keep_columns": ["url"],
        "rows_per_shard": 64,
        "workers": 1,
        "progress": False,
    }
    values.update(options)
    return build_spec(ReembedSpec, values)


def reembed(model: Path, corpus, store, **options) -> dict:
    return run_reembed(spec_of(model, corpus, store, **options), log=lambda _m: None)


def versions(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir() and p.name.startswith("v"))


def latest(store: Path) -> str:
    return json.loads((store / LATEST_FILE).read_text())["version"]


def by_id(table: pa.Table) -> dict[str, int]:
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids), "an id occurs more than once"
    return {value: row for row, value in enumerate(ids)}


def vectors(table: pa.Table, ids) -> np.ndarray:
    rows = by_id(table)
    return embeddings_of(table)[[rows[i] for i in ids]]


def expected_hash(text: str, prompt: str = "") -> str:
    return hashlib.sha256(prompt.encode() + b"\0" + text.encode()).hexdigest()


def assert_store_settled(store: Path) -> None:
    """After any run, finished or refused: no lock, no staging, _LATEST names a complete version."""
    assert not (store / LOCK_FILE).exists()
    assert not (store / STAGING_DIR).exists()
    assert (store / latest(store) / SUCCESS_FILE).exists()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path):
    return load_encoder(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("reembed-models") / "tiny-other", seed=7)


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(rows, store, summary) of one full run; tests copy the store rather than embed again."""
    base = tmp_path_factory.mktemp("reembed-first")
    rows = make_rows(range(N_ROWS), seed=0)
    store = base / "store"
    summary = reembed(tiny_model_dir, write_corpus(base / "corpus", rows), store)
    return rows, store, summary


@pytest.fixture
def store_copy(first_run, tmp_path: Path) -> tuple[list[dict], Path, Path]:
    """(rows, corpus folder, store) with a private copy of the first run's store and corpus."""
    rows, store, _ = first_run
    shutil.copytree(store, tmp_path / "store")
    return rows, write_corpus(tmp_path / "corpus", rows), tmp_path / "store"


# --------------------------------------------------------------------------- runs


def test_first_run_embeds_everything_into_v00001(first_run, encoder) -> None:
    rows, store, summary = first_run
    assert summary["version"] == "v00001" and summary["written"] and summary["full"]
    assert summary["reason"] == "no earlier version" and summary["previous"] is None
    assert (summary["rows"], summary["new"], summary["embedded"], summary["embed"]["rows"]) == (N_ROWS,) * 4
    assert (summary["changed"], summary["unchanged"], summary["deleted"]) == (0, 0, 0)
    assert versions(store) == ["v00001"] and latest(store) == "v00001"
    assert_store_settled(store)

    table = read_dataset(str(store / "v00001"))
    assert table.column_names == ["id", "embedding", "url", "content_hash"]
    texts = {r["id"]: r["text"] for r in rows}
    order = sorted(texts)
    want = encoder.encode([texts[i] for i in order])  # other batches than the job's: float32 rounding apart
    error = forward_error(want, encoder.config.root)
    assert (np.abs(vectors(table, order) - want.astype(np.float64)) <= error).all()
    rows_of = by_id(table)
    assert all(table["content_hash"][rows_of[i]].as_py() == expected_hash(texts[i]) for i in order)
    manifest = json.loads((store / "v00001" / MANIFEST_FILE).read_text())
    assert manifest["metadata"]["snapshot"] == "v00001" and manifest["rows"] == N_ROWS
    assert manifest["reembed"]["options"]["precision"] == "float32"


def test_second_run_embeds_only_new_and_changed_rows(store_copy, tiny_model_dir, encoder) -> None:
    rows, corpus, store = store_copy
    v1 = read_dataset(str(store / "v00001"))
    v1_bytes = {p.name: p.read_bytes() for p in (store / "v00001").glob("part-*.parquet")}
    rows, changes = edit(rows, seed=1)
    write_corpus(corpus, rows)

    summary = reembed(tiny_model_dir, corpus, store)
    assert (summary["version"], summary["previous"], summary["written"], summary["full"]) == (
        "v00002",
        "v00001",
        True,
        False,
    )
    assert {k: summary[k] for k in ("rows", "new", "changed", "unchanged", "deleted", "embedded")} == {
        "rows": N_ROWS,
        "new": 2,
        "changed": 2,
        "unchanged": 196,
        "deleted": 2,
        "embedded": 4,
    }
    assert summary["embed"]["rows"] == 4, "the embed job saw exactly the new and changed rows"
    assert summary["kept_columns_changed"]
    assert latest(store) == "v00002" and versions(store) == ["v00001", "v00002"]
    assert_store_settled(store)
    assert {p.name: p.read_bytes() for p in (store / "v00001").glob("part-*.parquet")} == v1_bytes

    v2 = read_dataset(str(store / "v00002"))
    texts = {r["id"]: r["text"] for r in rows}
    assert sorted(by_id(v2)) == sorted(texts), "every current id once, deleted ids gone"
    unchanged = sorted(set(texts) - changes["changed"] - changes["new"])
    assert np.array_equal(vectors(v2, unchanged), vectors(v1, unchanged)), "carried vectors are bit for bit"
    # The snapshot equals a full embed of the new corpus: the encoder over every text, the reference
    # tests/test_embed.py holds the embed job to.
    ids = sorted(texts)
    want = encoder.encode([texts[i] for i in ids])
    assert (
        np.abs(vectors(v2, ids) - want.astype(np.float64)) <= forward_error(want, encoder.config.root)
    ).all()
    rows_of = by_id(v2)
    assert all(v2["content_hash"][rows_of[i]].as_py() == expected_hash(texts[i]) for i in texts)
    assert v2["url"][rows_of[rows[40]["id"]]].as_py() == "https://example.org/moved", (
        "kept columns are current"
    )

    # Unchanged corpus: nothing embedded, no version written.
    again = reembed(tiny_model_dir, corpus, store)
    assert (again["written"], again["version"], again["embedded"], again["unchanged"]) == (
        False,
        "v00002",
        0,
        N_ROWS,
    )
    assert versions(store) == ["v00001", "v00002"]

    assert_store_settled(store)


def test_keep_prunes_old_versions_but_never_the_latest(store_copy, tiny_model_dir) -> None:
    rows, corpus, store = store_copy
    states = [rows]
    for step in (1, 2):  # deletions only: new versions without embedding anything
        states.append(states[-1][step:])
        write_corpus(corpus, states[-1])
        summary = reembed(tiny_model_dir, corpus, store, keep=2)
        assert (summary["version"], summary["deleted"], summary["embedded"]) == (f"v0000{step + 1}", step, 0)
    assert summary["pruned"] == ["v00001"]
    assert versions(store) == ["v00002", "v00003"]

    # A hand rollback (_LATEST as bare text) to v00002: --keep 1 keeps it and removes the newer v00003.
    (store / LATEST_FILE).write_text("v00002\n")
    write_corpus(corpus, states[1])
    summary = reembed(tiny_model_dir, corpus, store, keep=1)
    assert (summary["written"], summary["version"], summary["pruned"]) == (False, "v00002", ["v00003"])
    assert versions(store) == ["v00002"]
    assert latest_version_url(str(store)) == f"{store}/v00002"
    assert read_dataset(latest_version_url(str(store))).num_rows == N_ROWS - 1

    with pytest.raises(SpecError, match=r"^keep: must be at least 1"):
        spec_of(tiny_model_dir, corpus, store, keep=0)


def test_kept_column_edit_alone_writes_a_version_without_embedding(store_copy, tiny_model_dir) -> None:
    rows, corpus, store = store_copy
    # Same content split differently (two files, other order, other shards): unchanged, nothing written.
    (corpus / "corpus.parquet").unlink()
    pq.write_table(corpus_table(rows[100:]), corpus / "a.parquet", row_group_size=30)
    pq.write_table(corpus_table(rows[:100]), corpus / "b.parquet", row_group_size=30)
    summary = reembed(tiny_model_dir, corpus, store, rows_per_shard=25)
    assert not summary["written"] and not summary["kept_columns_changed"]

    edited = [dict(r) for r in rows]
    edited[7]["url"] = "https://example.org/renamed"
    (corpus / "a.parquet").unlink()
    (corpus / "b.parquet").unlink()
    write_corpus(corpus, edited)
    summary = reembed(tiny_model_dir, corpus, store)
    assert (
        summary["written"],
        summary["kept_columns_changed"],
        summary["embedded"],
        summary["unchanged"],
    ) == (True, True, 0, N_ROWS)
    v2 = read_dataset(str(store / "v00002"))
    assert v2["url"][by_id(v2)[rows[7]["id"]]].as_py() == "https://example.org/renamed"
    v1 = read_dataset(str(store / "v00001"))
    ids = sorted(r["id"] for r in rows)
    assert np.array_equal(vectors(v1, ids), vectors(v2, ids))


def test_stale_lock_is_reported_and_break_lock_clears_it(store_copy, tiny_model_dir) -> None:
    rows, corpus, store = store_copy
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    crashed = {
        "run": "deadbeef",
        "host": socket.gethostname(),
        "pid": int(finished.stdout),
        "started": "2026-01-01T02:00:00+00:00",
    }
    (store / LOCK_FILE).write_text(json.dumps(crashed))
    with pytest.raises(LockHeld) as refused:
        reembed(tiny_model_dir, corpus, store)
    message = str(refused.value)
    assert str(store / LOCK_FILE) in message and "deadbeef" in message
    assert "stale" in message and "--break-lock" in message
    assert json.loads((store / LOCK_FILE).read_text()) == crashed, "a refused run leaves the lock alone"

    summary = reembed(tiny_model_dir, corpus, store, break_lock=True)
    assert summary["version"] == "v00001" and not summary["written"]
    assert_store_settled(store)


def test_leftovers_of_a_crashed_run_are_removed(store_copy, tiny_model_dir) -> None:
    rows, corpus, store = store_copy
    (store / "v00002").mkdir()
    (store / "v00002" / "part-00000.parquet").write_bytes(b"half a part")
    (store / STAGING_DIR / "v00007" / "delta").mkdir(parents=True)
    summary = reembed(tiny_model_dir, corpus, store)
    assert not summary["written"]
    assert versions(store) == ["v00001"]
    assert not (store / STAGING_DIR / "v00007").exists()


def test_corpus_without_ids_or_with_duplicate_ids_is_refused(tiny_model_dir, tmp_path) -> None:
    folder = tmp_path / "no-ids"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), folder / "c.parquet")
    with pytest.raises(SpecError, match=r"^id_column: .*--id-column"):
        reembed(tiny_model_dir, folder, tmp_path / "store", keep_columns=[])
    assert not (tmp_path / "store").exists()

    rows = make_rows(range(5), seed=3)
    rows[4]["id"] = rows[1]["id"]
    with pytest.raises(CorpusError, match=r"row 4: duplicate id 'doc-0001' \(first at .* row 1\)"):
        reembed(tiny_model_dir, write_corpus(tmp_path / "dups", rows), tmp_path / "store")
    assert not (tmp_path / "store" / LATEST_FILE).exists() and not (tmp_path / "store" / LOCK_FILE).exists()


def test_create_exclusive_local(tmp_path) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    target = str(tmp_path / "a" / "lock")
    assert create_exclusive(fs, target, b"first")
    assert not create_exclusive(fs, target, b"second")
    assert Path(target).read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["lock"], "no temporary left behind"


# --------------------------------------------------------------------------- S3


def test_s3_store_concurrent_runs_new_model_and_int8_delta(first_run, second_model, s3_bucket) -> None:
    """On a real S3 API, from a copy of the first run's store: two runs at once with another model (one wins
    with a full re-embed, the other names the lock), then a delta quantized with the int8 ranges of that
    full run."""
    fs = s3_bucket.fs
    assert create_exclusive(fs, s3_bucket.path("probe"), b"1") and not create_exclusive(
        fs, s3_bucket.path("probe"), b"2"
    )
    assert fs.cat_file(s3_bucket.path("probe")) == b"1"

    rows, local_store, _ = first_run
    store = s3_bucket.path("store")
    fs.put(str(local_store), store, recursive=True)
    endpoint = s3_bucket.storage_options["client_kwargs"]["endpoint_url"]
    options = option_flags(endpoint)

    def upload(rows: list[dict]) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(corpus_table(rows), sink, row_group_size=50)
        fs.pipe_file(s3_bucket.path("corpus", "corpus.parquet"), sink.getvalue().to_pybytes())

    def state() -> tuple[str, list[str]]:
        fs.invalidate_cache()
        keys = [k.split("/store/", 1)[1] for k in fs.find(store)]
        return json.loads(fs.cat_file(f"{store}/{LATEST_FILE}"))["version"], keys

    upload(rows)
    run = dict(
        model=second_model,
        corpus=s3_bucket.path("corpus"),
        store=store,
        storage_option=options,
        precision="int8",
        rows_per_shard=100,
    )
    results: list = [None, None]
    start = threading.Barrier(2)

    def attempt(slot: int) -> None:
        start.wait()
        try:
            results[slot] = reembed(**run)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[slot] = exc

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if not isinstance(r, dict)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], LockHeld) and f"{store}/_LOCK exists" in str(lost[0])
    summary = won[0]
    assert (
        summary["full"]
        and "fingerprint changed" in summary["reason"]
        and "precision changed" in summary["reason"]
    )
    assert (summary["version"], summary["embedded"], summary["unchanged"]) == ("v00002", N_ROWS, N_ROWS)
    version, keys = state()
    assert version == "v00002" and LOCK_FILE not in keys and not any(k.startswith(STAGING_DIR) for k in keys)

    edited, changes = edit(rows, seed=6)
    upload(edited)
    summary = reembed(**run)
    assert (
        summary["version"],
        summary["new"],
        summary["changed"],
        summary["deleted"],
        summary["embedded"],
    ) == ("v00003", 2, 2, 2, 4)
    version, keys = state()
    assert version == "v00003" and LOCK_FILE not in keys and not any(k.startswith(STAGING_DIR) for k in keys)

    v2 = read_dataset(f"{store}/v00002", s3_bucket.storage_options)
    v3 = read_dataset(f"{store}/v00003", s3_bucket.storage_options)
    meta = [json.loads(fs.cat_file(f"{store}/{v}/{MANIFEST_FILE}"))["metadata"] for v in ("v00002", "v00003")]
    assert meta[0]["precision"] == meta[1]["precision"] == "int8"
    assert meta[1]["int8_calibration"] == meta[0]["int8_calibration"], "one set of ranges for the whole store"
    texts = {r["id"]: r["text"] for r in edited}
    unchanged = sorted(set(texts) - changes["changed"] - changes["new"])
    assert np.array_equal(vectors(v3, unchanged), vectors(v2, unchanged))
    embedded = sorted(changes["changed"] | changes["new"])
    encoded = load_encoder(second_model, device="cpu").encode([texts[i] for i in embedded])
    want = embeddings_of(pa.table({"embedding": quantize(encoded, "int8", meta[0]["int8_calibration"])}))
    assert np.abs(vectors(v3, embedded).astype(np.int16) - want.astype(np.int16)).max() <= 1
