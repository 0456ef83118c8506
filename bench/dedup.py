"""Dedup benchmarks; results go to BENCHMARKS.md ("Dedup") with the command that made them.

(a) exact range search, single process, same thread count: ``pipeline.compute.knn.range_pairs`` (blockwise,
    upper triangle only) against faiss ``IndexFlatIP.range_search`` on the same normalized random vectors
    with planted duplicates; both must return the same pairs. Each in its own subprocess (time, CPU, peak RSS).
(b) the whole dedup: ``run_dedup`` (exact mode, Ray index actors, on a prebuilt embed dataset, writing
    kept/, duplicates.parquet, pairs/, report.json) against ``sentence_transformers.util.community_detection``
    (in memory, no output) at the same threshold; each in its own subprocess for time and peak memory.

    .venv/bin/python bench/dedup.py --search-rows 100000 --dedup-rows 200000 --threshold 0.9 --workers 2

Memory: for community_detection, the subprocess's peak RSS (getrusage). For ours, a psutil poller
(every 0.2 s) sums the RSS of the driver and of every IndexShardActor process; the peak of that sum is
reported, and separately the peak of the rest of the local Ray cluster the driver started (raylet,
GCS, idle workers, agents: the driver's other descendants). RSS counts
shared pages (torch, the object store) in each process, so the sum errs high. CPU seconds are given
beside wall time (ours: driver + index actors, incl. their start-up), since on a shared machine the wall
time mostly says how much CPU the run was granted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 384


def planted(n: int, seed: int = 0, dup_fraction: float = 0.02) -> tuple[np.ndarray, int]:
    """n normalized random vectors; dup_fraction of them replaced by copies or perturbations of others
    (cosine 1.0 down to about 0.95), in groups of 2 to 5. Returns (vectors, rows replaced)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    targets = rng.choice(n, size=int(n * dup_fraction), replace=False)
    replaced, start = 0, 0
    while start < len(targets):
        size = int(rng.integers(2, 6))
        group = targets[start : start + size]
        start += size
        if len(group) < 2:
            break
        for row in group[1:]:
            noise = rng.uniform(0.0, 0.012)  # 0: exact copy; 0.012 * sqrt(384) = 0.23 -> cosine about 0.97
            v = x[group[0]] + noise * rng.standard_normal(DIM, dtype=np.float32)
            x[row] = v / np.linalg.norm(v)
            replaced += 1
    return x, replaced


def machine() -> dict:
    import faiss
    import torch

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }


# -- (a) exact range search ----------------------------------------------------------------------


def search_once(method: str, rows: int, threshold: float, threads: int, block_size: int, out: str) -> dict:
    """One range search in this (fresh) process: time, CPU, peak RSS; the pairs (i < j) saved to ``out``."""
    import faiss
    import torch

    from pipeline.compute.knn import range_pairs

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    x, replaced = planted(rows)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method == "ours":
        started, cpu = time.perf_counter(), time.process_time()
        i, j, _ = range_pairs(
            torch.from_numpy(x),
            torch.from_numpy(x),
            "cosine",
            threshold,
            block_size=block_size,
            upper_only=True,
        )
        seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    else:
        index = faiss.IndexFlatIP(DIM)
        index.add(x)
        started, cpu = time.perf_counter(), time.process_time()
        lims, _, labels = index.range_search(x, threshold)
        seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
        queries = np.repeat(np.arange(rows), np.diff(lims).astype(np.int64))
        upper = queries < labels
        i, j = queries[upper], labels[upper].astype(np.int64)
    np.save(out, np.stack([i, j], axis=1).astype(np.int64))
    return {
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu_s, 2),
        "planted_rows": replaced,
        "data_rss_mb": round(base_rss),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def bench_search(
    rows: int, threshold: float, threads: int, block_size: int, repeat: int, timeout: float
) -> dict:
    """Each search in its own subprocess (for its peak RSS), alternating, the fastest of ``repeat`` counts."""
    work = Path(tempfile.mkdtemp(prefix="embedpipe-bench-search-"))
    try:
        runs: dict[str, list[dict]] = {"ours": [], "faiss": []}
        for _ in range(repeat):  # alternating, so a change in machine load hits both alike
            for method in runs:
                runs[method].append(
                    subprocess_json(
                        [
                            "_search",
                            method,
                            str(rows),
                            str(threshold),
                            str(threads),
                            str(block_size),
                            str(work / f"{method}.npy"),
                        ],
                        timeout,
                    )
                )
        pairs = {m: {tuple(p) for p in np.load(work / f"{m}.npy").tolist()} for m in runs}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # faiss keeps scores > radius, ours >= threshold: only a pair scoring exactly the threshold may differ
    differ = pairs["ours"] ^ pairs["faiss"]
    best = {m: min(r, key=lambda run: run["seconds"]) for m, r in runs.items()}
    return {
        "rows": rows,
        "dim": DIM,
        "threshold": threshold,
        "threads": threads,
        "block_size": block_size,
        "planted_rows": best["ours"]["planted_rows"],
        "pairs_ours": len(pairs["ours"]),
        "pairs_faiss": len(pairs["faiss"]),
        "same_pairs": not differ,
        "pairs_differing": len(differ),
        "ours": best["ours"],
        "faiss": best["faiss"],
        "ratio": round(best["ours"]["seconds"] / best["faiss"]["seconds"], 3),
        "cpu_ratio": round(best["ours"]["cpu_s"] / best["faiss"]["cpu_s"], 3),
        "runs_s": {m: [r["seconds"] for r in rs] for m, rs in runs.items()},
        "load_average": [round(v, 1) for v in os.getloadavg()],
    }


