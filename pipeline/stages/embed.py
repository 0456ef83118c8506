"""The embed stage: plan shards, encode them on Ray actors, commit one part per shard, finish once.

The embed job is this stage alone; dedup (a raw corpus) and reembed (the changed rows) compose it too.

Order of events: validate inputs and model on the driver; refuse an output made with other options;
store the plan; skip shards whose receipts are committed; run the rest on the actors; check every part
against its receipt; write the manifest and ``.embedpipe/SUCCESS`` last.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from tqdm import tqdm

from pipeline import __version__
from pipeline.io import corpus
from pipeline.io.corpus import CorpusError, Shard
from pipeline.io.dataset import calibrate_int8, quantize, write_embedding_part
from pipeline.io.output import (
    BOOKKEEPING_DIR,
    PLAN_FILE,
    DatasetError,
    OutputFolder,
    plan_fields,
    plan_key,
)
from pipeline.io.rows import Columns, check_rows, resolve_columns, texts_of
from pipeline.io.storage import StorageError, parse_storage_options, redact, safe_options
from pipeline.model.config import resolve_role
from pipeline.model.files import fingerprint, local_model_dir
from pipeline.model.modules import check_model
from pipeline.spec import EmbedSpec

CALIBRATION_ROWS = 2048


class EmbedError(RuntimeError):
    """The job cannot finish; the message says which shard or input, and why."""


class EmbedOptionError(EmbedError, ValueError):
    """An option the model refuses (an unknown prompt name, a role its Router lacks): a ValueError too."""


# -- the work each actor does -----------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedShardWork:
    """Read + tokenize (``load``, prefetched) and encode + commit (``process``) one shard."""

    output: OutputFolder
    columns: Columns
    prompt: str
    role: str | None
    precision: str
    calibration: dict | None
    metadata: dict
    on_null: str
    max_batch_tokens: int | None
    storage_options: dict

    def load(self, encoder, shard: Shard):
        """(ids, table, tokens, skipped rows, seconds per stage): runs on the actor's prefetch thread while
        the previous shard is encoded; the tokenizing itself runs on the encoder's tokenize threads."""
        started = time.perf_counter()
        table = corpus.read_shard(shard, self.columns.read, self.storage_options)
        ids = corpus.ids_of(table, shard, self.columns.id)
        texts, keep = texts_of(table, shard, self.columns.text, self.on_null)
        if not keep.all():
            mask = pa.array(keep)
            table, ids = table.filter(mask), pc.filter(ids, mask)
        read = time.perf_counter()
        tokens = encoder.tokenize(texts, self.prompt, self.role)
        stages = {"read": read - started, "tokenize": time.perf_counter() - read}
        return ids, table, tokens, int((~keep).sum()), stages

    def encode(self, encoder, shard: Shard, loaded) -> EncodedShard:
        """The forward pass (the device's part): vectors and their counts, nothing written."""
        started = time.perf_counter()
        ids, table, tokens, skipped, loaded_stages = loaded
        stages = dict(loaded_stages)
        counters = encoder.counters
        before = (counters.tokens, counters.padded_tokens, counters.stage_seconds())
        vectors = encoder.encode_tokens(tokens, self.max_batch_tokens)
        for name, seconds in counters.stage_seconds().items():
            if name != "tokenize":  # measured in load, on the prefetch thread
                stages[name] = seconds - before[2][name]
        return EncodedShard(
            ids,
            table,
            vectors,
            skipped,
            stages,
            tokens=counters.tokens - before[0],
            padded_tokens=counters.padded_tokens - before[1],
            seconds=time.perf_counter() - started,
        )

    def commit(self, encoder, shard: Shard, encoded: EncodedShard, attempt: int) -> dict:
        """Convert, write and commit the part and its receipt (the host's part: on an actor it runs on a
        thread of its own while the device encodes the next shard)."""
        converting = time.perf_counter()
        if not np.isfinite(encoded.vectors).all():
            raise EmbedError(
                f"{shard.url}: rows {shard.row_start}-{shard.row_end - 1}: non-finite embeddings"
            )
        columns = {
            "id": encoded.ids,
            "embedding": quantize(encoded.vectors, self.precision, self.calibration),
        }
        for name in self.columns.keep:
            columns[name] = encoded.table.column(name)
        part = pa.table(columns)
        writing = time.perf_counter()
        stages = dict(encoded.stages, convert=writing - converting)
        receipt = write_embedding_part(
            self.output,
            shard.shard_id,
            part,
            self.metadata,
            tokens=encoded.tokens,
            padded_tokens=encoded.padded_tokens,
            seconds=round(encoded.seconds + writing - converting, 3),
            attempt=attempt,
            skipped_rows=encoded.skipped,
            stages={name: round(seconds, 4) for name, seconds in stages.items()},
        ).to_dict()
        # the driver's copy also has the time the part and its receipt took to write and commit
        finished = time.perf_counter()
        receipt["stages"] = dict(receipt["stages"], write_commit=round(finished - writing, 4))
        receipt["seconds"] = round(encoded.seconds + finished - converting, 3)
        return receipt

    def process(self, encoder, shard: Shard, loaded, attempt: int) -> dict:
        return self.commit(encoder, shard, self.encode(encoder, shard, loaded), attempt)


