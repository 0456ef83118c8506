"""Dedup at corpus scale (issue 13, "Scale figures"); results go to BENCHMARKS.md ("Dedup at corpus scale").

A synthetic embed output shaped like a real corpus with boilerplate: unit vectors (dim 384, as
all-MiniLM-L6-v2), float32, parts of 20,000 rows, rows shuffled over the parts:

- 40% of the rows are byte-identical copies of a few hundred "templates": one template holds n/8 rows
  (100,000 copies at 800,000 rows, 25,000 at 200,000), the rest a long tail of sets of 2 to 5,000 copies
  (log-uniform quantiles, so the tail has the same shape at every size; about 340 sets at 800k);
- 10% are near-duplicate chains of 2 to 20 rows, each row a perturbed copy of the one before (link
  cosine about 0.955 to 0.995, so a chain's ends drift below the threshold and only single linkage joins
  them);
- 50% are random unit vectors.

For each size, ``run_dedup`` exact and partitioned (threshold 0.95, pairs floor 0.9, keep first, 2 workers),
each in its own subprocess: wall time, driver peak RSS (getrusage of that process, and its RSS before the
job), the index actors' peak RSS (psutil, every 0.1 s: the largest single actor and the peak of their
sum), CPU seconds, rows collapsed / searched, pairs stored and bytes of pairs/ on disk, groups, largest
group, and partitioned recall against exact.

Then the fixed allowance: the driver's peak for one 50,000-row identical cluster plus 50,000 random rows,
against 100,000 random rows (same row count, no cluster). Then the peer: faiss ``IndexFlatIP.range_search``
at the pairs floor, storing every pair (as the ``pairs_table`` schema), on the same composition scaled to
``--peer-rows``, against ``run_dedup`` exact on the same dataset; at the main sizes the peer's result size
is computed from the identical sets (what range_search must hold in memory) instead of run.

``--jitter-rows N`` (off by default) adds a probe: the same composition at N rows, exact mode, once with
byte-identical copies and once with every copy jittered by ~1e-7 a coordinate (scores still ~1.0, bytes
differ, so nothing collapses: what an embed output holds when identical texts were embedded in batches
padded differently). It shows what the search costs when the collapse does not apply.

    .venv/bin/python bench/dedup_scale.py --sizes 200000 800000 --workers 2 --json /tmp/dedup_scale.json
    .venv/bin/python bench/dedup_scale.py --sizes --allowance-rows 0 --peer-rows 0 --jitter-rows 50000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dedup import RayMemoryPoller, machine  # noqa: E402

TEMPLATE_FRACTION = 0.40
LARGEST_FRACTION = 1 / 8  # of all rows: 100,000 of 800,000
TAIL_MIN, TAIL_MAX = 2, 5000
CHAIN_FRACTION = 0.10
CHAIN_MIN, CHAIN_MAX = 2, 20
LINK_COSINE = (0.955, 0.995)
FAISS_RESULT_BYTES = 12  # int64 label + float32 score per (query, hit), both directions and self


# -- the dataset ---------------------------------------------------------------------------------


def tail_sizes(budget: int) -> list[int]:
    """Sets of TAIL_MIN..TAIL_MAX copies summing to ``budget``: evenly spaced quantiles of a log-uniform
    distribution (deterministic, the same shape at every size)."""
    if budget < TAIL_MIN:
        return []
    mean = (TAIL_MAX - TAIL_MIN) / np.log(TAIL_MAX / TAIL_MIN)
    count = max(1, round(budget / mean))
    q = (np.arange(count) + 0.5) / count
    sizes = np.maximum(TAIL_MIN, np.round(TAIL_MIN * (TAIL_MAX / TAIL_MIN) ** q)).astype(np.int64)
    sizes = np.maximum(TAIL_MIN, np.round(sizes * budget / sizes.sum())).astype(np.int64)
    sizes[-1] += budget - sizes.sum()  # the largest absorbs rounding
    return sorted(int(s) for s in sizes if s >= TAIL_MIN)


def composition(rows: int, kind: str) -> dict:
    """What the dataset holds: identical set sizes, chain lengths, random rows."""
    if kind in ("corpus", "corpus-jitter"):
        largest = round(rows * LARGEST_FRACTION)
        sets = [largest, *tail_sizes(round(rows * TEMPLATE_FRACTION) - largest)]
        rng = np.random.default_rng(7)
        chains, budget = [], round(rows * CHAIN_FRACTION)
        while budget >= CHAIN_MIN:
            length = min(budget, int(rng.integers(CHAIN_MIN, CHAIN_MAX + 1)))
            if length >= CHAIN_MIN:
                chains.append(length)
            budget -= length
    elif kind == "cluster":  # the fixed allowance: one identical cluster of half the rows
        sets, chains = [rows // 2], []
    elif kind == "random":
        sets, chains = [], []
    else:
        raise ValueError(kind)
    copies, chain_rows = sum(sets), sum(chains)
    if copies + chain_rows > rows:
        raise ValueError(f"{rows} rows cannot hold {copies} copies and {chain_rows} chain rows")
    pairs_identical = sum(m * (m - 1) // 2 for m in sets)
    return {
        "kind": kind,
        "rows": rows,
        "identical_sets": len(sets),
        "largest_set": max(sets, default=0),
        "copy_rows": copies,
        "chains": len(chains),
        "chain_rows": chain_rows,
        "random_rows": rows - copies - chain_rows,
        "expected_searched": rows if kind == "corpus-jitter" else rows - copies + len(sets),
        "identical_pairs": pairs_identical,  # all pairs i < j inside identical sets (all score ~1.0)
        # what a range search returning every hit of every query (both directions, and itself) must hold
        "range_search_results_at_least": rows + 2 * pairs_identical,
        "range_search_bytes_at_least": FAISS_RESULT_BYTES * (rows + 2 * pairs_identical),
        "_sets": sets,
        "_chains": chains,
    }


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chain_vectors(chains: list[int], dim: int, rng: np.random.Generator) -> np.ndarray:
    """Every chain's rows: a random start, then each row the previous one plus noise, renormalized."""
    out = np.empty((sum(chains), dim), dtype=np.float32)
    row = 0
    for length in chains:
        v = unit(rng, 1, dim)[0]
        out[row] = v
        for k in range(1, length):
            cosine = rng.uniform(*LINK_COSINE)
            sigma = np.sqrt((1 / cosine**2 - 1) / dim)  # |noise|^2 ~ dim * sigma^2
            v = v + sigma * rng.standard_normal(dim, dtype=np.float32)
            v /= np.linalg.norm(v)
            out[row + k] = v
        row += length
    return out


