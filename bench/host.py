"""Host-path benchmark: the embed job with a near-free model, so that what is measured is host work.

The model is built on the fly: the packaged all-MiniLM-L6-v2 tokenizer, one BERT layer, hidden size 32
(its forward costs about a fifth of tokenizing), mean pooling, Normalize. The texts are real: the test
subsets in ``tests/data`` (FAQ questions, man page names, fortunes for ``--kind short``, about 16 tokens;
FAQ answers and man page descriptions for ``--kind long``, hundreds of tokens), repeated with a seeded
perturbation (one word of another text appended) up to ``--rows``.

In one run it reports:

- ``tokenizer_1thread_texts_s``: the fast tokenizer alone (``TOKENIZERS_PARALLELISM=false``, one
  thread), called as the Encoder calls it, on the same texts: the yardstick of the target
  (job rows/s >= 0.6 x CPUs used x this rate).
- ``in_process``: one thread, stage by stage: ``Encoder.tokenize``, ``Encoder.pad`` over the batch plan,
  ``Encoder.forward`` (texts/s of each).
- ``job``: ``run_embed`` on local Parquet files (Ray start and actor start included in ``seconds``;
  ``encode_rows_s`` counts from the job's plan line, logged once the actors are up, i.e. without them) and the time per
  stage summed over the shards (actor-seconds, from the receipts: read, tokenize, pad, forward, to_host,
  convert, write, commit) when the code records them.

    .venv/bin/python bench/host.py --rows 100000 --workers 2
    .venv/bin/python bench/host.py --kind long --rows 10000 --workers 1

``--fixed-costs``: what one part costs beyond its bytes, on local disk and on a local S3 server (moto, in a
subprocess): ``write_embedding_part`` (part under a temporary name, moved into place, then its receipt)
for a 1-row part, against a part of ``--part-rows`` rows of 384-dim float32 vectors; and what that is as
a share of a shard's time at a given device rate (100k texts/s) for 10,000-row shards and for the default
shard size of corpora of 1M, 10M and 100M rows.

    .venv/bin/python bench/host.py --fixed-costs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The repository root first: run as a script, bench/ is on sys.path and bench/pipeline.py would
# shadow the `pipeline` package.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "tests" / "data"


def base_texts(kind: str) -> list[str]:
    import pyarrow.parquet as pq

    def column(name: str, col: str) -> list[str]:
        return [
            t for t in pq.read_table(DATA / f"{name}.parquet", columns=[col]).column(col).to_pylist() if t
        ]

    if kind == "short":
        return column("faq_pairs", "query") + column("manpages_pairs", "query") + column("fortunes", "text")
    return column("faq_pairs", "positive") + column("manpages_pairs", "positive")


def make_texts(kind: str, rows: int, seed: int = 0) -> list[str]:
    """``rows`` texts: the base texts in a seeded order, each with one word of another text appended."""
    base = base_texts(kind)
    words = sorted({w for t in base for w in t.split()})
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(base), size=rows)
    extra = rng.integers(0, len(words), size=rows)
    return [f"{base[i]} {words[j]}" for i, j in zip(picks, extra, strict=True)]


def build_model(target: Path, max_position_embeddings: int = 512) -> Path:
    """Near-free model in sentence-transformers format: 1 layer, hidden 32, the MiniLM tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from tests.support.tiny_models import write_hf_backbone

    backbone = target.parent / f".{target.name}-backbone"
    write_hf_backbone(
        backbone, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=max_position_embeddings
    )
    torch.manual_seed(1)
    modules = [Transformer(str(backbone), max_seq_length=256), Pooling(32, pooling_mode="mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(target))
    return target


def timed(fn, *args, repeat: int = 1, **kwargs) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - started)
    return best, result


def in_process(model: str, texts: list[str]) -> dict:
    """One thread, one stage at a time, on ``texts``."""
    import torch

    from pipeline.model import load_encoder
    from pipeline.model.encoder import plan_batches

    torch.set_num_threads(1)
    encoder = load_encoder(model, device="cpu")
    tokenizer = encoder.tokenizer
    kwargs, _ = encoder.transformer.call_kwargs(None)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tokenizer(texts[:256], padding=False, **kwargs)
        raw, _ = timed(tokenizer, texts, padding=False, repeat=2, **kwargs)
        backend, _ = timed(tokenizer.backend_tokenizer.encode_batch, texts, repeat=2)
        ours, tokens = timed(encoder.tokenize, texts, repeat=2)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    plan = plan_batches(tokens.lengths, encoder.default_batch_tokens())

    def pad_all():
        return [encoder.pad(tokens, indices) for indices in plan]

    pad, batches = timed(pad_all, repeat=2)

    def forward_all():
        for batch in batches:
            encoder.forward(batch, tokens.prompt_length)

    forward, _ = timed(forward_all)
    n = len(texts)
    return {
        "texts": n,
        "mean_tokens": round(float(tokens.lengths.mean()), 1),
        "tokenizer_1thread_texts_s": round(n / raw),
        "backend_encode_batch_1thread_texts_s": round(n / backend),
        "encoder_tokenize_texts_s": round(n / ours),
        "encoder_pad_texts_s": round(n / pad),
        "encoder_forward_texts_s": round(n / forward),
    }


def run_job(model: str, texts: list[str], workers: int, rows_per_shard: int, extra: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io.output import RECEIPTS_DIR
    from pipeline.spec import EmbedSpec
    from pipeline.tasks.embed import run_embed

    with tempfile.TemporaryDirectory() as tmp:
        files = 4
        per_file = -(-len(texts) // files)
        for index in range(files):
            chunk = texts[index * per_file : (index + 1) * per_file]
            ids = list(range(index * per_file, index * per_file + len(chunk)))
            pq.write_table(pa.table({"id": ids, "text": chunk}), f"{tmp}/part-{index}.parquet")
        spec = EmbedSpec(
            model=model,
            input=[f"{tmp}/part-*.parquet"],
            output=f"{tmp}/out",
            rows_per_shard=rows_per_shard,
            workers=workers,
            progress=False,
            **extra,
        )
        lines: list[tuple[float, str]] = []
        started = time.perf_counter()
        summary = run_embed(spec, log=lambda message: lines.append((time.perf_counter(), message)))
        receipts = [
            json.loads(p.read_text()) for p in sorted(Path(f"{tmp}/out/{RECEIPTS_DIR}").glob("*.json"))
        ]
    import ray

    ray.shutdown()
    committed = [t for t, m in lines if "committed (" in m]
    # The encode phase starts when the job logs its plan: the actors are up and have described the model.
    first_start = next((t for t, m in lines if m.startswith("embed: ") and " shards (" in m), None)
    stages: dict[str, float] = {}
    for receipt in receipts:
        for name, seconds in (receipt.get("stages") or {}).items():
            stages[name] = stages.get(name, 0.0) + seconds
    for name, seconds in (summary.get("stage_seconds") or {}).items():
        stages.setdefault(name, seconds)
    result = {
        "rows": summary["rows"],
        "workers": summary["workers"],
        "seconds": round(time.perf_counter() - started, 2),
        "rows_s": round(summary["rows"] / (time.perf_counter() - started)),
        "tokens": summary["tokens"],
        "process_seconds_sum": round(sum(r.get("seconds", 0) for r in receipts), 2),
    }
    if first_start is not None and committed[-1] > first_start:
        result["encode_rows_s"] = round(summary["rows"] / (committed[-1] - first_start))
    if stages:
        result["stage_actor_seconds"] = {k: round(v, 2) for k, v in stages.items()}
    return result


def commit_seconds(folder, rows: int, repeats: int) -> float:
    """Median seconds of committing one part of ``rows`` rows (and its receipt) to ``folder``."""
    import pyarrow as pa

    from pipeline.io.dataset import write_embedding_part

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, 384), dtype=np.float32)
    table = pa.table(
        {
            "id": pa.array([f"doc-{i}" for i in range(rows)]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 384),
        }
    )
    times = []
    for number in range(repeats):
        started = time.perf_counter()
        write_embedding_part(folder, number, table, {"model_name": "bench"})
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def fixed_costs(part_rows: int, device_rate: float) -> dict:
    """Per-part fixed cost (a 1-row part) and a full part's cost, on local disk and on a local S3 server."""
    from pipeline.io import corpus
    from pipeline.io.output import OutputFolder
    from tests.support.s3server import S3Server

    out: dict = {"device_rate_texts_s": device_rate, "part_rows": part_rows}
    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3:
        os.environ.update(s3.env)  # the region, as the tests set it
        targets = {
            "local": OutputFolder(str(Path(tmp) / "out")),
            "s3": OutputFolder(f"{s3.make_bucket('bench')}/out", s3.storage_options),
        }
        for name, folder in targets.items():
            fixed = commit_seconds(folder.child("tiny"), 1, 20)
            full = commit_seconds(folder.child("full"), part_rows, 5)
            shares = {}
            for corpus_rows in (1_000_000, 10_000_000, 100_000_000):
                shard = corpus.auto_shard_rows(corpus_rows)
                shares[f"default shard for {corpus_rows:,} rows ({shard:,})"] = round(
                    fixed / (shard / device_rate) * 100, 2
                )
            shares["10,000-row shard"] = round(fixed / (10_000 / device_rate) * 100, 2)
            out[name] = {
                "fixed_ms": round(fixed * 1000, 1),
                f"part_{part_rows}_rows_ms": round(full * 1000, 1),
                "fixed_share_of_shard_time_pct": shares,
            }
            print(json.dumps({name: out[name]}), file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=("short", "long"), default="short")
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--sample", type=int, default=20000, help="texts for the in-process stage rates")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows-per-shard", type=int, default=10000)
    parser.add_argument("--cpus-per-worker", type=int, default=None)
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--fixed-costs", action="store_true", help="measure per-part fixed costs only")
    parser.add_argument("--part-rows", type=int, default=10000)
    parser.add_argument("--device-rate", type=float, default=100_000.0, help="texts/s a GPU encodes")
    args = parser.parse_args()
    if args.fixed_costs:
        print(json.dumps(fixed_costs(args.part_rows, args.device_rate), indent=2))
        return

    texts = make_texts(args.kind, args.rows)
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    result: dict = {"kind": args.kind, "nproc": nproc, "cpu": cpu, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_model(Path(tmp) / "near-free"))
        result["in_process"] = in_process(model, texts[: args.sample])
        print(json.dumps(result["in_process"]), file=sys.stderr)
        if not args.skip_job:
            extra = {}
            if args.cpus_per_worker is not None:
                extra["cpus_per_worker"] = args.cpus_per_worker
            job = run_job(model, texts, args.workers, args.rows_per_shard, extra)
            result["job"] = job
            cpus_used = min(nproc, args.workers * (args.cpus_per_worker or 1))
            rate = result["in_process"]["tokenizer_1thread_texts_s"]
            result["cpus_used"] = cpus_used
            result["job_vs_cpus_x_tokenizer"] = round(job["rows_s"] / (cpus_used * rate), 3)
            if "encode_rows_s" in job:
                result["encode_vs_cpus_x_tokenizer"] = round(job["encode_rows_s"] / (cpus_used * rate), 3)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