@dataclass
class EncodedShard:
    """A shard's vectors between the forward pass and the commit."""

    ids: pa.Array
    table: pa.Table
    vectors: np.ndarray
    skipped: int
    stages: dict
    tokens: int
    padded_tokens: int
    seconds: float


# -- the job --------------------------------------------------------------------------------------


def model_options(spec: EmbedSpec, storage_options: dict) -> dict:
    return {
        "truncate_dim": spec.truncate_dim,
        "allow_pickle": spec.allow_pickle,
        "storage_options": storage_options,
        "dtype": spec.dtype,
    }


def plan_material(
    spec: EmbedSpec, model_fingerprint: str, columns: Columns, shards: list[Shard], sizes: dict
) -> dict:
    """What must match for an existing output to be resumed rather than refused."""
    material = {
        "model": model_fingerprint,
        "columns": columns.__dict__,
        "prompt_name": spec.prompt_name,
        "prompt": spec.prompt,
        "role": spec.role,
        "precision": spec.precision,
        "on_null": spec.on_null,
        "shards": [s.to_dict() for s in shards],
        "sizes": sizes,
    }
    if spec.model_name is not None:  # only when given, so outputs made before --model-name keep their key
        material["model_name"] = spec.model_name
    return material


# The titles sentence-transformers gives a card when the model has no name (its template's placeholder, or
# the class name, "... based on <base model>"): not the model's name.
PLACEHOLDER_MODEL_NAME = re.compile(
    r"(?i)model|sentence transformer model|"
    r"(SentenceTransformer|SparseEncoder|CrossEncoder|MultiVectorEncoder)( based on .+)?"
)


def model_display_name(model_dir: Path, model: str) -> str:
    """The name recorded as ``model_name`` when ``--model-name`` is not given: the model's own name.

    In order: ``org/name`` from a Hugging Face cache path (``.../models--org--name/snapshots/<rev>``);
    ``model_name`` in config_sentence_transformers.json or config.json; the model card (README.md): its
    front matter's ``model_name`` or ``model-index`` name, else its first ``# title`` (sentence-transformers
    writes the model's name there; its placeholders such as "SentenceTransformer based on X" are skipped);
    else the directory's (or URL's) last name. ``base_model`` and
    config.json's ``_name_or_path`` are not used: in a fine-tuned model they name the model it was tuned
    from (all-MiniLM-L6-v2's says ``nreimers/MiniLM-L6-H384-uncased``).
    """
    parts = Path(model.rstrip("/")).parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    for config in ("config_sentence_transformers.json", "config.json"):
        try:
            value = json.loads((model_dir / config).read_text(encoding="utf-8")).get("model_name")
        except (OSError, ValueError, AttributeError):
            value = None
        if name := usable_name(value):
            return name
    if name := model_card_name(model_dir / "README.md"):
        return name
    return Path(model.rstrip("/")).name or model_dir.name


