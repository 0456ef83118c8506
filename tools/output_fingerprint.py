"""Fingerprint the four jobs' outputs on fixed inputs, to show that a refactor leaves them unchanged.

Runs embed, dedup (exact, partitioned, keep=first/longest/centroid, --from-pairs), mine (triplet with
scores, n-tuple) and reembed (two versions) with a tiny seeded model on generated texts with exact and
near duplicates, then prints one JSON object: for every data file (parts, kept/, pairs/,
duplicates.parquet, mining parts) its sha256, and every report.json with its timings removed.
Receipts, plans and manifests are bookkeeping and are left out.

    python tools/output_fingerprint.py WORKDIR > before.json   # on the old revision
    python tools/output_fingerprint.py WORKDIR > after.json    # on the new one, same WORKDIR
    diff before.json after.json

Both runs must use the same machine (vectors can differ in the last bit between CPU kinds) and the same
WORKDIR (the model's path is recorded in the parts' metadata). WORKDIR is emptied first.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = str.split(
    "alpha beta gamma delta storage fault proxy retry commit shard part manifest slow down reset "
    "bucket object moto server embed dedup mine negative anchor positive query document"
)
DATA_SUFFIXES = (".parquet",)
VOLATILE = ("timings", "seconds", "rows_per_second", "total_seconds", "output", "source", "from_pairs")


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(n)]
    for i in range(0, n, 7):  # exact duplicates
        out[i] = out[(i * 3) % n]
    for i in range(3, n, 11):  # near duplicates: one word appended
        out[i] = out[i - 1] + " alpha"
    return out


def strip(report: object) -> object:
    if isinstance(report, dict):
        return {k: strip(v) for k, v in report.items() if k not in VOLATILE}
    if isinstance(report, list):
        return [strip(v) for v in report]
    return report


def fingerprint(folder: Path) -> dict:
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(p.startswith(("_", ".")) for p in rel.split("/")):
            continue
        if rel.endswith(DATA_SUFFIXES):
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif rel.endswith("report.json"):
            found[rel] = strip(json.loads(path.read_text()))
    return found


def main(workdir: str) -> None:
    from pipeline.spec import DedupSpec, EmbedSpec, MineSpec, ReembedSpec
    from pipeline.tasks.dedup import run_dedup
    from pipeline.tasks.embed import run_embed
    from pipeline.tasks.mine import run_mine
    from pipeline.tasks.reembed import run_reembed
    from tests.support.tiny_models import build_tiny_model

    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = str(build_tiny_model(work / "model"))
    corpus = texts(300, seed=1)
    pq.write_table(
        pa.table({"id": [f"d{i:04d}" for i in range(300)], "text": corpus}), work / "corpus.parquet"
    )
    anchors = texts(60, seed=2)
    pq.write_table(pa.table({"query": anchors, "answer": corpus[:60]}), work / "pairs.parquet")
    quiet = {"progress": False, "workers": 1}
    log = lambda message: None  # noqa: E731
    out = work / "out"
    common = {
        "model": model,
        "input": [str(work / "corpus.parquet")],
        "rows_per_shard": 40,
        "keep_columns": ["text"],
        **quiet,
    }
    run_embed(EmbedSpec(output=str(out / "embed"), **common), log=log)
    run_embed(EmbedSpec(output=str(out / "embed-int8"), precision="int8", **common), log=log)
    for mode in ("exact", "partitioned"):
        for keep in ("first", "longest", "centroid"):
            run_dedup(
                DedupSpec(
                    input=[str(out / "embed")],
                    output=str(out / f"dedup-{mode}-{keep}"),
                    threshold=0.9,
                    pairs_floor=0.8,
                    mode=mode,
                    keep=keep,
                    **quiet,
                ),
                log=log,
            )
    run_dedup(
        DedupSpec(
            input=[str(out / "embed")],
            output=str(out / "dedup-regroup"),
            threshold=0.95,
            from_pairs=str(out / "dedup-exact-first"),
            **quiet,
        ),
        log=log,
    )
    run_dedup(
        DedupSpec(
            input=[str(work / "corpus.parquet")],
            model=model,
            output=str(out / "dedup-raw"),
            threshold=0.9,
            rows_per_shard=100,
            **quiet,
        ),
        log=log,
    )
    pairs = [str(work / "pairs.parquet")]
    run_mine(
        MineSpec(
            model=model,
            input=pairs,
            corpus=[str(work / "corpus.parquet")],
            output=str(out / "mine-triplet"),
            output_scores=True,
            anchors_per_block=25,
            anchor_column="query",
            positive_column="answer",
            **quiet,
        ),
        log=log,
    )
    run_mine(
        MineSpec(
            model=model,
            input=pairs,
            output=str(out / "mine-ntuple"),
            output_format="n-tuple",
            num_negatives=2,
            anchor_column="query",
            positive_column="answer",
            **quiet,
        ),
        log=log,
    )
    store = out / "reembed"
    run_reembed(
        ReembedSpec(
            model=model,
            input=[str(work / "corpus.parquet")],
            output=str(store),
            id_column="id",
            rows_per_shard=100,
            **quiet,
        ),
        log=log,
    )
    changed = corpus[:250] + [t + " changed" for t in corpus[250:]]
    pq.write_table(
        pa.table({"id": [f"d{i:04d}" for i in range(300)], "text": changed}), work / "corpus.parquet"
    )
    run_reembed(
        ReembedSpec(
            model=model,
            input=[str(work / "corpus.parquet")],
            output=str(store),
            id_column="id",
            rows_per_shard=100,
            **quiet,
        ),
        log=log,
    )
    print(json.dumps(fingerprint(out), indent=1, sort_keys=True))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
