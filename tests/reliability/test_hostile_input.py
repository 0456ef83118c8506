"""Hostile input through the CLI (`embedpipe embed`, in process, on the session's Ray cluster), table-driven.

Every case gets its documented behaviour. Either a clear error naming the file (and the row, where there
is one): exit code 2, exactly one line on stderr, no traceback, nothing committed. Or the documented
skip / keep: the count in the summary, and every remaining row embedded exactly once with the vector
Encoder.encode gives its text. In no case is a file written outside --output: the temporary tree (inputs
included) and the working directory are snapshot before and after every run.

Error cases fail on the driver, so each runs alone. Cases that succeed start encoder actors (seconds
each on a small machine), so the cases that share flags share one run, each in its own input folder
with its own ids.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.io.dataset import embeddings_of, read_dataset
from pipeline.model import load_encoder
from tests.support.float32 import forward_error
from tests.support.outputcheck import check_output
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
N = 24
Rows = list[tuple[str, "str | None"]]  # (id, text) pairs a successful run must hold, each exactly once


def sentences(n: int, start: int = 0) -> list[str]:
    words = [
        "hostile",
        "input",
        "must",
        "fail",
        "clearly",
        "or",
        "be",
        "kept",
        "exactly",
        "once",
        "and",
        "nothing",
        "leaks",
        "out",
    ]
    return [" ".join(words[(i + j) % len(words)] for j in range(2 + i % 7)) for i in range(start, start + n)]


def named(tag: str, n: int, start: int = 0) -> list[str]:
    return [f"{tag}{i}" for i in range(start, start + n)]


def parquet(path: Path, table: pa.Table, row_group_size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def rows_table(texts: list, ids: list[str]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})


def invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string column holding raw bytes, some not UTF-8 (as a buggy writer can produce)."""
    offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    )


# --------------------------------------------------------------------------- inputs: each writes files
# into its folder and returns the (id, text) rows a successful run must hold


def null_texts(d: Path, tag: str) -> Rows:
    texts: list = sentences(N)
    texts[7], texts[15] = None, ""
    parquet(d / "c.parquet", rows_table(texts, named(tag, N)))
    return list(zip(named(tag, N), texts, strict=True))


def null_texts_skipped(d: Path, tag: str) -> Rows:
    return [(i, t) for i, t in null_texts(d, tag) if t]


def empty_text_jsonl(d: Path, tag: str) -> Rows:
    texts = sentences(N)
    texts[3] = ""
    jsonl(d / "c.jsonl", [{"id": i, "text": t} for i, t in zip(named(tag, N), texts, strict=True)])
    return list(zip(named(tag, N), texts, strict=True))


def megabyte_texts(d: Path, tag: str) -> Rows:
    texts = sentences(N)
    texts[2] = "word " * 200_000  # 1 MB of words
    texts[9] = "x" * (1 << 20)  # 1 MB without a space
    parquet(d / "c.parquet", rows_table(texts, named(tag, N)))
    return list(zip(named(tag, N), texts, strict=True))