def model_card_name(readme: Path) -> str | None:
    """The model's name from its card: front matter ``model_name`` / ``model-index[0].name``, else the
    first level-1 heading outside code blocks."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    body = text
    front = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.S)
    if front:
        body = text[front.end() :]
        try:
            meta = yaml.safe_load(front.group(1))
        except yaml.YAMLError:
            meta = None
        if isinstance(meta, dict):
            if name := usable_name(meta.get("model_name")):
                return name
            index = meta.get("model-index")
            first = index[0] if isinstance(index, list) and index else None
            if isinstance(first, dict) and (name := usable_name(first.get("name"))):
                return name
    fenced = False
    for line in body.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("# "):
            return usable_name(line[2:].strip().strip("#").strip())
    return None


def usable_name(value) -> str | None:
    """A one-line name of sensible length, or None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or "\n" in value or len(value) > 200 or PLACEHOLDER_MODEL_NAME.fullmatch(value):
        return None
    return value


# What an embed output owns (its parts and the hidden bookkeeping folder): an --overwrite removes these.
EMBED_FILES = (BOOKKEEPING_DIR, "part-*.parquet")


def is_retryable(exc: BaseException) -> bool:
    """Data errors fail at once; storage and other errors are worth another attempt."""
    return not isinstance(exc, CorpusError | DatasetError | EmbedError | UnicodeDecodeError)