def build(root: str, rows: int, kind: str, part_rows: int, dim: int, seed: int) -> dict:
    """Write the dataset as an embed output (parts of ``part_rows``, then the manifest and _SUCCESS),
    generating it part by part: only the templates and chains are held whole."""
    import pyarrow as pa

    from pipeline.io.dataset import quantize, write_embedding_part
    from pipeline.io.output import OutputFolder

    started = time.perf_counter()
    info = composition(rows, kind)
    sets, chains = info.pop("_sets"), info.pop("_chains")
    rng = np.random.default_rng([seed, 1])  # not default_rng(seed): SeedSequence(0) == SeedSequence([0, 0])
    templates = unit(rng, len(sets), dim)
    chained = chain_vectors(chains, dim, rng)
    # what each row is: template t (0..T-1), chain row T + c, or -1 (random); shuffled over the corpus
    source = np.full(rows, -1, dtype=np.int64)
    source[: info["copy_rows"]] = np.repeat(np.arange(len(sets)), sets)
    source[info["copy_rows"] : info["copy_rows"] + len(chained)] = len(sets) + np.arange(len(chained))
    source = source[rng.permutation(rows)]
    meta = {
        "model": "synthetic",
        "model_name": "synthetic",
        "fingerprint": f"bench-scale-{kind}",
        "pooling": ["mean"],
        "normalized": True,
        "similarity_fn_name": "cosine",
        "prompt": "",
        "dim": dim,
        "precision": "float32",
        "text_column": "text",
        "id_column": "id",
        "version": "bench",
    }
    folder = OutputFolder(root)
    jitter_rng = np.random.default_rng([seed, 3])
    parts = 0
    for parts, start in enumerate(range(0, rows, part_rows)):
        what = source[start : start + part_rows]
        block = unit(np.random.default_rng([seed, 2, parts]), len(what), dim)
        is_template = (what >= 0) & (what < len(sets))
        block[is_template] = templates[what[is_template]]
        if kind == "corpus-jitter":  # every copy jittered by ~1e-7 a coordinate: scores ~1.0, bytes differ
            rows_t = np.flatnonzero(is_template)
            block[rows_t] += np.float32(1e-7) * jitter_rng.standard_normal(
                (len(rows_t), dim), dtype=np.float32
            )
        is_chain = what >= len(sets)
        block[is_chain] = chained[what[is_chain] - len(sets)]
        ids = pa.array([f"row-{r}" for r in range(start, start + len(what))])
        write_embedding_part(
            folder, parts, pa.table({"id": ids, "embedding": quantize(block, "float32")}), meta
        )
    folder.finish({"metadata": meta}, expected={"": list(range(parts + 1))})
    info.update(
        dim=dim,
        part_rows=part_rows,
        parts=parts + 1,
        build_s=round(time.perf_counter() - started, 1),
        dataset_bytes=folder_bytes(Path(root)),
    )
    return info


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# -- one dedup run, in its own process -----------------------------------------------------------