def invalid_utf8_jsonl(d: Path, tag: str) -> Rows:
    lines = [
        json.dumps({"id": i, "text": t}).encode() for i, t in zip(named(tag, N), sentences(N), strict=True)
    ]
    lines[11] = b'{"id": "x", "text": "caf\xe9 \xff\xfe"}'
    d.mkdir(parents=True, exist_ok=True)
    (d / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return []


def invalid_utf8_parquet(d: Path, tag: str) -> Rows:
    values = [t.encode() for t in sentences(N)]
    values[13] = b"bad \xc3\x28 bytes"
    parquet(d / "c.parquet", pa.table({"id": named(tag, N), "text": invalid_utf8_strings(values)}))
    return []


def binary_text_column(d: Path, tag: str) -> Rows:
    parquet(d / "c.parquet", pa.table({"id": named(tag, N), "text": [t.encode() for t in sentences(N)]}))
    return []


CONTROL = [
    "nul\x00inside",
    "\x1b[31mred\x1b[0m",
    "bell\x07 and del\x7f",
    "line\u2028sep\u2029para",
    "\ufeffbom first",
    "tab\tcr\rlf\nend",
    "\x01\x02\x03",
    "zero\u200bwidth\u200djoiner",
]
RTL = [
    "مرحبا بالعالم",
    "שלום עולם",
    "mixed english العربية עברית",
    "\u202egnp.exe\u202c override",
    "e\u0301 cafe\u0301 n\u0303",
    "Z\u0351\u0364\u036b\u0350a\u0308\u0301l\u0315g\u0358o\u0321",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 family",
    "ﷺ ﷽",
]


def control_chars(d: Path, tag: str) -> Rows:
    jsonl(
        d / "c.jsonl", [{"id": i, "text": t} for i, t in zip(named(tag, len(CONTROL)), CONTROL, strict=True)]
    )
    return list(zip(named(tag, len(CONTROL)), CONTROL, strict=True))


def rtl_and_combining(d: Path, tag: str) -> Rows:
    parquet(d / "c.parquet", rows_table(RTL, named(tag, len(RTL))))
    return list(zip(named(tag, len(RTL)), RTL, strict=True))


def duplicate_ids(d: Path, tag: str) -> Rows:
    ids_b = named(tag, N, 100)
    ids_b[17] = f"{tag}5"
    parquet(d / "a.parquet", rows_table(sentences(N), named(tag, N)))
    parquet(d / "b.parquet", rows_table(sentences(N, 50), ids_b))
    return list(zip(named(tag, N) + ids_b, sentences(N) + sentences(N, 50), strict=True))


PATH_IDS = [
    "../x",
    "/etc/passwd",
    "../../../../tmp/evil",
    "..\\..\\windows",
    "a/../../b",
    "~/.ssh/id_rsa",
    "part-00000.parquet",
    ".embedpipe/SUCCESS",
    ".embedpipe/manifest.json",
    "file:///etc/shadow",
    "s3://other/bucket",
    "",
]


def path_like_ids(d: Path, tag: str) -> Rows:
    parquet(d / "c.parquet", rows_table(sentences(len(PATH_IDS)), PATH_IDS))
    return list(zip(PATH_IDS, sentences(len(PATH_IDS)), strict=True))


def truncated_mid_row_group(d: Path, tag: str) -> Rows:
    parquet(d / "a.parquet", rows_table(sentences(N), named(tag, N)))
    path = d / "b.parquet"
    parquet(path, rows_table(sentences(N, 30), named(tag, N, 30)))
    group = pq.read_metadata(path).row_group(1)
    start = min(group.column(c).file_offset for c in range(group.num_columns))
    path.write_bytes(path.read_bytes()[: start + group.total_byte_size // 2])
    return []


def mismatched_types(d: Path, tag: str) -> Rows:
    parquet(d / "a.parquet", rows_table(sentences(N), named(tag, N)))
    parquet(d / "b.parquet", pa.table({"id": list(range(N)), "text": sentences(N)}))
    return []


def missing_text_column(d: Path, tag: str) -> Rows:
    parquet(d / "a.parquet", rows_table(sentences(N), named(tag, N)))
    parquet(d / "b.parquet", pa.table({"id": named(tag, N, 50), "body": sentences(N)}))
    return []


def zero_rows_only(d: Path, tag: str) -> Rows:
    parquet(d / "empty.parquet", rows_table([], []))
    return []


def zero_rows_beside_others(d: Path, tag: str) -> Rows:
    zero_rows_only(d, tag)
    parquet(d / "full.parquet", rows_table(sentences(N), named(tag, N)))
    return list(zip(named(tag, N), sentences(N), strict=True))


def empty_jsonl_beside_others(d: Path, tag: str) -> Rows:
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.jsonl").write_bytes(b"")
    (d / "blank.jsonl").write_bytes(b"\n\n  \n")
    parquet(d / "full.parquet", rows_table(sentences(N), named(tag, N)))
    return list(zip(named(tag, N), sentences(N), strict=True))


@dataclass
class Case:
    name: str
    make: Callable[[Path, str], Rows]
    flags: tuple[str, ...] = ()
    error: list[str] = field(default_factory=list)  # substrings of the one error line; empty: succeeds
    skipped: int = 0  # rows the summary must count as skipped


SKIP, EMPTY, KEEP = ("--on-null", "skip"), ("--on-null", "empty"), ("--on-duplicate-id", "keep")
CASES = [
    Case("null text fails", null_texts, error=["c.parquet", "row 7", "null text", "--on-null"]),
    Case("empty text fails", empty_text_jsonl, error=["c.jsonl", "row 3", "empty text", "--on-null"]),
    Case("null and empty texts skipped", null_texts_skipped, SKIP + KEEP, skipped=2),
    Case("null and empty texts embedded as ''", null_texts, EMPTY),
    Case("1 MB texts", megabyte_texts),
    Case("invalid UTF-8 in JSON Lines", invalid_utf8_jsonl, error=["c.jsonl", "row 11", "UTF-8"]),
    Case(
        "invalid UTF-8 in a Parquet string column",
        invalid_utf8_parquet,
        error=["c.parquet", "row 13", "UTF-8"],
    ),
    Case(
        "invalid UTF-8 in Parquet, --on-null skip",
        invalid_utf8_parquet,
        SKIP,
        error=["c.parquet", "row 13", "UTF-8"],
    ),
    Case(
        "binary text column", binary_text_column, error=["c.parquet", "'text'", "binary", "expected strings"]
    ),
    Case("control characters", control_chars),
    Case("right-to-left and combining characters", rtl_and_combining),
    Case(
        "duplicate ids fail",
        duplicate_ids,
        error=["b.parquet", "row 17", "duplicate id 'h5'", "a.parquet row 5"],
    ),
    Case("duplicate ids kept", duplicate_ids, SKIP + KEEP),
    Case("ids that look like paths", path_like_ids),
    Case("Parquet truncated mid-row-group", truncated_mid_row_group, error=["b.parquet", "corrupt"]),
    Case("schemas disagree", mismatched_types, error=["a.parquet", "b.parquet", "'id'", "disagree"]),
    Case(
        "text column missing in one file",
        missing_text_column,
        error=["b.parquet", "missing text column 'text'"],
    ),
    Case("0-row file alone", zero_rows_only, error=["no rows"]),
    Case("0-row Parquet beside others", zero_rows_beside_others),
    Case("empty JSON Lines beside others", empty_jsonl_beside_others),
]
FAILING = [c for c in CASES if c.error]
GROUPS = {
    flags: [c for c in CASES if not c.error and c.flags == flags]
    for flags in dict.fromkeys(c.flags for c in CASES if not c.error)
}


# --------------------------------------------------------------------------- running them


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under the tree, with size and mtime, plus the working directory's names."""
    found = {str(ROOT / name): (0, 0) for name in os.listdir(ROOT)}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*filenames, *dirnames]:
            info = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (info.st_size if name in filenames else 0, info.st_mtime_ns)
    return found


def run_cli(tmp_path: Path, model: Path, flags: tuple[str, ...], capsys) -> tuple[int, str, str, Path]:
    """`embedpipe embed` over tmp_path/in into tmp_path/out; fails the test if anything else changed."""
    output = tmp_path / "out"
    before = snapshot(tmp_path)
    code = cli.main(
        [
            "embed",
            "--model",
            str(model),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(output),
            "--rows-per-shard",
            "8",
            "--workers",
            "1",
            "--no-progress",
            "--keep-columns",
            "text",
            *flags,
        ]
    )
    captured = capsys.readouterr()
    after = snapshot(tmp_path)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    outside = [p for p in changed if p != str(output) and not p.startswith(str(output) + os.sep)]
    assert outside == [], f"written outside --output: {outside}"
    return code, captured.out, captured.err, output


FIGURES = Counter()


@pytest.mark.parametrize("case", FAILING, ids=[c.name for c in FAILING])
def test_hostile_input_fails_clearly(
    case: Case, ray_local, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    case.make(tmp_path / "in", "h")
    code, _, err, output = run_cli(tmp_path, tiny_model_dir, case.flags, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("embedpipe embed: error: "), err
    assert "Traceback" not in err
    for part in case.error:
        assert part in lines[0], (part, lines[0])
    committed = [p for p in output.rglob("*") if p.is_file()] if output.exists() else []
    assert committed == [], f"written although the job failed: {committed}"
    FIGURES["cases"] += 1
    FIGURES["clear errors"] += 1


@pytest.mark.parametrize("flags", list(GROUPS), ids=[" ".join(f) or "defaults" for f in GROUPS])
def test_hostile_input_is_embedded(
    flags: tuple[str, ...], ray_local, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    expected: Rows = []
    for number, case in enumerate(GROUPS[flags]):
        expected += case.make(tmp_path / "in" / f"case{number}", f"g{number}-")
    code, out, err, output = run_cli(tmp_path, tiny_model_dir, flags, capsys)
    assert code == 0, err
    summary = json.loads(out[out.index("{") :])
    skipped = sum(c.skipped for c in GROUPS[flags])
    assert summary["rows"] == len(expected) and summary["skipped_rows"] == skipped
    assert (output / ".embedpipe/SUCCESS").exists() and check_output(str(output)) == []

    table = read_dataset(str(output))
    got = list(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    assert Counter(got) == Counter(expected)  # every kept row exactly once, nothing invented or lost
    vectors = embeddings_of(table)
    assert np.isfinite(vectors).all()
    want = load_encoder(tiny_model_dir, device="cpu").encode([text or "" for _, text in got])
    # other batches than the job's: equal up to the float32 rounding of a forward pass
    assert (np.abs(vectors - want.astype(np.float64)) <= forward_error(want, tiny_model_dir)).all()
    FIGURES["cases"] += len(GROUPS[flags])
    FIGURES["embedded runs"] += 1
    FIGURES["rows out"] += summary["rows"]
    FIGURES["rows skipped as documented"] += summary["skipped_rows"]


def test_figures() -> None:
    """Printed with -s, for RELIABILITY.md (runs after the cases above)."""
    print("FIGURES", json.dumps({"cases defined": len(CASES), **FIGURES}))


def test_parquet_with_invalid_utf8_is_a_real_file(tmp_path: Path) -> None:
    """The fixture itself: a valid Parquet file whose string column holds bytes that are not UTF-8."""
    invalid_utf8_parquet(tmp_path, "h")
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.schema.field("text").type == pa.string()
    with pytest.raises(UnicodeDecodeError):
        table.column("text").to_pylist()
