"""Which columns `embedpipe mine` mines: as given, else conventional names, else exactly two text columns;
anything else is a refusal that lists the columns (never a silent guess)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.io.corpus import CorpusError
from pipeline.spec import MineSpec, build_spec
from pipeline.tasks.mine.inputs import pair_columns


def schema(*names: str, numeric: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema([(n, pa.int64() if n in numeric else pa.string()) for n in names])


def choose(table_schema: pa.Schema, **given) -> tuple[str, str, str]:
    spec = build_spec(MineSpec, {"model": "m", "input": ["p.parquet"], "output": "o", **given})
    return pair_columns(table_schema, spec, "p.parquet")


@pytest.mark.parametrize(
    ("names", "given", "want", "how"),
    [
        # Conventional names win over column order, wherever they sit.
        (
            ("source", "section", "query", "positive"),
            {},
            ("query", "positive"),
            "given or by their conventional names",
        ),
        (
            ("id", "question", "answer", "url"),
            {},
            ("question", "answer"),
            "given or by their conventional names",
        ),
        (
            ("title", "anchor", "document", "lang"),
            {},
            ("anchor", "document"),
            "given or by their conventional names",
        ),
        (("query", "text", "notes"), {}, ("query", "text"), "given or by their conventional names"),
        # "positive" is preferred over "text" when both are there.
        (("text", "anchor", "positive"), {}, ("anchor", "positive"), "given or by their conventional names"),
        # Exactly two text columns (numbers do not count): those two, in order, as sentence-transformers.
        (("a", "b"), {}, ("a", "b"), "the only text columns"),
        (("row", "left", "right"), {}, ("left", "right"), "the only text columns"),
        # One given, the other conventional or the only other text column.
        (
            ("src", "body", "answer"),
            {"anchor_column": "body"},
            ("body", "answer"),
            "given or by their conventional names",
        ),
        (
            ("src", "query", "body"),
            {"positive_column": "body"},
            ("query", "body"),
            "given or by their conventional names",
        ),
        (("x", "y"), {"anchor_column": "y"}, ("y", "x"), "the only text columns"),
        (("c1", "c2", "c3"), {"anchor_column": "c3", "positive_column": "c1"}, ("c3", "c1"), "as given"),
    ],
)
def test_columns_chosen(names, given, want, how) -> None:
    assert choose(schema(*names, numeric=("row",)), **given) == (*want, how)


@pytest.mark.parametrize(
    ("names", "given"),
    [
        (("source", "section", "title"), {}),  # three candidates, none conventional
        (("query", "s1", "s2"), {}),  # the positive is one of two
        (("c1", "c2", "c3"), {"anchor_column": "c1"}),
        (("only",), {}),
    ],
)
def test_ambiguous_columns_are_refused_with_the_list(names, given) -> None:
    with pytest.raises(CorpusError) as caught:
        choose(schema(*names), **given)
    message = str(caught.value)
    assert "p.parquet" in message and "--anchor-column" in message
    assert all(name in message for name in names)


def test_missing_given_column_names_the_columns() -> None:
    with pytest.raises(CorpusError, match="missing positive column 'answer'; has query, body"):
        choose(schema("query", "body"), positive_column="answer")


def test_cli_refuses_before_writing_and_prints_the_choice(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """The issue's case: `source, section, query, positive` mined the first two columns, silently. Now a
    refusal for three unconventional columns (nothing written, Ray not started), and the chosen columns
    printed when conventional names decide."""
    ambiguous = tmp_path / "ambiguous.parquet"
    pq.write_table(pa.table({"source": ["a", "b"], "section": ["c", "d"], "title": ["e", "f"]}), ambiguous)
    out = tmp_path / "out"
    code = cli.main(["mine", "--model", str(tiny_model_dir), "--input", str(ambiguous), "--output", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "cannot tell the anchor and positive columns apart" in err
    assert "source, section, title" in err and not out.exists()