class ScalePoller(RayMemoryPoller):
    """RayMemoryPoller that also keeps the driver's and the actors' peaks apart: the peak of the driver's
    RSS, of the actors' summed RSS, and of the largest single actor."""

    def __init__(self) -> None:
        super().__init__(interval=0.1, scan_every=1.0)
        self.peak_driver = self.peak_actors = self.peak_actor = 0
        self.actors_seen: set[int] = set()

    def total(self, procs: dict, actors: bool) -> int:
        if not actors:
            return super().total(procs, actors)
        driver = summed = single = 0
        for pid, proc in list(procs.items()):
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    if pid != os.getpid():
                        times = proc.cpu_times()
                        self.actor_cpu[pid] = times.user + times.system
            except self.psutil.Error:
                procs.pop(pid)
                continue
            if pid == os.getpid():
                driver = rss
            else:
                self.actors_seen.add(pid)
                summed += rss
                single = max(single, rss)
        self.peak_driver = max(self.peak_driver, driver)
        self.peak_actors = max(self.peak_actors, summed)
        self.peak_actor = max(self.peak_actor, single)
        return driver + summed


def mb(value: float) -> int:
    return round(value / 2**20)


def worker_run(dataset: str, output: str, mode: str, threshold: float, floor: float, workers: int) -> dict:
    import psutil
    import ray

    from pipeline.runtime import cluster
    from pipeline.spec import DedupSpec
    from pipeline.tasks.dedup import run_dedup

    started = time.perf_counter()
    cluster.connect()
    ray_init_s = time.perf_counter() - started
    before = psutil.Process().memory_info().rss
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    spec = DedupSpec(
        input=[dataset],
        output=output,
        threshold=threshold,
        pairs_floor=floor,
        keep="first",
        mode=mode,
        workers=workers,
        progress=False,
    )
    with ScalePoller() as poller:
        started, cpu = time.perf_counter(), time.process_time()
        report = run_dedup(spec, log=lambda m: print(m, file=sys.stderr))
        seconds, driver_cpu = time.perf_counter() - started, time.process_time() - cpu
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    ray.shutdown()
    out = Path(output)
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "mode": mode,
        "seconds": round(seconds, 1),
        "ray_init_s": round(ray_init_s, 1),
        "pairs_s": report["timings"].get("pairs_seconds"),
        "grouping_s": report["timings"].get("grouping_seconds"),
        "job_total_s": report["timings"].get("total_seconds"),
        "cpu_s": round(driver_cpu - poller.own_cpu + sum(poller.actor_cpu.values()), 1),
        "driver_cpu_s": round(driver_cpu - poller.own_cpu, 1),
        "driver_rss_before_mb": mb(before),
        "driver_peak_rss_mb": mb(driver_peak),
        "driver_peak_above_before_mb": mb(driver_peak - max(before, before_max)),
        "driver_peak_rss_polled_mb": mb(poller.peak_driver),
        "actors": len(poller.actors_seen),
        "actor_peak_rss_mb": mb(poller.peak_actor),
        "actors_peak_rss_sum_mb": mb(poller.peak_actors),
        "ray_rest_peak_rss_mb": mb(poller.peak_daemons),
        "rows_in": report["rows_in"],
        "rows_collapsed": report["collapsed"]["rows_collapsed"],
        "identical_sets": report["collapsed"]["identical_sets"],
        "rows_searched": report["collapsed"]["rows_searched"],
        "pairs_stored": report["pairs_stored"],
        "pairs_at_threshold": report["pairs_at_threshold"],
        "pairs_bytes": folder_bytes(out / "pairs"),
        "collapse_bytes": folder_bytes(out / "collapse"),
        "output_bytes": folder_bytes(out),
        "removed": report["removed"],
        "groups": report["groups"],
        "largest_group": report["largest_group"],
        "group_size_histogram": report["group_size_histogram"],
        "object_store_spilled_mib": spilled_mib(session),
    }
    if mode == "partitioned":
        result["partitioned"] = report["partitioned"]
    return result


