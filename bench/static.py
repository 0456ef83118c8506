"""StaticEmbedding throughput: embedpipe's Encoder against SentenceTransformer.encode on the same directory
(one process, the same texts, alternating rounds), and all-MiniLM-L6-v2 through embedpipe beside them.

    .venv/bin/python bench/static.py [--texts 20000] [--dim 256] [--rounds 3] [--threads 2]

The StaticEmbedding model is built with sentence-transformers' own API (the MiniLM tokenizer, a seeded
random 30,522 x dim table, Normalize) and saved by it; the texts are the shipped real texts (tests/data),
repeated to --texts. Prints one JSON line per measurement and a summary with the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def real_texts(count: int) -> list[str]:
    data = ROOT / "tests" / "data"
    texts = pq.read_table(data / "fortunes.parquet").column("text").to_pylist()
    for name in ("faq_pairs.parquet", "manpages_pairs.parquet"):
        table = pq.read_table(data / name)
        texts += table.column("query").to_pylist() + table.column("positive").to_pylist()
    texts = [t for t in texts if t]
    return [texts[i % len(texts)] for i in range(count)]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--minilm-texts", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    from pipeline.model import load_encoder
    from tests.support.tiny_models import real_model_path, st_static_embedding

    torch.set_num_threads(args.threads)
    texts = real_texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "static"
        SentenceTransformer(modules=[st_static_embedding(args.dim, seed=0), Normalize()], device="cpu").save(
            str(path)
        )
        ours = load_encoder(str(path))
        theirs = SentenceTransformer(str(path), device="cpu")
        np.testing.assert_allclose(ours.encode(texts[:500]), theirs.encode(texts[:500]), atol=1e-6)
        ours_s, theirs_s = [], []
        for _ in range(args.rounds):
            ours_s.append(timed(lambda: ours.encode(texts)))
            theirs_s.append(timed(lambda: theirs.encode(texts, batch_size=32)))
        minilm = load_encoder(str(real_model_path()))
        few = texts[: args.minilm_texts]
        minilm.encode(few[:50])
        minilm_s = min(timed(lambda: minilm.encode(few)) for _ in range(2))
    result = {
        "texts": len(texts),
        "dim": args.dim,
        "threads": args.threads,
        "static_embedpipe_texts_s": round(len(texts) / min(ours_s)),
        "static_sentence_transformers_texts_s": round(len(texts) / min(theirs_s)),
        "ratio_vs_sentence_transformers": round(min(theirs_s) / min(ours_s), 2),
        "minilm_embedpipe_texts_s": round(len(few) / minilm_s),
        "ratio_static_vs_minilm": round((len(texts) / min(ours_s)) / (len(few) / minilm_s), 1),
        "rounds_embedpipe_s": [round(s, 3) for s in ours_s],
        "rounds_sentence_transformers_s": [round(s, 3) for s in theirs_s],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
