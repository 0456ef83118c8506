"""What every ``python -m jobs.<job>`` does: spec -> job from ``pipeline.cli.JOBS`` -> JSON summary -> exit code.

Kept apart from ``pipeline.cli`` so a Ray job's command line stays one fixed shape (``--spec`` plus, if
wanted, the job's own flags as overrides) and so the job is looked up by name at run time: a job that
this installation lacks is a clear error, not an ImportError.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any


def read_spec(cls: type, location: str, overrides: dict[str, Any]) -> Any:
    """The validated spec from a local YAML file or a URL (s3://...; read with --storage-option values,
    else the environment's credentials, as a cluster's containers have them)."""
    from pipeline.spec import SpecError, build_spec, load_spec

    if "://" not in location or location.startswith("file://"):
        return load_spec(cls, location.removeprefix("file://"), overrides)
    import yaml

    from pipeline.io.storage import filesystem, parse_storage_options, redact, with_retries

    try:
        fs, path = filesystem(location, parse_storage_options(overrides.get("storage_option") or []))
        text = with_retries(lambda: fs.cat_file(path), what=location).decode("utf-8")
    except Exception as exc:
        raise SpecError(redact(f"{location}: cannot read the spec ({type(exc).__name__}: {exc})")) from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{location}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise SpecError(f"{location}: the spec must be a mapping of options")
    values.update(overrides)
    return build_spec(cls, values, location)


def main(job: str, argv: Sequence[str] | None = None) -> int:
    """Run ``job`` as a Ray job driver; 0 when it succeeded, 2 for a bad spec or a failed run."""
    from pipeline.cli import JOBS, HelpFormatter, add_spec_arguments, resolve
    from pipeline.io.storage import redact
    from pipeline.spec import SpecError

    prog = f"python -m jobs.{job}"
    if job not in JOBS:
        print(
            f"{prog}: error: this embedpipe installation has no {job!r} job (pipeline.cli.JOBS has "
            f"{', '.join(sorted(JOBS))}); install a version that provides it",
            file=sys.stderr,
        )
        return 2
    cls, target, help_text = JOBS[job]
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{help_text}. Run as a Ray job driver: RAY_ADDRESS (set by `ray job submit`) "
        "names the cluster. Flags override the spec's keys.",
        formatter_class=HelpFormatter,
    )
    add_spec_arguments(parser, cls)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, with tracebacks")
    args = parser.parse_args(argv)
    if not args.spec:
        parser.error("--spec is required")
    overrides = {k: v for k, v in vars(args).items() if k not in ("spec", "verbose")}
    try:
        spec = read_spec(cls, args.spec, overrides)
    except SpecError as exc:
        print(f"{prog}: invalid spec {args.spec}: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        summary = resolve(target)(spec)
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted. What was committed is kept: submit the same job again to resume where it "
            "stopped.",
            file=sys.stderr,
        )
        return 130
    except (
        Exception
    ) as exc:  # one clear line (the job's log is what an operator reads); -v adds the traceback
        if args.verbose:
            import traceback

            print(redact(traceback.format_exc()), file=sys.stderr)
        kind = "" if isinstance(exc, ValueError | RuntimeError) else f"{type(exc).__name__}: "
        print(f"{prog}: error: {kind}{redact(str(exc))}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
