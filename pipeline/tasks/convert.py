"""The convert job: a mining output from one sentence-transformers layout to another, as a committed folder.

``--to labeled-pair``: a triplet or n-tuple table (``anchor, positive, negative`` or ``negative_1 ..
negative_N``, optionally ``scores``) becomes ST's labeled-pair layout: per anchor its distinct positives
with label 1, then its distinct negatives with label 0 (int64, as ST); with a ``scores`` column the
result carries ``score`` instead, as ST's ``output_scores=True``. ``--to triplet`` goes back: per anchor,
every positive (label 1) x every negative (label 0), positive-major, in row order, which is ST's triplet
order, so triplet -> labeled-pair -> triplet gives the original back. The row logic is
``pipeline.io.training_formats.to_labeled_pair`` / ``to_triplet``; this module adds files and commits.

Input: one Parquet file, or a folder of parts (``part-*.parquet``, else every ``*.parquet``; a folder
with ``.embedpipe/`` is an embedpipe output and must be complete, i.e. hold ``.embedpipe/SUCCESS``). The anchor
column defaults to the first column, the positive column to the second, as the mining formats lay them out.
Every part's schema is checked before anything is written, so bad input commits nothing.

Output: ``part-00000.parquet ...`` and ``.embedpipe/SUCCESS`` last, each committed atomically (temporary name,
then rename). When every anchor's rows sit in a single input part (as in a mine output, one part per
block of anchors), parts are converted one at a time and memory holds one part; otherwise the whole input
is converted at once, since the conversions group rows by anchor over the whole table.
"""

from __future__ import annotations

import posixpath
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.output import BOOKKEEPING_DIR, SUCCESS_FILE, OutputFolder, part_name, receipt_path
from pipeline.io.storage import TEMP_PREFIX, parse_storage_options, redact
from pipeline.io.training_formats import to_labeled_pair, to_triplet
from pipeline.spec import ConvertSpec


class ConvertError(ValueError):
    """The conversion cannot run as asked; the message names the file or column and says why."""


def _base(name: str) -> str:
    return posixpath.basename(name.rstrip("/"))


def input_files(url: str, storage_options: dict) -> tuple[OutputFolder, list[str]]:
    """(the folder, the Parquet files in it to read in order) for a file or a folder of parts."""
    folder = OutputFolder(url, storage_options)
    if not folder.exists():
        raise ConvertError(f"{url}: not found")
    if not folder.is_folder():
        return OutputFolder(posixpath.dirname(url.rstrip("/")) or ".", storage_options), [_base(url)]
    bases = set(folder.list())
    if (BOOKKEEPING_DIR in bases or "_plan.json" in bases) and not folder.is_complete():
        raise ConvertError(
            f"{url}: an incomplete embedpipe output (no {SUCCESS_FILE}); finish or re-run the job first"
        )
    files = [n for n in bases if n.startswith("part-") and n.endswith(".parquet")]
    if not files:
        files = [n for n in bases if n.endswith(".parquet") and not n.startswith(("_", "."))]
    if not files:
        raise ConvertError(f"{url}: no Parquet files (part-*.parquet) in the folder")
    return folder, sorted(files, key=lambda n: (len(n), n))


def _schema(folder: OutputFolder, name: str, url: str) -> pa.Schema:
    try:
        return folder.read_schema(name)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConvertError(redact(f"{url}: {name} is not a readable Parquet file ({exc})")) from None


def check_columns(schema: pa.Schema, spec: ConvertSpec, where: str) -> tuple[str, str]:
    """The anchor and positive columns, and the columns the target layout needs; errors name them."""
    names = schema.names
    anchor = spec.anchor_column or (names[0] if names else None)
    positive = spec.positive_column or (names[1] if len(names) > 1 else None)
    for role, name in (("anchor", anchor), ("positive", positive)):
        if name is None:
            raise ConvertError(f"{where}: no {role} column (columns: {', '.join(names) or 'none'})")
        if name not in names:
            raise ConvertError(f"{where}: missing {role} column {name!r}; has {', '.join(names)}")
    if anchor == positive:
        raise ConvertError(f"{where}: the anchor and positive columns must differ, both are {anchor!r}")
    if spec.to == "labeled-pair":
        negatives = [n for n in names if n == "negative" or (n.startswith("negative_") and n[9:].isdigit())]
        if not negatives:
            raise ConvertError(
                f"{where}: not a triplet or n-tuple table: no 'negative' or 'negative_<i>' column "
                f"(columns: {', '.join(names)})"
            )
    elif "label" not in names:
        hint = (
            " (a labeled-pair table with scores cannot tell positives from negatives)"
            if "score" in names
            else ""
        )
        raise ConvertError(
            f"{where}: to make triplets the input needs a 0/1 'label' column{hint}; has {', '.join(names)}"
        )
    return anchor, positive