# -- (b) whole dedup -----------------------------------------------------------------------------


def build_dataset(root: Path, rows: int, part_rows: int) -> None:
    import pyarrow as pa

    from pipeline.io.dataset import quantize, write_embedding_part
    from pipeline.io.output import OutputFolder

    x, _ = planted(rows, seed=1)
    meta = {
        "model": "synthetic",
        "model_name": "synthetic",
        "fingerprint": "bench",
        "pooling": ["mean"],
        "normalized": True,
        "similarity_fn_name": "cosine",
        "prompt": "",
        "dim": DIM,
        "precision": "float32",
        "text_column": "text",
        "id_column": "id",
        "version": "bench",
    }
    parts = 0
    for parts, start in enumerate(range(0, rows, part_rows)):
        block = x[start : start + part_rows]
        ids = pa.array([f"row-{r}" for r in range(start, start + len(block))])
        write_embedding_part(
            OutputFolder(str(root)),
            parts,
            pa.table({"id": ids, "embedding": quantize(block, "float32")}),
            meta,
        )
    OutputFolder(str(root)).finish({"metadata": meta}, expected={"": list(range(parts + 1))})


class RayMemoryPoller:
    """Peak of (driver + IndexShardActor processes) RSS, and peak of the rest of this driver's local Ray
    cluster (GCS, raylet, idle workers, agents: every other process descending from the driver).

    A scan of the driver's process tree (to find the processes by title) runs every ``scan_every``
    seconds; in between, only the known processes are sampled, every ``interval`` seconds. The poller's
    own CPU time is kept (``own_cpu``) so that it can be taken out of the driver's.
    """

    def __init__(self, interval: float = 0.2, scan_every: float = 2.0) -> None:
        import psutil

        self.psutil, self.interval, self.scan_every = psutil, interval, scan_every
        self.peak_job = self.peak_daemons = 0
        self.actor_cpu: dict[int, float] = {}  # pid -> latest user + system seconds
        self.job: dict[int, object] = {os.getpid(): psutil.Process()}
        self.daemons: dict[int, object] = {}
        self.own_cpu = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def scan(self) -> None:
        for proc in self.psutil.Process().children(recursive=True):
            try:
                title = " ".join(proc.cmdline()) or proc.name()
            except self.psutil.Error:
                continue
            if title.startswith("ray::IndexShardActor"):
                self.daemons.pop(proc.pid, None)  # an idle worker that became an actor
                self.job.setdefault(proc.pid, proc)
            elif proc.pid not in self.job:
                self.daemons.setdefault(proc.pid, proc)

    def total(self, procs: dict, actors: bool) -> int:
        total = 0
        for pid, proc in list(procs.items()):
            try:
                with proc.oneshot():
                    total += proc.memory_info().rss
                    if actors and pid != os.getpid():
                        times = proc.cpu_times()
                        self.actor_cpu[pid] = times.user + times.system
            except self.psutil.Error:
                procs.pop(pid)  # a killed actor keeps its last CPU reading
        return total

    def run(self) -> None:
        last_scan = 0.0
        while not self.stop.is_set():
            if time.monotonic() - last_scan >= self.scan_every:
                self.scan()
                last_scan = time.monotonic()
            self.peak_job = max(self.peak_job, self.total(self.job, True))
            self.peak_daemons = max(self.peak_daemons, self.total(self.daemons, False))
            time.sleep(self.interval)
        self.own_cpu = time.thread_time()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def worker_ours(dataset: str, output: str, threshold: float, workers: int) -> dict:
    import ray

    from pipeline.runtime import cluster
    from pipeline.spec import DedupSpec
    from pipeline.tasks.dedup import run_dedup

    started = time.perf_counter()
    cluster.connect()
    ray_init_s = time.perf_counter() - started
    with RayMemoryPoller() as poller:
        started, cpu = time.perf_counter(), time.process_time()
        report = run_dedup(
            DedupSpec(input=[dataset], output=output, threshold=threshold, workers=workers, progress=False),
            log=lambda m: None,
        )
        seconds, driver_cpu = time.perf_counter() - started, time.process_time() - cpu
    ray.shutdown()
    return {
        "seconds": round(seconds, 2),
        "ray_init_s": round(ray_init_s, 2),
        "cpu_s": round(driver_cpu - poller.own_cpu + sum(poller.actor_cpu.values()), 1),
        "driver_cpu_s": round(driver_cpu - poller.own_cpu, 1),
        "poller_cpu_s": round(poller.own_cpu, 1),
        "pairs_s": report["timings"]["pairs_seconds"],
        "grouping_s": report["timings"]["grouping_seconds"],
        "peak_rss_mb": round(poller.peak_job / 2**20),
        "ray_rest_peak_rss_mb": round(poller.peak_daemons / 2**20),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "removed": report["removed"],
        "groups": report["groups"],
        "pairs": report["pairs_at_threshold"],
        "workers": report["workers"],
    }


