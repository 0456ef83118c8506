"""Command line: flags (or a YAML spec) become a job spec, and a job runs it. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import __version__
from pipeline.spec import (
    ConvertSpec,
    DedupSpec,
    EmbedSpec,
    MineSpec,
    ReembedSpec,
    SpecError,
    base_type,
    field_types,
    is_list_type,
    load_spec,
    split_list,
)

# name -> (spec class, "module:function" that runs it, help)
JOBS: dict[str, tuple[type, str, str]] = {
    "embed": (EmbedSpec, "pipeline.tasks.embed:run_embed", "embed a corpus into a Parquet dataset"),
    "mine": (MineSpec, "pipeline.tasks.mine:run_mine", "mine hard negatives for (anchor, positive) pairs"),
    "dedup": (
        DedupSpec,
        "pipeline.tasks.dedup:run_dedup",
        "remove near-duplicates by the model's similarity",
    ),
    "reembed": (
        ReembedSpec,
        "pipeline.tasks.reembed:run_reembed",
        "re-embed only new and changed rows into the next version of a snapshot store",
    ),
}


def shown_default(value: Any) -> str:
    """A default as help text shows it: ``none``, ``true`` / ``false``, or the value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or value == []:
        return "none"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default. Spec flags say it in their help (their argparse default is
    SUPPRESS, so that only the flags given reach the spec); other options get ``(default: ...)`` here."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default" in text.lower() or not action.option_strings:
            return text
        return f"{text} (default: {shown_default(action.default).replace('%', '%%')})"


class ListOption(argparse.Action):
    """A list flag: repeatable (``--input a --input b``), comma-separated (``--input a,b``) or several
    values after one flag (``--input a b``); every form adds to the same list."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values:
            items.extend(split_list(value))
        setattr(namespace, self.dest, items)


def default_help(f: dataclasses.Field, kind: Any) -> str:
    """The field's help with its default (or "required") appended, unless the help already says it."""
    text = (f.metadata.get("help") or "").replace("%", "%%")
    if f.name == "storage_option":
        text += "; one per flag (a value may contain commas): repeat the flag for more"
    elif is_list_type(kind):
        text += "; repeat the flag or separate with commas"
    if "default" in text.lower():
        return text
    if f.metadata.get("required"):
        return f"{text} (required)"
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return f"{text} (default: {shown_default(default).replace('%', '%%')})"


def add_field_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, annotation: Any) -> None:
    """The flag of one spec field: ``--field-name``; only a flag given on the command line reaches the spec."""
    kind, _ = base_type(annotation)
    flag = "--" + f.name.replace("_", "-")
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": default_help(f, kind)}
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif f.name == "storage_option":  # KEY=VALUE pairs are never split: a value may hold commas
        parser.add_argument(flag, action="append", metavar="KEY=VALUE", **kwargs)
    elif is_list_type(kind):
        parser.add_argument(
            flag, action=ListOption, nargs="+", metavar=f.name.split("_")[-1].upper(), **kwargs
        )
    elif kind is int:
        parser.add_argument(flag, type=int, **kwargs)
    elif kind is float:
        parser.add_argument(flag, type=float, **kwargs)
    else:
        parser.add_argument(flag, **kwargs)