def spilled_mib(session: Path) -> int:
    """MiB the local Ray's object store spilled to disk (the raylet logs "Spilled N MiB" cumulatively)."""
    spilled = 0
    try:
        for line in (session / "logs" / "raylet.out").read_text(errors="replace").splitlines():
            if "Spilled " in line and " MiB" in line:
                spilled = max(spilled, int(line.split("Spilled ", 1)[1].split(" MiB", 1)[0]))
    except (OSError, ValueError):
        pass
    return spilled


def worker_faiss(dataset: str, floor: float, threads: int, out: str) -> dict:
    """The peer: every pair at or above the floor from faiss range_search (kept i < j, in the same
    ``pairs_table`` schema as our pairs/ and written as parquet, for the bytes on disk)."""
    import faiss
    import pyarrow.parquet as pq

    from pipeline.io.dataset import embeddings_of, read_dataset
    from pipeline.tasks.dedup.pairs import pairs_table

    faiss.omp_set_num_threads(threads)
    table = read_dataset(dataset, None, ["id", "embedding"])
    x = np.ascontiguousarray(embeddings_of(table), dtype=np.float32)
    ids = table.column("id").combine_chunks()
    del table
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started, cpu = time.perf_counter(), time.process_time()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, scores, labels = index.range_search(x, np.nextafter(np.float32(floor), np.float32(-1)))  # >= floor
    search_s, search_cpu = time.perf_counter() - started, time.process_time() - cpu
    search_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = int(lims[-1])
    queries = np.repeat(np.arange(len(x), dtype=np.int64), np.diff(lims).astype(np.int64))
    upper = queries < labels
    i, j, s = queries[upper], labels[upper].astype(np.int64), scores[upper]
    del queries, labels, scores, upper
    pq.write_table(pairs_table(i, j, s, ids), out)
    seconds = time.perf_counter() - started
    return {
        "search_s": round(search_s, 1),
        "search_cpu_s": round(search_cpu, 1),
        "seconds_with_write": round(seconds, 1),
        "results": results,
        "pairs": int(len(i)),
        "pairs_bytes": os.path.getsize(out),
        "rss_after_load_mb": mb(loaded_rss),
        "search_peak_rss_mb": mb(search_peak),
        "peak_rss_mb": mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }


# -- orchestration -------------------------------------------------------------------------------


RAY_START_FAILED = "timed out during startup"  # a local Ray that did not start in time on a loaded machine