def run_embed(spec: EmbedSpec, log=None) -> dict:
    """Run the embed job; returns the summary (also stored in the manifest)."""
    from pipeline.runtime import cluster
    from pipeline.runtime.actors import encoder_pool
    from pipeline.runtime.pool import PoolStats

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    output = OutputFolder(spec.output, storage_options)

    # Model and inputs are checked on the driver, before any actor starts.
    model_dir = local_model_dir(spec.model, storage_options)
    # An unknown --prompt-name fails here, with the model's other checks, before Ray and the actors start.
    try:  # an unknown prompt name or a role the model's Router lacks: before Ray and the actors start
        role = resolve_role(
            check_model(model_dir, spec.allow_pickle), spec.role, spec.prompt_name, spec.prompt
        )
    except ValueError as exc:
        raise EmbedOptionError(str(exc)) from None
    prompt = role.prompt
    model_fingerprint = fingerprint(model_dir, {"truncate_dim": spec.truncate_dim})
    sources = corpus.list_sources(spec.input, storage_options)
    schemas = {s.url: corpus.source_schema(s, storage_options) for s in sources}
    columns = resolve_columns(spec, schemas)
    if spec.rows_per_shard is None:
        shards = corpus.plan_auto_shards(sources, storage_options)
    else:
        shards = corpus.plan_shards(sources, spec.rows_per_shard, storage_options)
    if not shards:
        raise CorpusError(f"{', '.join(spec.input)}: the corpus has no rows")
    key = plan_key(plan_material(spec, model_fingerprint, columns, shards, {s.url: s.size for s in sources}))

    # The plan is written below, once the model has been described by an actor.
    existing = output.claim(
        "embed", key, {}, overwrite=spec.overwrite, owned=EMBED_FILES, log=log, write=False
    )
    if existing is None:
        check_rows(shards, columns, spec.on_null, spec.on_duplicate_id, storage_options)

    done = output.committed() if existing is not None else {}
    todo = [s for s in shards if s.shard_id not in done]
    needs_actors = bool(todo) or "model" not in existing
    if needs_actors:
        cluster.connect(spec.ray_address)
        plan = cluster.plan_actors(spec.workers, spec.cpus_per_worker)
        pool = encoder_pool(plan, str(model_dir), model_options(spec, storage_options))
    else:  # every part is committed: no cluster is needed, the stored plan describes the model
        plan, pool = cluster.ActorPlan(0, 0, 0), None
    # The pool always releases its actors (they hold CPUs/GPUs), whatever happens below.
    with pool if pool is not None else contextlib.nullcontext():
        if pool is not None:
            description = {k: v for k, v in pool.call(0, "describe").items() if k not in ("node", "pid")}
        else:
            description = existing["model"]
        calibration = existing.get("calibration") if existing else None
        if spec.precision == "int8" and calibration is None:
            calibration = calibrate(pool, shards, columns, prompt, spec.role, spec.on_null, storage_options)
        # An output keeps the name it was started with (the card is not fingerprinted); --model-name is in the key.
        stored_name = ((existing or {}).get("metadata") or {}).get("model_name")
        metadata = {
            "model": spec.model if "://" not in spec.model else redact(spec.model),
            "model_name": spec.model_name or stored_name or model_display_name(model_dir, spec.model),
            "fingerprint": description["fingerprint"],
            "pooling": description["pooling"],
            "normalized": description["normalized"],
            "similarity_fn_name": description["similarity_fn_name"],
            "prompt": prompt,
            "role": spec.role,
            "dim": description["dim"],
            "precision": spec.precision,
            "text_column": columns.text,
            "id_column": columns.id,
            "version": __version__,
        }
        if calibration:
            metadata["int8_calibration"] = calibration
        if existing is None:
            output.write_json(
                PLAN_FILE,
                {
                    **plan_fields("embed", key, EMBED_FILES),
                    "shards": [s.to_dict() for s in shards],
                    "metadata": metadata,
                    "model": description,
                    "calibration": calibration,
                    "storage_options": safe_options(storage_options),
                },
            )

        total_rows = sum(s.rows for s in shards)
        log(
            f"embed: {len(shards)} shards ({len(done)} already committed), {total_rows} rows, "
            f"{plan.workers} {'GPU' if plan.num_gpus else 'CPU'} worker(s) -> {redact(output.url)}"
        )
        work = EmbedShardWork(
            output,
            columns,
            prompt,
            spec.role,
            spec.precision,
            calibration,
            metadata,
            spec.on_null,
            spec.max_batch_tokens,
            storage_options,
        )
        receipts = {shard_id: receipt.to_dict() for shard_id, receipt in done.items()}
        stats = PoolStats()
        if todo:
            stats = encode_shards(pool, work, todo, receipts, len(shards), spec, total_rows, done, log)

    tokens = sum(r["tokens"] for r in receipts.values())
    padded = sum(r["padded_tokens"] for r in receipts.values())
    seconds = time.perf_counter() - started
    summary = {
        "output": redact(output.url),
        "rows": sum(r["rows"] for r in receipts.values()),
        "skipped_rows": sum(r.get("skipped_rows", 0) for r in receipts.values()),
        "tokens": tokens,
        "padded_token_ratio": round(1 - tokens / padded, 4) if padded else 0.0,
        "seconds": round(seconds, 2),
        "shards": {
            "total": len(shards),
            "done": len(todo),
            "skipped": len(done),
            "retried": stats.retried,
        },
        "workers": plan.workers,
        "cpus_per_worker": plan.num_cpus,
        "stage_seconds": stage_seconds([receipts[s.shard_id] for s in todo]),
        "actors_replaced": stats.actors_replaced,
        "rows_per_second": round(sum(receipts[s.shard_id]["rows"] for s in todo) / seconds, 1)
        if todo
        else 0.0,
    }
    manifest = {
        "metadata": metadata,
        "summary": summary,
        "versions": versions(),
        "input": [redact(u) for u in spec.input],
    }
    output.finish(manifest, expected={"": [s.shard_id for s in shards]})
    if not output.is_complete():
        raise StorageError(f"{redact(output.url)}: .embedpipe/SUCCESS was not written")
    log(
        f"embed: done: {summary['rows']} rows in {len(shards)} shards ({len(todo)} encoded now, {len(done)} "
        f"already committed) in {clock(seconds)}; {redact(output.url)} is complete (.embedpipe/SUCCESS)"
    )
    return summary


