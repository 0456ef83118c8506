"""What marks an output complete: `.embedpipe/SUCCESS`. A Spark-style folder (parts and `_SUCCESS` alone) is
plain input; embedpipe 0.1's layout (`_SUCCESS` beside `_plan.json`) is named, with the way out."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.output import DatasetError, OutputFolder


def folder_with(root: Path, *names: str) -> OutputFolder:
    root.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1], "text": ["a"]}), root / "part-00000.parquet")
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}" if name.endswith(".json") else "")
    return OutputFolder(str(root))


def test_completeness_by_layout(tmp_path: Path) -> None:
    assert folder_with(tmp_path / "done", ".embedpipe/plan.json", ".embedpipe/SUCCESS").is_complete()
    assert not folder_with(tmp_path / "running", ".embedpipe/plan.json").is_complete()
    assert not folder_with(tmp_path / "spark", "_SUCCESS").is_complete()
    with pytest.raises(DatasetError, match="made by an earlier embedpipe"):
        folder_with(tmp_path / "old", "_plan.json", "_SUCCESS").is_complete()