def subprocess_json(args: list[str], timeout: float, tail: list | None = None, attempts: int = 3) -> dict:
    for attempt in range(1, attempts + 1):
        done = subprocess.run(
            [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        if done.returncode and RAY_START_FAILED in done.stderr and attempt < attempts:
            print(f"Ray did not start (attempt {attempt}); again", file=sys.stderr, flush=True)
            if len(args) > 2 and args[0] == "_run":
                shutil.rmtree(args[2], ignore_errors=True)
            continue
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")
        break
    if tail is not None:  # Ray's warnings (object spilling, memory monitor) are worth keeping
        tail.extend(
            line
            for line in done.stderr.splitlines()
            if any(w in line.lower() for w in ("spill", "memory", "oom"))
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def public(info: dict) -> dict:
    return {k: v for k, v in info.items() if not k.startswith("_")}


def run_size(work: Path, rows: int, kind: str, modes: list[str], args, label: str) -> dict:
    dataset = work / f"{label}-embeddings"
    info = subprocess_json(
        ["_build", str(dataset), str(rows), kind, str(args.part_rows), str(args.dim), str(args.seed)],
        args.timeout,
    )
    print(json.dumps({label: {"dataset": info}}), flush=True)
    out = {"dataset": info, "runs": {}}
    for mode in modes:
        warnings: list[str] = []
        output = work / f"{label}-{mode}"
        run = subprocess_json(
            [
                "_run",
                str(dataset),
                str(output),
                mode,
                str(args.threshold),
                str(args.floor),
                str(args.workers),
            ],
            args.timeout,
            warnings,
        )
        run["load_average_after"] = [round(v, 1) for v in os.getloadavg()]
        run["ray_warnings"] = warnings[-10:]
        out["runs"][mode] = run
        print(json.dumps({label: {mode: run}}), flush=True)
        shutil.rmtree(output, ignore_errors=True)
    out["dataset_path"] = str(dataset)
    return out


def ratios(small: dict, large: dict) -> dict:
    keys = [
        "seconds",
        "pairs_s",
        "cpu_s",
        "driver_peak_rss_mb",
        "driver_peak_above_before_mb",
        "actor_peak_rss_mb",
        "actors_peak_rss_sum_mb",
        "rows_searched",
        "pairs_stored",
        "pairs_bytes",
        "collapse_bytes",
        "groups",
        "largest_group",
    ]
    return {k: round(large[k] / small[k], 2) if small.get(k) else None for k in keys}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        root, rows, kind, part_rows, dim, seed = sys.argv[2:8]
        print(json.dumps(build(root, int(rows), kind, int(part_rows), int(dim), int(seed))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        dataset, output, mode, threshold, floor, workers = sys.argv[2:8]
        print(json.dumps(worker_run(dataset, output, mode, float(threshold), float(floor), int(workers))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_faiss":
        dataset, floor, threads, out = sys.argv[2:6]
        print(json.dumps(worker_faiss(dataset, float(floor), int(threads), out)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[200_000, 800_000])
    parser.add_argument("--modes", nargs="*", default=["exact", "partitioned"])
    parser.add_argument(
        "--allowance-rows",
        type=int,
        default=100_000,
        help="rows of the fixed-allowance dataset (half one identical cluster); 0 skips it",
    )
    parser.add_argument(
        "--peer-rows",
        type=int,
        default=50_000,
        help="rows of the corpus-shaped dataset faiss range_search runs on; 0 skips it",
    )
    parser.add_argument(
        "--peer-max-gb",
        type=float,
        default=4.0,
        help="skip the peer when range_search must hold more than this",
    )
    parser.add_argument(
        "--jitter-rows",
        type=int,
        nargs="*",
        default=[],
        help="a probe (exact mode): the corpus shape with every copy jittered by ~1e-7 a "
        "coordinate, so nothing collapses (as an embed output may hold identical texts "
        "embedded in different batches); against the same rows byte-identical",
    )
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--floor", type=float, default=0.9)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="faiss threads")
    parser.add_argument("--part-rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", help="also write the results here (rewritten after every step)")
    args = parser.parse_args()
    results: dict = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_start": [round(v, 1) for v in os.getloadavg()],
    }
    results["machine"]["mem_total_gb"] = round(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
    )
    print(json.dumps(results["machine"]), flush=True)

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    work = Path(tempfile.mkdtemp(prefix="embedpipe-bench-scale-"))
    started = time.perf_counter()
    try:
        results["sizes"] = {}
        for rows in args.sizes:
            label = str(rows)
            done = run_size(work, rows, "corpus", args.modes, args, label)
            shutil.rmtree(done.pop("dataset_path"), ignore_errors=True)
            results["sizes"][label] = done
            save()
        if len(args.sizes) >= 2:
            small, large = (results["sizes"][str(r)] for r in (min(args.sizes), max(args.sizes)))
            results["ratios"] = {
                "rows": round(max(args.sizes) / min(args.sizes), 2),
                **{
                    m: ratios(small["runs"][m], large["runs"][m])
                    for m in args.modes
                    if m in small["runs"] and m in large["runs"]
                },
            }
            print(json.dumps({"ratios": results["ratios"]}), flush=True)
        if args.allowance_rows:
            results["allowance"] = {}
            for kind in ("cluster", "random"):
                done = run_size(work, args.allowance_rows, kind, ["exact"], args, f"allowance-{kind}")
                shutil.rmtree(done.pop("dataset_path"), ignore_errors=True)
                results["allowance"][kind] = done
                save()
        if args.peer_rows:
            info = composition(args.peer_rows, "corpus")
            if info["range_search_bytes_at_least"] > args.peer_max_gb * 2**30:
                results["peer"] = {
                    "skipped": f"range_search needs at least {info['range_search_bytes_at_least']} "
                    f"bytes of results at {args.peer_rows} rows"
                }
            else:
                done = run_size(work, args.peer_rows, "corpus", ["exact"], args, f"peer-{args.peer_rows}")
                dataset = done.pop("dataset_path")
                done["faiss"] = subprocess_json(
                    [
                        "_faiss",
                        dataset,
                        str(args.floor),
                        str(args.threads),
                        str(work / "faiss-pairs.parquet"),
                    ],
                    args.timeout,
                )
                done["faiss"]["load_average_after"] = [round(v, 1) for v in os.getloadavg()]
                shutil.rmtree(dataset, ignore_errors=True)
                ours, peer = done["runs"]["exact"], done["faiss"]
                done["ratio_peer_over_ours"] = {
                    "pairs": round(peer["pairs"] / max(1, ours["pairs_stored"]), 1),
                    "pairs_bytes": round(peer["pairs_bytes"] / max(1, ours["pairs_bytes"]), 1),
                    "peak_rss_vs_driver": round(peer["peak_rss_mb"] / ours["driver_peak_rss_mb"], 2),
                    "peak_rss_vs_driver_plus_actors": round(
                        peer["peak_rss_mb"] / (ours["driver_peak_rss_mb"] + ours["actors_peak_rss_sum_mb"]), 2
                    ),
                    "seconds": round(peer["seconds_with_write"] / ours["seconds"], 2),
                }
                results["peer"] = done
                print(
                    json.dumps({"peer": {"faiss": peer, "ratio": done["ratio_peer_over_ours"]}}), flush=True
                )
            save()
        if args.jitter_rows:
            results["jitter_probe"] = {}
            for rows in args.jitter_rows:
                for kind in ("corpus", "corpus-jitter"):
                    done = run_size(work, rows, kind, ["exact"], args, f"probe-{kind}-{rows}")
                    shutil.rmtree(done.pop("dataset_path"), ignore_errors=True)
                    results["jitter_probe"][f"{kind}-{rows}"] = done
                    save()
        results["peer_at_sizes"] = {
            str(r): {
                k: composition(r, "corpus")[k]
                for k in ("identical_pairs", "range_search_results_at_least", "range_search_bytes_at_least")
            }
            for r in args.sizes
        }
        results["total_s"] = round(time.perf_counter() - started, 1)
        results["load_average_end"] = [round(v, 1) for v in os.getloadavg()]
        save()
        print(
            json.dumps({"peer_at_sizes": results["peer_at_sizes"], "total_s": results["total_s"]}), flush=True
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
