"""The default shard plan: about 64 shards of 10,000 to 250,000 rows, each row in exactly one shard, cut
along row groups (Parquet) and lines (JSON Lines), the same plan every time."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import corpus


def parquet(path: Path, rows: int, row_group: int, start: int = 0) -> None:
    ids = pa.array(range(start, start + rows), pa.int64())
    pq.write_table(
        pa.table({"id": ids, "text": pa.array([f"t{i}" for i in range(rows)])}),
        path,
        row_group_size=row_group,
    )


def plan(paths: list[Path]) -> list[corpus.Shard]:
    return corpus.plan_auto_shards(corpus.list_sources([str(p) for p in paths], None), None)


def covered(shards: list[corpus.Shard]) -> dict[str, list[tuple[int, int]]]:
    ranges: dict[str, list[tuple[int, int]]] = {}
    for shard in shards:
        ranges.setdefault(shard.url, []).append((shard.row_start, shard.row_end))
    return ranges


def assert_partition(shards: list[corpus.Shard], rows_of: dict[str, int]) -> None:
    assert [s.shard_id for s in shards] == list(range(len(shards)))
    for url, ranges in covered(shards).items():
        assert ranges[0][0] == 0 and ranges[-1][1] == rows_of[url]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), (
            url
        )  # contiguous, no overlap


def test_a_small_corpus_keeps_10k_row_shards(tmp_path: Path) -> None:
    parquet(tmp_path / "a.parquet", 35_000, 1_000)
    shards = plan([tmp_path / "a.parquet"])
    assert [s.rows for s in shards] == [10_000, 10_000, 10_000, 5_000]
    assert_partition(shards, {shards[0].url: 35_000})


def test_a_large_corpus_gets_larger_shards_along_row_groups(tmp_path: Path) -> None:
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    parquet(files[0], 900_000, 5_000)
    parquet(files[1], 380_000, 5_000, start=900_000)
    shards = plan(files)
    target = corpus.auto_shard_rows(1_280_000)
    assert target == 20_000
    assert all(s.rows <= target and s.rows % 5_000 == 0 for s in shards)  # whole row groups
    assert len(shards) == 64 and sum(s.rows for s in shards) == 1_280_000
    assert_partition(shards, {shards[0].url: 900_000, shards[-1].url: 380_000})
    assert plan(files) == shards
    assert corpus.auto_shard_rows(10**9) == corpus.MAX_AUTO_SHARD_ROWS


def test_json_lines_shards_keep_their_byte_ranges(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"line {i}"}) + "\n" for i in range(25_000)))
    shards = plan([path])
    assert [s.rows for s in shards] == [8_333, 8_333, 8_334]
    data = path.read_bytes()
    for shard in shards:
        lines = data[shard.byte_start : shard.byte_end].decode().splitlines()
        assert [json.loads(line)["id"] for line in lines] == list(range(shard.row_start, shard.row_end))