def stage_seconds(receipts: list[dict]) -> dict[str, float]:
    """Seconds per stage (read, tokenize, pad, forward, to_host, convert, write_commit) summed over the shards
    encoded in this run: actor-seconds, for finding the slow stage; stages overlap (read and tokenize run on
    the prefetch thread while the previous shard is encoded), so they add up to more than the wall time."""
    total: dict[str, float] = {}
    for receipt in receipts:
        for name, seconds in (receipt.get("stages") or {}).items():
            total[name] = total.get(name, 0.0) + seconds
    return {name: round(seconds, 3) for name, seconds in total.items()}


def clock(seconds: float) -> str:
    """``1:02:03`` for log lines."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def encode_shards(
    pool,
    work: EmbedShardWork,
    todo: list[Shard],
    receipts: dict,
    shard_count: int,
    spec: EmbedSpec,
    total_rows: int,
    done: dict,
    log=None,
):
    """Every shard in ``todo`` on whichever encoder actor is free; receipts land in ``receipts``.

    With ``progress`` a bar on stderr; without (job logs, where a bar is noise), one ``log`` line per
    committed shard: shards and rows so far, this run's rate, and the time left at that rate."""
    from pipeline.runtime.actors import run_shards
    from pipeline.runtime.pool import ShardFailed

    log = log or (lambda message: print(message, file=sys.stderr))
    rows_so_far = sum(r.rows + r.details.get("skipped_rows", 0) for r in done.values())
    bar = tqdm(
        total=total_rows,
        initial=rows_so_far,
        unit="rows",
        disable=not spec.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    encode_started = time.perf_counter()
    new_tokens = 0
    new_rows = 0

    def on_result(_key, shard: Shard, receipt: dict) -> None:
        nonlocal new_tokens, new_rows, rows_so_far
        receipts[shard.shard_id] = receipt
        new_tokens += receipt["tokens"]
        new_rows += shard.rows
        rows_so_far += shard.rows
        elapsed = max(time.perf_counter() - encode_started, 1e-9)
        bar.update(shard.rows)
        bar.set_postfix(tokens_s=f"{new_tokens / elapsed:,.0f}")
        if not spec.progress:
            rate = new_rows / elapsed
            eta = clock((total_rows - rows_so_far) / rate) if rate > 0 else "?"
            log(
                f"embed: shard {shard.shard_id} committed ({receipt['rows']} rows); {len(receipts)}/{shard_count} "
                f"shards, {rows_so_far}/{total_rows} rows, {rate:,.0f} rows/s, "
                f"{new_tokens / elapsed:,.0f} tokens/s, ETA {eta}"
            )

    try:
        return pool.run_queue(
            [(s.shard_id, s) for s in todo],
            run_shards(work),
            on_result=on_result,
            max_attempts=spec.max_attempts,
            is_retryable=is_retryable,
        )
    except ShardFailed as failure:
        shard: Shard = failure.item
        raise EmbedError(
            redact(
                f"shard {shard.shard_id} ({shard.url} rows {shard.row_start}-{shard.row_end - 1}) failed after "
                f"{failure.attempts} attempt(s): {failure.cause}; {len(receipts)} of {shard_count} shards are "
                "committed and a re-run resumes from there"
            )
        ) from None
    finally:
        bar.close()


def calibrate(
    pool, shards: list[Shard], columns: Columns, prompt: str, role: str | None, on_null: str, storage_options
) -> dict:
    """int8 ranges from one deterministic sample of the whole corpus (the head of evenly spread shards)."""

    step = max(1, len(shards) // 16)
    picked = shards[::step][:16]
    per_shard = max(1, CALIBRATION_ROWS // len(picked))
    texts: list[str] = []
    for shard in picked:
        table = corpus.read_shard(shard, [columns.text], storage_options)
        shard_texts, _ = texts_of(table.slice(0, per_shard), shard, columns.text, "skip")
        texts.extend(shard_texts)
    if not texts:
        raise CorpusError("no texts to calibrate int8 ranges on")
    return calibrate_int8(pool.call(0, "encode", texts, prompt, role))


def versions() -> dict:
    import fsspec
    import ray
    import torch
    import transformers

    return {
        "embedpipe": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pa.__version__,
        "ray": ray.__version__,
        "fsspec": fsspec.__version__,
    }