def add_spec_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per spec field; only flags given on the command line reach the spec."""
    parser.add_argument(
        "--spec", help="YAML spec file (keys are these flags' names with _ for -); flags override it"
    )
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        add_field_flag(parser, f, types[f.name])


def resolve(target: str) -> Callable:
    import importlib

    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedpipe",
        description="Sentence embeddings at corpus scale, on Ray. List options take a repeated flag or "
        "comma-separated values (--input a --input b, --input a,b); --storage-option takes one KEY=VALUE "
        "per flag.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, with tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in JOBS.items():
        job = commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add_spec_arguments(job, cls)
    help_text = "show what the encoder will do with a model"
    inspect = commands.add_parser(
        "inspect", help=help_text, description=help_text, formatter_class=HelpFormatter
    )
    inspect.add_argument("model", help="model directory or URL")
    inspect.add_argument("--truncate-dim", type=int, default=None, help="keep the first N dimensions")
    inspect.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option; one KEY=VALUE per flag, repeat the flag for more",
    )
    inspect.add_argument(
        "--allow-pickle", action="store_true", help="allow pickle checkpoints (trusted models)"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    add_convert_parser(commands)
    help_text = "embed the Python standard library's docstrings locally"
    demo = commands.add_parser("demo", help=help_text, description=help_text, formatter_class=HelpFormatter)
    demo.add_argument("--output", default="demo-output", help="where the demo writes")
    return parser


def run_job(name: str, args: argparse.Namespace) -> int:
    cls, target, _ = JOBS[name]
    values = {k: v for k, v in vars(args).items() if k not in ("spec", "command", "verbose")}
    spec = load_spec(cls, args.spec, values)
    summary = resolve(target)(spec)
    print(json.dumps(summary, indent=2))
    return 0


def add_convert_parser(commands) -> None:
    """``embedpipe convert --to FORMAT --input IN --output OUT``: the same flags as every other command; the
    older ``convert --to FORMAT IN OUT`` (paths as positionals) is still accepted."""
    help_text = "convert a mining output between labeled-pair and triplet layouts"
    parser = commands.add_parser(
        "convert", help=help_text, description=help_text, formatter_class=HelpFormatter
    )
    types = field_types(ConvertSpec)
    for f in dataclasses.fields(ConvertSpec):
        add_field_flag(parser, f, types[f.name])
    parser.add_argument("paths", nargs="*", default=[], help=argparse.SUPPRESS)


def convert_values(args: argparse.Namespace) -> dict:
    """The convert spec's values: flags, with positional paths filling the path fields not given as flags."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertSpec) if hasattr(args, f.name)}
    missing = [
        f.name
        for f in dataclasses.fields(ConvertSpec)
        if f.metadata.get("positional") and f.name not in values
    ]
    if len(args.paths) > len(missing):
        given = ", ".join(f"--{name}" for name in ("input", "output") if name not in missing)
        raise SpecError(
            f"too many paths ({' '.join(args.paths)}): use --input IN --output OUT"
            + (f" ({given} already given)" if given else "")
        )
    values.update(zip(missing, args.paths, strict=False))
    return values


def run_convert(args: argparse.Namespace) -> int:
    from pipeline.spec import build_spec
    from pipeline.tasks.convert import run_convert as convert

    spec = build_spec(ConvertSpec, convert_values(args), "options")
    print(json.dumps(convert(spec), indent=2))
    return 0


def quiet_weight_loading() -> None:
    """No "Loading weights" bar when this process loads a model (inspect, demo)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def run_inspect(args: argparse.Namespace) -> int:
    from pipeline.io.storage import parse_storage_options
    from pipeline.model import load_encoder
    from pipeline.model.files import local_model_dir
    from pipeline.stages.embed import model_display_name

    quiet_weight_loading()
    storage_options = parse_storage_options(args.storage_option)
    encoder = load_encoder(
        args.model,
        device="cpu",
        truncate_dim=args.truncate_dim,
        allow_pickle=args.allow_pickle,
        storage_options=storage_options,
    )
    # The name an embed output records as model_name (by default).
    info = dict(
        encoder.describe(), name=model_display_name(local_model_dir(args.model, storage_options), args.model)
    )
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        if isinstance(value, dict):
            shown = ", ".join(f"{k}={v!r}" for k, v in value.items()) or "none"
        print(f"{key:<{width}}  {shown}")
    return 0


def interrupted_message(prog: str, command: str) -> str:
    """What Ctrl-C leaves behind, and how to go on."""
    if command in JOBS or command == "demo":
        return (
            f"{prog}: interrupted. What was committed is kept: run the same command again to resume "
            "where it stopped."
        )
    return f"{prog}: interrupted"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        if args.command == "inspect":
            return run_inspect(args)
        if args.command == "convert":
            return run_convert(args)
        if args.command == "demo":
            from pipeline.demo import run_demo

            quiet_weight_loading()
            return run_demo(args.output)
        return run_job(args.command, args)
    except KeyboardInterrupt:
        print(interrupted_message(f"embedpipe {args.command}", args.command), file=sys.stderr)
        return 130
    except Exception as exc:  # every failure ends in one clear line; -v adds the traceback
        from pipeline.io.storage import redact

        if args.verbose:
            import traceback

            print(redact(traceback.format_exc()), file=sys.stderr)
        kind = "" if isinstance(exc, SpecError | ValueError | RuntimeError) else f"{type(exc).__name__}: "
        print(f"embedpipe {args.command}: error: {kind}{redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
