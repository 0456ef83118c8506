"""Job specs as dataclasses, loaded from YAML or from command-line flags with one set of names.

A YAML key is the flag's name with ``-`` as ``_``: ``--text-column`` is ``text_column``. Every field
carries its help text and allowed values, so the CLI, the YAML loader and the validation errors all
come from the same place. Unknown keys and wrong types are errors that name the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """An invalid job spec; the message names the field and what was expected."""


def opt(
    default: Any = None,
    help: str = "",
    choices: tuple | None = None,
    required: bool = False,
    positional: bool = False,
) -> Any:
    """A spec field with its CLI help and allowed values."""
    metadata = {"help": help, "choices": choices, "required": required, "positional": positional}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RuntimeOptions:
    """Flags every job takes: where Ray runs and how storage is reached."""

    workers: int | None = opt(None, "encoder actors (default: one per GPU, else 1)")
    ray_address: str | None = opt(None, "Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE")
    progress: bool = opt(True, "show a progress bar on stderr")


@dataclass
class EncodeOptions:
    """How texts become vectors."""

    model: str | None = opt(None, "model directory or URL (sentence-transformers format)", required=True)
    text_column: str = opt("text", "column holding the texts")
    id_column: str | None = opt(None, "column holding the ids (default: 'id' when present, else file:row)")
    prompt_name: str | None = opt(None, "prompt name from the model's config")
    prompt: str | None = opt(None, "literal prompt prepended to every text")
    role: str | None = opt(
        None,
        "encode the texts as queries or documents: the model's prompt, Router route and length for that role, "
        "as sentence-transformers' encode_query / encode_document (default: plain encode)",
        ("query", "document"),
    )
    truncate_dim: int | None = opt(None, "keep the first N dimensions (Matryoshka)")
    max_batch_tokens: int | None = opt(None, "padded tokens per forward batch")
    dtype: str = opt(
        "auto",
        "weights and compute dtype (auto: the checkpoint's own dtype; float32 weights run exact float32 on CPU "
        "and bf16 autocast on GPU; float16/bfloat16: weights in that dtype, e.g. bfloat16 on CPUs with AMX)",
        ("auto", "float32", "float16", "bfloat16"),
    )
    allow_pickle: bool = opt(False, "allow pickle checkpoints (pytorch_model.bin); only for trusted models")
    model_name: str | None = opt(
        None,
        "name recorded as model_name in the output's metadata (default: the model's own name from its "
        "model card or config, else the directory name)",
    )


@dataclass
class EmbedSpec(EncodeOptions, RuntimeOptions):
    input: list[str] = opt([], "input URLs or globs (Parquet, JSON Lines, Arrow IPC)", required=True)
    output: str | None = opt(None, "output dataset URL", required=True)
    keep_columns: list[str] = opt([], "columns carried through to the output")
    rows_per_shard: int | None = opt(
        None, "rows per shard (default: the corpus in about 64 shards of 10,000 to 250,000 rows)"
    )
    precision: str = opt("float32", "embedding storage precision", ("float32", "float16", "int8", "ubinary"))
    on_null: str = opt(
        "fail", "null or empty text: fail, skip the row, or embed ''", ("fail", "skip", "empty")
    )
    on_duplicate_id: str = opt("fail", "duplicate ids: fail or keep", ("fail", "keep"))
    max_attempts: int = opt(3, "attempts per shard before the job fails")
    overwrite: bool = opt(False, "replace an existing output made with other options")
    cpus_per_worker: int | None = opt(
        None,
        "CPUs each encoder actor asks Ray for, and tokenizes (and, on CPU, computes) on (default: on GPU nodes "
        "the node's CPUs divided by its GPUs, at least 2; on CPU-only clusters the CPUs shared by the workers)",
    )


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for annotations like ``int | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return annotation, False


def is_list_type(kind: Any) -> bool:
    """A list option (``list[str]``)."""
    return typing.get_origin(kind) is list


def split_list(value: str) -> list[str]:
    """One value of a list option: comma-separated items, blanks dropped (``"a, b,"`` -> ``["a", "b"]``)."""
    return [item.strip() for item in value.split(",") if item.strip()]


# List options whose items are never split on commas: a KEY=VALUE's value may hold commas.
UNSPLIT_LISTS = frozenset({"storage_option"})


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check and convert one value; the error names the field.

    A list option takes a list, or one string of comma-separated items (as its flag does), except
    ``storage_option``, whose string is one KEY=VALUE."""
    kind, optional = base_type(annotation)
    if value is None:
        if optional:
            return None
        raise SpecError(f"{name}: must not be empty")
    if is_list_type(kind):
        if isinstance(value, str):
            value = [value] if name in UNSPLIT_LISTS else split_list(value)
        if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
            raise SpecError(f"{name}: expected a list of strings, got {value!r}")
        return [str(v) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise SpecError(f"{name}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise SpecError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise SpecError(f"{name}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise SpecError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SpecError(f"{name}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise SpecError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def build_spec(cls: type, values: dict[str, Any], source: str = "spec") -> Any:
    """Validate a mapping against a spec class: unknown keys, types, choices, required fields."""
    if not isinstance(values, dict):
        raise SpecError(f"{source}: expected a mapping of options, got {type(values).__name__}")
    known = field_types(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    converted = {name: coerce(name, value, known[name]) for name, value in values.items()}
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        value = converted.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        if choices and value is not None and value not in choices:
            raise SpecError(f"{f.name}: {value!r} is not one of {', '.join(map(str, choices))}")
        if f.metadata.get("required") and not converted.get(f.name):
            default = f.default if f.default is not dataclasses.MISSING else None
            if not default:
                raise SpecError(f"{f.name}: required ({f.metadata.get('help', '')})")
    spec = cls(**converted)
    spec.__dict__["explicit_keys"] = frozenset(converted)
    validate = getattr(spec, "validate", None)
    if validate:
        validate()
    return spec


def explicit_keys(spec: Any) -> frozenset[str]:
    """The options the user set (in YAML or flags); for a spec built in code, those off their default."""
    given = spec.__dict__.get("explicit_keys")
    if given is not None:
        return given
    return frozenset(
        f.name
        for f in dataclasses.fields(spec)
        if getattr(spec, f.name)
        != (f.default if f.default is not dataclasses.MISSING else f.default_factory())
    )


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    return data or {}


def load_spec(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """A spec from a YAML file, with command-line values taking precedence."""
    values = load_yaml(path) if path else {}
    if not isinstance(values, dict):
        raise SpecError(f"{path}: the spec must be a mapping of options")
    values.update(overrides or {})
    return build_spec(cls, values, str(path) if path else "options")


@dataclass
class DedupSpec(RuntimeOptions):
    input: list[str] = opt([], "an embed output, or a raw corpus together with --model")
    output: str | None = opt(
        None, "output URL (kept/, duplicates.parquet, pairs/, report.json)", required=True
    )
    threshold: float | None = opt(None, "score at or above which two rows are duplicates (or a --target-*)")
    target_rows: int | None = opt(None, "keep at most N rows: the highest threshold that gets there is used")
    target_fraction: float | None = opt(
        None, "keep at most this fraction of the rows (0-1), as --target-rows"
    )
    model: str | None = opt(None, "embed a raw corpus first with this model")
    against: list[str] = opt(
        [],
        "decontaminate: remove input rows that match these reference rows (an embed "
        "output, or a raw corpus with --model); the reference is only read",
    )
    similarity: str | None = opt(
        None, "override the model's similarity function", ("cosine", "dot", "euclidean", "manhattan")
    )
    mode: str = opt(
        "exact",
        "exact: all pairs; partitioned: k-means, then pairs inside clusters",
        ("exact", "partitioned"),
    )
    clusters: int | None = opt(None, "k-means clusters for --mode partitioned (default: sqrt(rows))")
    keep: str = opt("first", "which member of a group stays", ("first", "longest", "centroid"))
    pairs_floor: float | None = opt(None, "store every pair at or above this score (default: threshold)")
    from_pairs: str | None = opt(
        None, "re-group the pairs/ of an earlier dedup output at a stricter threshold"
    )
    text_column: str = opt("text", "text column (raw corpus, and --keep longest)")
    with_text: bool = opt(False, "duplicates.parquet also holds each removed row's text and its kept row's")
    id_column: str | None = opt(None, "id column of a raw corpus (default: 'id' when present, else file:row)")
    rows_per_shard: int = opt(10000, "rows per shard when embedding a raw corpus")
    block_size: int = opt(4096, "rows per scoring tile")
    seed: int = opt(0, "k-means seed")
    kmeans_iterations: int = opt(20, "k-means iterations")
    recall_sample: int = opt(1000, "rows sampled to estimate partitioned mode's recall against exact")
    overwrite: bool = opt(False, "replace an existing output made with other options")

    def validate(self) -> None:
        if not self.input and not self.from_pairs:
            raise SpecError("input: required (or from_pairs)")
        if self.clusters is not None and self.clusters < 1:
            raise SpecError("clusters: must be at least 1")
        if self.block_size < 1:
            raise SpecError("block_size: must be at least 1")
        if self.pairs_floor is not None and self.threshold is not None and self.pairs_floor > self.threshold:
            raise SpecError(f"pairs_floor: {self.pairs_floor} is above the threshold {self.threshold}")
        targets = [name for name in ("target_rows", "target_fraction") if getattr(self, name) is not None]
        if len(targets) > 1:
            raise SpecError("target_rows, target_fraction: give one of them, not both")
        if self.threshold is None and not targets:
            raise SpecError("threshold: required (or target_rows / target_fraction to pick it)")
        if targets and self.threshold is not None:
            raise SpecError(f"{targets[0]}: picks the threshold itself; drop threshold ({self.threshold})")
        if targets and self.pairs_floor is None and not self.from_pairs:
            raise SpecError(f"pairs_floor: required with {targets[0]} (the lowest threshold it may pick)")
        if self.target_rows is not None and self.target_rows < 0:
            raise SpecError(f"target_rows: must be 0 or more, got {self.target_rows}")
        if self.target_fraction is not None and not 0 <= self.target_fraction <= 1:
            raise SpecError(f"target_fraction: must be between 0 and 1, got {self.target_fraction}")


MINING_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")


@dataclass
class MineSpec(RuntimeOptions):
    model: str | None = opt(
        None, "model directory or URL (sentence-transformers format); with --from-candidates: a check only"
    )
    input: list[str] = opt(
        [],
        "(anchor, positive) pairs: Parquet / JSON Lines / Arrow files or globs (--from-candidates: theirs)",
    )
    output: str | None = opt(
        None, "output URL (part-*.parquet; .embedpipe/ holds the report and bookkeeping)", required=True
    )
    corpus: list[str] = opt([], "extra corpus (files, or an embed output); default: the positives only")
    corpus_text_column: str = opt("text", "text column of a separate corpus")
    anchor_column: str | None = opt(
        None, "anchor column (default: anchor, query or question; else the first of exactly two text columns)"
    )
    positive_column: str | None = opt(
        None,
        "positive column (default: positive, answer, document or text; else the second of two text columns)",
    )
    range_min: int = opt(0, "skip the first N candidates")
    range_max: int | None = opt(None, "consider at most N candidates (default as sentence-transformers)")
    max_score: float | None = opt(None, "drop candidates scoring above this")
    min_score: float | None = opt(None, "drop candidates scoring below this")
    absolute_margin: float | None = opt(
        None, "negatives must score this much below the anchor's lowest positive"
    )
    relative_margin: float | None = opt(
        None, "negatives must score this share below the anchor's lowest positive"
    )
    num_negatives: int = opt(3, "negatives per anchor")
    sampling_strategy: str = opt("top", "take the top of the window or sample it", ("top", "random"))
    seed: int = opt(0, "seed for --sampling-strategy random")
    include_positives: bool = opt(False, "keep positives among the candidates (forces n-tuple)")
    output_format: str = opt("triplet", "sentence-transformers output layout", MINING_FORMATS)
    output_scores: bool = opt(False, "add the scores column(s)")
    preset: str | None = opt(None, "NV-Retriever positive-aware preset", ("percpos95", "marginpos"))
    query_prompt_name: str | None = opt(None, "prompt name for anchors (default: the model's 'query' prompt)")
    query_prompt: str | None = opt(None, "literal prompt for anchors")
    corpus_prompt_name: str | None = opt(None, "prompt name for the corpus (default: the model's 'document')")
    corpus_prompt: str | None = opt(None, "literal prompt for the corpus")
    anchors_per_block: int = opt(1024, "anchors scored and written per output part")
    block_size: int = opt(4096, "rows per scoring tile")
    texts_per_task: int = opt(2048, "texts per encoding task")
    max_batch_tokens: int | None = opt(None, "padded tokens per forward batch")
    allow_pickle: bool = opt(False, "allow pickle checkpoints (pytorch_model.bin); only for trusted models")
    overwrite: bool = opt(False, "replace an existing output made with other options")
    cross_encoder: str | None = opt(
        None, "CrossEncoder directory or URL: rescores candidates and positives when a score rule is set"
    )
    max_positive_similarity: float | None = opt(
        None, "drop candidates scoring this much or more against one of the anchor's positives"
    )
    exclude_duplicates: str | None = opt(
        None, "a dedup output: drop candidates in the same duplicate group as one of the anchor's positives"
    )
    save_candidates: bool = opt(
        False, "keep every anchor's candidate window in .embedpipe/candidates/ for re-filtering"
    )
    from_candidates: str | None = opt(
        None, "re-filter the saved candidates of an earlier --save-candidates output (no model, no encoding)"
    )

    def validate(self) -> None:
        if not self.from_candidates:
            if not self.model:
                raise SpecError("model: required (model directory or URL), or from_candidates")
            if not self.input:
                raise SpecError("input: required ((anchor, positive) pairs), or from_candidates")
        elif self.save_candidates:
            raise SpecError("save_candidates: the candidates are already saved in from_candidates")
        if self.anchors_per_block < 1:
            raise SpecError("anchors_per_block: must be at least 1")
        if self.range_max is not None and self.range_min >= self.range_max:
            raise SpecError(f"range_min: {self.range_min} must be smaller than range_max {self.range_max}")
        for name in ("absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SpecError(f"{name}: must not be negative, got {value}")
        if self.num_negatives < 1:
            raise SpecError("num_negatives: must be at least 1")


@dataclass
class ConvertSpec:
    to: str | None = opt(None, "target layout", ("labeled-pair", "triplet"), required=True)
    input: str | None = opt(
        None, "a triplet / n-tuple / labeled-pair Parquet file or folder", required=True, positional=True
    )
    output: str | None = opt(None, "output folder", required=True, positional=True)
    anchor_column: str | None = opt(None, "anchor column (default: the first column)")
    positive_column: str | None = opt(None, "positive column (default: the second column)")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE")


@dataclass
class ReembedSpec(EncodeOptions, RuntimeOptions):
    """Embed options for a versioned store: ids from a column (they must stay stable), plus housekeeping."""

    input: list[str] = opt(
        [], "input URLs or globs (Parquet, JSON Lines, Arrow IPC); needs an id column", required=True
    )
    output: str | None = opt(None, "snapshot store URL (v00001/, v00002/, ..., _LATEST)", required=True)
    keep_columns: list[str] = opt([], "columns carried through to the output")
    rows_per_shard: int = opt(10000, "rows per shard and per output part")
    precision: str = opt("float32", "embedding storage precision", ("float32", "float16", "int8", "ubinary"))
    on_null: str = opt(
        "fail", "null or empty text: fail, skip the row, or embed ''", ("fail", "skip", "empty")
    )
    max_attempts: int = opt(3, "attempts per shard before the job fails")
    keep: int | None = opt(None, "versions to keep, the one _LATEST names included (default: all)")
    break_lock: bool = opt(False, "remove a _LOCK left by a crashed run (only when no run is active)")

    def validate(self) -> None:
        if self.keep is not None and self.keep < 1:
            raise SpecError(
                f"keep: must be at least 1 (the version _LATEST names is never removed), got {self.keep}"
            )
        if self.rows_per_shard < 1:
            raise SpecError(f"rows_per_shard: must be at least 1, got {self.rows_per_shard}")
        if self.max_attempts < 1:
            raise SpecError(f"max_attempts: must be at least 1, got {self.max_attempts}")
        reserved = sorted({"id", "embedding", "content_hash"} & set(self.keep_columns))
        if reserved:
            raise SpecError(f"keep_columns: {', '.join(reserved)} is a column reembed writes itself")
