"""Command line: flags (or a YAML spec) become a job spec, and a job runs it. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.spec import (
    ConvertSpec,
    DedupSpec,
    EmbedSpec,
    MineSpec,
    ReembedSpec,
    SpecError,
    base_type,
    field_types,
    load_spec,
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


def add_spec_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per spec field; only flags given on the command line reach the spec."""
    parser.add_argument("--spec", help="YAML spec file (keys are these flags' names with _ for -)")
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        kind, _ = base_type(types[f.name])
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f.metadata.get("help"),
        }
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name in ("input",):
            parser.add_argument(flag, nargs="+", **kwargs)
        elif f.name == "storage_option":
            parser.add_argument(flag, action="append", metavar="KEY=VALUE", **kwargs)
        elif kind is int:
            parser.add_argument(flag, type=int, **kwargs)
        elif kind is float:
            parser.add_argument(flag, type=float, **kwargs)
        else:
            parser.add_argument(flag, **kwargs)


def resolve(target: str) -> Callable:
    import importlib

    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedpipe", description="Sentence embeddings at corpus scale, on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in JOBS.items():
        add_spec_arguments(commands.add_parser(name, help=help_text, description=help_text), cls)
    inspect = commands.add_parser("inspect", help="show what the encoder will do with a model")
    inspect.add_argument("model", help="model directory or URL")
    inspect.add_argument("--truncate-dim", type=int, default=None)
    inspect.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    inspect.add_argument("--allow-pickle", action="store_true")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    add_convert_parser(commands)
    demo = commands.add_parser("demo", help="embed the Python standard library's docstrings locally")
    demo.add_argument("--output", default="demo-output", help="where the demo writes (default: demo-output)")
    return parser


def run_job(name: str, args: argparse.Namespace) -> int:
    cls, target, _ = JOBS[name]
    values = {k: v for k, v in vars(args).items() if k not in ("spec", "command", "verbose")}
    spec = load_spec(cls, args.spec, values)
    summary = resolve(target)(spec)
    print(json.dumps(summary, indent=2))
    return 0


def add_convert_parser(commands) -> None:
    """``embedpipe convert --to FORMAT INPUT OUTPUT``: positional fields, so not the generic flag builder."""
    help_text = "convert a mining output between labeled-pair and triplet layouts"
    parser = commands.add_parser("convert", help=help_text, description=help_text)
    for f in dataclasses.fields(ConvertSpec):
        meta = f.metadata
        if meta.get("positional"):
            parser.add_argument(f.name, help=meta.get("help"))
        elif f.name == "storage_option":
            parser.add_argument(
                "--storage-option",
                dest=f.name,
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help=meta.get("help"),
            )
        else:
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                choices=meta.get("choices"),
                required=bool(meta.get("required")),
                default=argparse.SUPPRESS,
                help=meta.get("help"),
            )


def run_convert(args: argparse.Namespace) -> int:
    from pipeline.spec import build_spec
    from pipeline.tasks.convert import run_convert as convert

    names = {f.name for f in dataclasses.fields(ConvertSpec)}
    spec = build_spec(ConvertSpec, {k: v for k, v in vars(args).items() if k in names}, "options")
    print(json.dumps(convert(spec), indent=2))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from pipeline.io.storage import parse_storage_options
    from pipeline.model import load_encoder

    encoder = load_encoder(
        args.model,
        device="cpu",
        truncate_dim=args.truncate_dim,
        allow_pickle=args.allow_pickle,
        storage_options=parse_storage_options(args.storage_option),
    )
    info = encoder.describe()
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

            return run_demo(args.output)
        return run_job(args.command, args)
    except KeyboardInterrupt:
        print(f"embedpipe {args.command}: interrupted", file=sys.stderr)
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