def worker_st(dataset: str, threshold: float, threads: int) -> dict:
    import torch
    from sentence_transformers.util import community_detection

    from pipeline.io.dataset import embeddings_of, read_dataset

    torch.set_num_threads(threads)
    started = time.perf_counter()
    embeddings = torch.from_numpy(
        np.ascontiguousarray(embeddings_of(read_dataset(dataset, None, ["embedding"])))
    )
    load_s = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    communities = community_detection(embeddings, threshold=threshold, min_community_size=2)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    return {
        "seconds": round(seconds, 2),
        "load_s": round(load_s, 2),
        "cpu_s": round(cpu_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "removed": sum(len(c) - 1 for c in communities),
        "groups": len(communities),
    }


def subprocess_json(args: list[str], timeout: float) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_dedup(
    rows: int, threshold: float, workers: int, threads: int, part_rows: int, timeout: float
) -> dict:
    work = Path(tempfile.mkdtemp(prefix="embedpipe-bench-dedup-"))
    try:
        started = time.perf_counter()
        build_dataset(work / "embeddings", rows, part_rows)
        build_s = time.perf_counter() - started
        ours = subprocess_json(
            ["_ours", str(work / "embeddings"), str(work / "out"), str(threshold), str(workers)], timeout
        )
        st = subprocess_json(["_st", str(work / "embeddings"), str(threshold), str(threads)], timeout)
        return {
            "rows": rows,
            "dim": DIM,
            "threshold": threshold,
            "part_rows": part_rows,
            "build_s": round(build_s, 2),
            "load_average": [round(v, 1) for v in os.getloadavg()],
            "ours": ours,
            "community_detection": st,
            "time_ratio": round(ours["seconds"] / st["seconds"], 3),
            "memory_ratio": round(ours["peak_rss_mb"] / st["peak_rss_mb"], 3),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_ours":
        print(json.dumps(worker_ours(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_search":
        method, rows, threshold, threads, block_size, out = sys.argv[2:8]
        print(
            json.dumps(search_once(method, int(rows), float(threshold), int(threads), int(block_size), out))
        )
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_st":
        print(json.dumps(worker_st(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search-rows", type=int, default=100_000, help="rows for (a); 0 skips it")
    parser.add_argument("--dedup-rows", type=int, default=200_000, help="rows for (b); 0 skips it")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--workers", type=int, default=2, help="index actors for our dedup in (b)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads for (a) and community_detection"
    )
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of each search in (a); the fastest counts"
    )
    parser.add_argument("--part-rows", type=int, default=10_000, help="rows per part of the (b) dataset")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(json.dumps(results["machine"]), flush=True)
    if args.search_rows:
        results["search"] = bench_search(
            args.search_rows, args.threshold, args.threads, args.block_size, args.repeat, args.timeout
        )
        print(json.dumps({"search": results["search"]}), flush=True)
    if args.dedup_rows:
        results["dedup"] = bench_dedup(
            args.dedup_rows, args.threshold, args.workers, args.threads, args.part_rows, args.timeout
        )
        print(json.dumps({"dedup": results["dedup"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
