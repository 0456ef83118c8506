"""An independent checker for committed embed outputs: does `.embedpipe/SUCCESS` tell the truth?

Written from the data contract (DESIGN.md), not from pipeline.io.dataset, so a bug there cannot hide
itself: when `.embedpipe/SUCCESS` is present, `.embedpipe/manifest.json` must list every planned part, each part must exist
with the recorded size and sha256 and hold the recorded number of rows, and no other part may be visible.
Works on any fsspec filesystem (local paths, or s3fs with a bucket/prefix path).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import fsspec
import pyarrow.parquet as pq


def _local(root: str) -> tuple[Any, str]:
    return fsspec.filesystem("file"), str(root)


def visible_parts(fs: Any, root: str) -> list[str]:
    """part-*.parquet names directly under root (what a reader of the dataset would pick up)."""
    try:
        names = [entry.rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))


def check_output(root: str, fs: Any = None) -> list[str]:
    """Problems with a committed output (empty list: it checks out). An output without `.embedpipe/SUCCESS` is
    not committed, so it only has to have whole parts (each a readable Parquet file)."""
    if fs is None:
        fs, root = _local(root)
    root = root.rstrip("/")
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    problems: list[str] = []
    parts = visible_parts(fs, root)
    if not fs.exists(f"{root}/.embedpipe/SUCCESS"):
        for name in parts:  # not committed: every visible part must still be whole
            try:
                pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{name}")))
            except Exception as exc:  # noqa: BLE001 - any unreadable part is the finding
                problems.append(f"{name}: visible but unreadable ({type(exc).__name__}: {exc})")
        return problems
    try:
        manifest = json.loads(fs.cat_file(f"{root}/.embedpipe/manifest.json"))
        plan = json.loads(fs.cat_file(f"{root}/.embedpipe/plan.json"))
    except FileNotFoundError as exc:
        return [f".embedpipe/SUCCESS without {exc}"]
    listed = [p["part"] for p in manifest.get("parts", [])]
    planned = [f"part-{s['shard_id']:05d}.parquet" for s in plan["shards"]]
    if listed != planned:
        problems.append(f"manifest lists {len(listed)} part(s), the plan has {len(planned)}")
    if sorted(listed) != parts:
        problems.append(f"visible parts {parts} differ from the manifest's {sorted(listed)}")
    for entry in manifest.get("parts", []):
        path = f"{root}/{entry['part']}"
        if not fs.exists(path):
            problems.append(f"{entry['part']}: in the manifest but missing")
            continue
        data = fs.cat_file(path)
        if len(data) != entry["bytes"]:
            problems.append(f"{entry['part']}: {len(data)} bytes, the manifest says {entry['bytes']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{entry['part']}: sha256 differs from the manifest")
            continue
        rows = pq.read_metadata(io.BytesIO(data)).num_rows
        if rows != entry["rows"]:
            problems.append(f"{entry['part']}: {rows} rows, the manifest says {entry['rows']}")
    if manifest.get("rows") != sum(p["rows"] for p in manifest.get("parts", [])):
        problems.append("manifest rows do not add up")
    return problems
