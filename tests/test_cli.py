"""The command line: a YAML spec and the same flags make the same job; bad specs fail in one line
naming the field (exit code 2, no traceback); `embedpipe inspect` says what the encoder will do."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
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


def test_spec_file_and_flags_make_the_same_job(
    ray_local, tiny_model_dir, corpus_texts, tmp_path, capsys
) -> None:
    """The spec run writes the output; the flags run on the same output is accepted as the same job (same
    model, columns, options and shards) and finds every shard done. The output shows each option took."""
    texts = corpus_texts
    texts[3] = None
    corpus = tmp_path / "in"
    corpus.mkdir()
    for name, rows in (("a", range(0, 12)), ("b", range(12, 20))):
        pq.write_table(
            pa.table(
                {
                    "doc": [f"doc-{i}" for i in rows],
                    "body": [texts[i] for i in rows],
                    "lang": ["en"] * len(rows),
                    "extra": list(rows),
                    "unused": [0] * len(rows),
                }
            ),
            corpus / f"{name}.parquet",
            row_group_size=5,
        )
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
        "embed",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(corpus / "a.parquet"),
        str(corpus / "b.parquet"),
        "--output",
        str(output),
        "--text-column",
        "body",
        "--id-column",
        "doc",
        "--keep-columns",
        "lang,extra",
        "--rows-per-shard",
        "5",
        "--precision",
        "float16",
        "--on-null",
        "skip",
        "--max-attempts",
        "2",
        "--workers",
        "1",
        "--no-progress",
        "--storage-option",
        "auto_mkdir=true",
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
        ("a.parquet", 0, 5),
        ("a.parquet", 5, 10),
        ("a.parquet", 10, 12),
        ("b.parquet", 0, 5),
        ("b.parquet", 5, 8),
    ]
    assert plan["metadata"]["precision"] == "float16" and plan["metadata"]["text_column"] == "body"
    assert np.isfinite(embeddings_of(table).astype(np.float32)).all()


def test_unknown_spec_key_exits_2_naming_it(tmp_path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        yaml.safe_dump({"model": "m", "input": "x.parquet", "output": "out", "text_colum": "body"})
    )
    result = subprocess.run(
        [str(EMBEDPIPE), "embed", "--spec", str(spec_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "text_colum" in result.stderr and "unknown key" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "values, field",
    [
        ({"rows_per_shard": "many"}, "rows_per_shard"),
        ({"precision": "int4"}, "precision"),
        ({"on_null": "drop"}, "on_null"),
        ({"keep_columns": {"a": 1}}, "keep_columns"),
        ({"model": None}, "model"),
    ],
)
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
        ["mean"],
        True,
        384,
        "cosine",
    )


# --------------------------------------------------------------------------- conventions: version, help, lists


def test_version(capsys) -> None:
    from pipeline import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"embedpipe {__version__}"


def subcommands() -> dict:
    from pipeline.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **commands.choices}


@pytest.mark.parametrize("command", ["", "embed", "mine", "dedup", "reembed", "convert", "inspect", "demo"])
def test_help_shows_every_options_default(command: str) -> None:
    """Every option's help says its default (or that it is required); -h and --version need none."""
    parser = subcommands()[command]
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        text = formatter._expand_help(action)
        if "default" not in text and "(required)" not in text:
            missing.append(f"{action.option_strings[-1]}: {text!r}")
    assert not missing, missing
    parser.format_help()  # renders (no stray % in a help text)


def test_help_defaults_read_as_values() -> None:
    text = " ".join(subcommands()["embed"].format_help().split())
    assert "--max-attempts MAX_ATTEMPTS attempts per shard before the job fails (default: 3)" in text
    assert "--rows-per-shard ROWS_PER_SHARD rows per shard (default: the corpus in about 64 shards" in text
    assert "show a progress bar on stderr (default: true)" in text
    assert (
        "--overwrite, --no-overwrite replace an existing output made with other options (default: false)"
        in text
    )
    assert "output dataset URL (required)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def list_options() -> list[tuple[str, str]]:
    """(command, field) for every list option of every job and convert."""
    from pipeline.cli import JOBS
    from pipeline.spec import ConvertSpec, base_type, field_types, is_list_type

    found = []
    for command, cls in [*((name, spec) for name, (spec, _, _) in JOBS.items()), ("convert", ConvertSpec)]:
        for name, annotation in field_types(cls).items():
            if is_list_type(base_type(annotation)[0]):
                found.append((command, name))
    return found