def prepare_output(output: OutputFolder, source: OutputFolder, inputs: list[str]) -> list[str]:
    """Check the output folder; returns the leftover parts of an interrupted run (removed at the end)."""
    if output.url in {source.url_of(name) for name in inputs} | {source.url}:
        raise ConvertError(f"{output.url}: the output must not be the input")
    if not output.exists():
        return []
    if not output.is_folder():
        raise ConvertError(f"{output.url}: exists and is not a folder")
    names = list(output.list())
    if output.is_complete():
        raise ConvertError(
            f"{output.url}: already holds a complete output; remove it or choose another output"
        )
    others = [
        n
        for n in names
        if not (n.startswith("part-") and n.endswith(".parquet"))
        and not n.startswith(TEMP_PREFIX)
        and n != BOOKKEEPING_DIR
    ]
    if others:
        raise ConvertError(
            f"{output.url}: the output folder is not empty (has {', '.join(sorted(others)[:5])})"
        )
    return [n for n in names if n.startswith("part-")]


def run_convert(spec: ConvertSpec, log=None) -> dict:
    """Convert ``spec.input`` to ``spec.to`` under ``spec.output``; returns a summary."""
    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    source, files = input_files(spec.input, storage_options)

    # Check every part before writing anything.
    schemas = [_schema(source, f, spec.input) for f in files]
    first = schemas[0].remove_metadata()
    for f, schema in zip(files, schemas, strict=True):
        if schema.remove_metadata() != first:
            raise ConvertError(
                f"{spec.input}: {f} has another schema than {files[0]} "
                f"({schema.remove_metadata()} vs {first})"
            )
    anchor, positive = check_columns(first, spec, spec.input)
    owner: dict = {}
    local = True
    for number, f in enumerate(files):
        columns = [anchor] + (["label"] if spec.to == "triplet" else [])
        table = source.read_table(f, columns)
        if spec.to == "triplet":
            bad = [v for v in pc.unique(table.column("label")).to_pylist() if v not in (0, 1)]
            if bad:
                raise ConvertError(
                    f"{spec.input}: {f}: labels must be 0 or 1, found {sorted(bad, key=repr)[:5]}"
                )
        for value in pc.unique(table.column(anchor)).to_pylist():
            if owner.setdefault(value, number) != number:
                local = False
    output = OutputFolder(spec.output, storage_options)
    leftovers = prepare_output(output, source, files)

    convert = to_labeled_pair if spec.to == "labeled-pair" else to_triplet
    groups = [[f] for f in files] if local else [files]
    rows_in = rows_out = 0
    written = []
    for number, group in enumerate(groups):
        table = pa.concat_tables([source.read_table(f) for f in group])
        try:
            converted = convert(table, anchor, positive)
        except ValueError as exc:
            raise ConvertError(f"{spec.input}: {exc}") from None
        written.append(output.commit_part(part_name(number), number, converted))
        rows_in += table.num_rows
        rows_out += converted.num_rows
    for name in sorted(set(leftovers) - {r.part for r in written}):
        output.remove(name)
        output.remove(receipt_path(name))
    output.finish({"job": "convert", "to": spec.to}, parts=written)
    summary = {
        "input": redact(spec.input),
        "output": redact(spec.output.rstrip("/")),
        "to": spec.to,
        "anchor_column": anchor,
        "positive_column": positive,
        "columns": converted.schema.names,
        "input_parts": len(files),
        "parts": len(written),
        "streamed": local,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "anchors": len(owner),
        "seconds": round(time.perf_counter() - started, 3),
    }
    log(
        f"converted {rows_in} rows in {len(files)} file(s) into {rows_out} {spec.to} rows in {len(written)} part(s)"
    )
    return summary