def test_every_list_option_is_known() -> None:
    found = set(list_options())
    assert {
        ("embed", "input"),
        ("embed", "keep_columns"),
        ("embed", "storage_option"),
        ("mine", "corpus"),
        ("dedup", "against"),
        ("reembed", "keep_columns"),
        ("convert", "storage_option"),
    } <= found


@pytest.mark.parametrize("command, field", list_options(), ids=lambda v: v)
def test_list_options_repeat_or_comma(command: str, field: str) -> None:
    """One convention for every list option: a repeated flag, commas, or both (several values after one flag
    too); --storage-option takes one KEY=VALUE per flag and never splits it (a value may hold commas). A YAML
    spec's string is read as the flag's value is."""
    from pipeline.cli import JOBS, build_parser
    from pipeline.spec import ConvertSpec, coerce, field_types

    parser = build_parser()
    flag = "--" + field.replace("_", "-")
    if field == "storage_option":
        args = parser.parse_args([command, flag, "endpoint_url=http://h:9000", flag, "tags=a,b"])
        assert getattr(args, field) == ["endpoint_url=http://h:9000", "tags=a,b"]
        expected_yaml = ["tags=a,b"]
    else:
        for argv in (
            [flag, "a,b", flag, "c"],
            [flag, "a", flag, "b", flag, "c"],
            [flag, "a, b,c"],
            [flag, "a", "b,c"],
        ):
            assert getattr(parser.parse_args([command, *argv]), field) == ["a", "b", "c"], argv
        expected_yaml = ["a", "b"]
    cls = ConvertSpec if command == "convert" else JOBS[command][0]
    given = "tags=a,b" if field == "storage_option" else "a, b"
    assert coerce(field, given, field_types(cls)[field]) == expected_yaml
    assert coerce(field, ["x,y"], field_types(cls)[field]) == ["x,y"], "a YAML list is taken as it is"


# --------------------------------------------------------------------------- convert takes --input / --output


def triplets(path: Path) -> Path:
    path.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "anchor": ["what is python", "what is perl", "what is a shell"],
                "positive": ["a programming language", "another language", "a command interpreter"],
                "negative": ["a snake", "a jewel", "a sea creature's home"],
            }
        ),
        path / "part-00000.parquet",
    )
    return path


def test_convert_takes_input_and_output_flags(tmp_path, capsys) -> None:
    source = triplets(tmp_path / "triplets")
    by_flags, by_position = tmp_path / "flags", tmp_path / "positional"
    assert main(["convert", "--to", "labeled-pair", "--input", str(source), "--output", str(by_flags)]) == 0
    assert main(["convert", "--to", "labeled-pair", str(source), str(by_position)]) == 0  # still accepted
    capsys.readouterr()
    flags_table, position_table = (
        pq.read_table(folder / "part-00000.parquet") for folder in (by_flags, by_position)
    )
    assert flags_table.equals(position_table) and flags_table.num_rows == 6
    assert (by_flags / ".embedpipe/SUCCESS").exists()

    help_text = subcommands()["convert"].format_help()
    assert "--input INPUT" in help_text and "--output OUTPUT" in help_text
    assert "paths" not in help_text and "positional arguments" not in help_text

    assert main(["convert", "--to", "triplet", "--input", str(by_flags), "a", "b"]) == 2
    assert "too many paths (a b): use --input IN --output OUT" in capsys.readouterr().err
    assert main(["convert", "--input", str(by_flags), "--output", str(tmp_path / "x")]) == 2
    assert "to: required" in capsys.readouterr().err


# --------------------------------------------------------------------------- --model-name


def write_model_files(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "files, expected",
    [
        ({}, "my-model-dir"),
        ({"config_sentence_transformers.json": '{"model_name": "org/from-config"}'}, "org/from-config"),
        (
            {"config.json": '{"model_name": "from-config-json", "_name_or_path": "base/model"}'},
            "from-config-json",
        ),
        (
            {"config.json": '{"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"}'},
            "my-model-dir",
        ),  # the base model
        (
            {"README.md": "---\nbase_model: org/base\nmodel-index:\n- name: card-index-name\n---\n# Title\n"},
            "card-index-name",
        ),
        ({"README.md": "---\nmodel_name: front-matter-name\n---\n# Title\n"}, "front-matter-name"),
        (
            {
                "README.md": "---\nbase_model: org/base\n---\n\n```\n# not a title\n```\n# all-MiniLM-L6-v2\nText\n"
            },
            "all-MiniLM-L6-v2",
        ),
        ({"README.md": "---\ntags: [x]\n---\n# SentenceTransformer based on org/base\n"}, "my-model-dir"),
        ({"README.md": "# SentenceTransformer\n"}, "my-model-dir"),
        ({"README.md": "# Sentence Transformer model\n"}, "my-model-dir"),
        ({"README.md": "no title here\n## Section\n"}, "my-model-dir"),
    ],
)
def test_model_name_default(tmp_path, files, expected) -> None:
    from pipeline.stages.embed import model_display_name

    folder = write_model_files(tmp_path / "my-model-dir", files)
    assert model_display_name(folder, str(folder) + "/") == expected


def test_model_name_from_a_hub_cache_path(tmp_path) -> None:
    from pipeline.stages.embed import model_display_name

    folder = write_model_files(tmp_path / "models--BAAI--bge-small-en-v1.5" / "snapshots" / "5c38ec7c", {})
    assert model_display_name(folder, str(folder)) == "BAAI/bge-small-en-v1.5"
    assert model_display_name(folder, "s3://models/all-MiniLM-L6-v2/") == "all-MiniLM-L6-v2"


def test_model_name_of_the_packaged_model() -> None:
    from pipeline.stages.embed import model_display_name

    assert model_display_name(real_model_path(), str(real_model_path())) == "all-MiniLM-L6-v2"


def small_corpus(tmp_path: Path, rows: int = 12) -> Path:
    path = tmp_path / "corpus.parquet"
    pq.write_table(
        pa.table({"id": list(range(rows)), "text": [f"text {i} about things" for i in range(rows)]}), path
    )
    return path


def model_name_of(output: Path) -> str:
    return json.loads(pq.read_schema(output / "part-00000.parquet").metadata[b"embedpipe"])["model_name"]


def test_model_name_flag_and_default_in_the_metadata(ray_local, tiny_model_dir, tmp_path, capsys) -> None:
    """Without --model-name the parts record the model's own name (the tiny model's card has only
    sentence-transformers' placeholder title, so its directory name); --model-name sets it, and is part of
    what an output is resumed with: another name against the same output is refused."""
    corpus = small_corpus(tmp_path)
    common = [
        "embed",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(corpus),
        "--rows-per-shard",
        "6",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main([*common, "--output", str(tmp_path / "default")]) == 0
    assert model_name_of(tmp_path / "default") == tiny_model_dir.name
    assert main([*common, "--output", str(tmp_path / "named"), "--model-name", "acme/tiny-v1"]) == 0
    assert model_name_of(tmp_path / "named") == "acme/tiny-v1"
    plan = json.loads((tmp_path / "named" / PLAN_FILE).read_text())
    assert plan["metadata"]["model_name"] == "acme/tiny-v1"
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "named"), "--model-name", "acme/tiny-v2"]) == 2
    assert "made with other input or options" in capsys.readouterr().err
    assert (
        main([*common, "--output", str(tmp_path / "named"), "--model-name", "acme/tiny-v1"]) == 0
    )  # resumes
    assert summary_from(capsys.readouterr().out)["shards"]["skipped"] == 2


# --------------------------------------------------------------------------- quiet, informative runs


def test_progress_off_logs_one_line_per_shard(ray_local, tiny_model_dir, tmp_path, capsys) -> None:
    """With --no-progress: a start line, one line per committed shard (rows, rate, ETA), an end line. With the
    bar (the default) no per-shard lines."""
    corpus = small_corpus(tmp_path, rows=20)
    output = tmp_path / "out"
    argv = [
        "embed",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(corpus),
        "--rows-per-shard",
        "4",
        "--workers",
        "1",
        "--output",
        str(output),
    ]
    assert main([*argv, "--no-progress"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"embed: 5 shards (0 already committed), 20 rows, 1 CPU worker(s) -> {output}"
    shard_lines = lines[1:-1]
    assert len(shard_lines) == 5, lines
    pattern = re.compile(
        r"embed: shard (\d) committed \(4 rows\); (\d)/5 shards, (\d+)/20 rows, [\d,]+ rows/s, "
        r"[\d,]+ tokens/s, ETA \d+:\d\d:\d\d$"
    )
    matches = [pattern.match(line) for line in shard_lines]
    assert all(matches), shard_lines
    assert sorted(int(m[1]) for m in matches) == [0, 1, 2, 3, 4]
    assert [(int(m[2]), int(m[3])) for m in matches] == [(n, 4 * n) for n in range(1, 6)]
    assert re.fullmatch(
        rf"embed: done: 20 rows in 5 shards \(5 encoded now, 0 already committed\) in "
        rf"\d+:\d\d:\d\d; {re.escape(str(output))} is complete \(.embedpipe/SUCCESS\)",
        lines[-1],
    )

    output.joinpath(
        ".embedpipe/SUCCESS"
    ).unlink()  # the same command again: every shard committed, none encoded
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "committed (" not in err and "(0 encoded now, 5 already committed)" in err

    assert main([*argv, "--output", str(tmp_path / "bar")]) == 0
    assert "committed (" not in capsys.readouterr().err


def quiet_run_env(tmp_path: Path) -> dict:
    """The environment of a user's shell: no RAY_AUTH_MODE (the tests set it), no RAY_ADDRESS; HOME in
    tmp_path, so the token Ray keeps in ~/.ray is this test's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(
        HOME=str(tmp_path / "home"),
        EMBEDPIPE_OBJECT_STORE_BYTES=str(96 * 1024 * 1024),
        EMBEDPIPE_CACHE=str(tmp_path / "cache"),
    )
    return env


@pytest.mark.slow
def test_cli_run_is_quiet_and_ctrl_c_says_how_to_resume(tmp_path) -> None:
    """A real `embedpipe embed` with the packaged model, as a user runs it (no RAY_AUTH_MODE set): no token
    warning from the local Ray cluster it starts, no "Loading weights" bar from the worker; a line per shard.
    SIGINT after the first shard: exit 130 and a line saying that the same command resumes; it does."""
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(
        pa.table(
            {
                "id": list(range(200)),
                "text": [f"sentence number {i} about a quick brown fox" for i in range(200)],
            }
        ),
        corpus,
    )
    output = tmp_path / "out"
    command = [
        str(EMBEDPIPE),
        "embed",
        "--model",
        str(real_model_path()),
        "--input",
        str(corpus),
        "--output",
        str(output),
        "--rows-per-shard",
        "20",
        "--workers",
        "1",
        "--no-progress",
    ]
    env = quiet_run_env(tmp_path)
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = []
    try:
        while line := proc.stderr.readline():
            seen.append(line)
            if "committed (" in line:
                break
        # Ctrl-C; pressed once more, as a person would, if nothing happened within 4 s (a SIGINT that lands
        # while the driver waits inside Ray's C code can go unseen); never twice within the exit itself.
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=4)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = "".join(seen) + err
    assert proc.returncode == 130, first
    assert err.strip().endswith(
        "embedpipe embed: interrupted. What was committed is kept: run the same command again to resume where "
        "it stopped."
    ), first
    assert "Traceback" not in first and out == ""
    done_first = len(list((output / ".embedpipe/receipts").glob("part-*.json")))
    assert 1 <= done_first < 10 and not (output / ".embedpipe/SUCCESS").exists()

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = summary_from(again.stdout)
    assert summary["shards"] == {"total": 10, "done": 10 - done_first, "skipped": done_first, "retried": 0}
    assert (output / ".embedpipe/SUCCESS").exists() and model_name_of(output) == "all-MiniLM-L6-v2"
    for text in (first, again.stderr):
        assert "Token authentication" not in text and "RAY_AUTH_MODE" not in text, text
        assert "Loading weights" not in text and "it/s]" not in text, text
    lines = again.stderr.strip().splitlines()
    assert lines[0].startswith(
        f"embed: 10 shards ({done_first} already committed), 200 rows, 1 CPU worker(s)"
    )
    assert sum("committed (20 rows)" in line for line in lines) == 10 - done_first
    assert lines[-1].startswith("embed: done: 200 rows in 10 shards"), lines
    assert len(lines) == 2 + 10 - done_first, lines  # nothing else on stderr
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file(), "the local cluster ran with token auth"
