"""Storage faults: embed, dedup and mine through a FaultProxy between the jobs and the moto S3 server.

Only the job's traffic goes through the proxy (its storage options point `endpoint_url` at it; the test
itself reads and writes the bucket directly). At about 10% injected faults (503 SlowDown / 500
InternalError, TCP resets, delays) each job completes and its output is byte-identical to a clean run.
At 100% faults each job fails through the CLI with exit code 2 and one error line naming the object,
after bounded retries with back-off, and nothing is committed. With botocore's own retries switched off
(`config_kwargs.retries.total_max_attempts=1`), the same 10% of faults reach the project's retry layer
directly: embed, dedup (exact and partitioned), mine and reembed (a first version, then one after rows
changed) still finish with output identical to a clean run. The figures printed with `-s`
(`FIGURES ...`) are the ones quoted in RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.io.dataset import read_dataset
from pipeline.spec import DedupSpec, EmbedSpec, MineSpec, ReembedSpec, build_spec
from pipeline.tasks.dedup import run_dedup
from pipeline.tasks.embed import EmbedError, run_embed
from pipeline.tasks.mine import run_mine
from pipeline.tasks.reembed import run_reembed
from tests.support.faultproxy import FaultProxy
from tests.support.outputcheck import check_output
from tests.support.s3server import option_flags

# About one request in ten gets a fault: 5% error answers, then 3% resets, then 2.5% delays.
TEN_PERCENT = {"error_rate": 0.05, "reset_rate": 0.03, "delay_rate": 0.025, "delay_s": 0.1}
TRANSIENT_TEXT = "SlowDown|reduce your request rate|internal error|Service Unavailable"
NO_BOTOCORE_RETRIES = "config_kwargs.retries.total_max_attempts=1"
# A run's report (JSON, and dedup's HTML rendering of it) holds its timings: compared apart from those.
REPORTS = ("report.json", "report.html", ".embedpipe/report.json")
WORDS = str.split(
    "alpha beta gamma delta storage fault proxy retry commit shard part manifest slow down reset "
    "bucket object moto server embed dedup mine negative anchor positive query document"
)


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(n)]


class Store:
    """A bucket with the corpora, reached directly (never through a proxy) by the test itself."""

    def __init__(self, s3_server: Any) -> None:
        import fsspec

        self.server = s3_server
        self.name = f"rel-{uuid.uuid4().hex[:10]}"
        s3_server.make_bucket(self.name)
        self.fs = fsspec.filesystem("s3", **s3_server.storage_options)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])

    def put_parquet(self, key: str, table: pa.Table, row_group_size: int = 10) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=row_group_size)
        self.fs.pipe_file(f"{self.name}/{key}", sink.getvalue())

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under the prefix (relative name -> bytes), fresh from the server."""
        self.fs.invalidate_cache()
        root = f"{self.name}/{prefix}"
        return {name[len(root) + 1 :]: self.fs.cat_file(name) for name in self.fs.find(root)}


@pytest.fixture(scope="module")
def store(s3_server) -> Store:
    s = Store(s3_server)
    corpus_texts = texts(100, seed=1)
    for i in range(0, 100, 9):  # exact duplicates, so dedup has groups to find
        corpus_texts[(i + 37) % 100] = corpus_texts[i]
    s.put_parquet("corpus/a.parquet", pa.table({"id": list(range(80)), "text": corpus_texts[:80]}))
    jsonl = "".join(json.dumps({"id": 80 + i, "text": t}) + "\n" for i, t in enumerate(corpus_texts[80:]))
    s.fs.pipe_file(f"{s.name}/corpus/b.jsonl", jsonl.encode())
    anchors, positives = texts(30, seed=2), texts(30, seed=3)
    s.put_parquet("pairs/pairs.parquet", pa.table({"query": anchors, "answer": positives}))
    return s


def embed_spec(
    model, store: Store, output: str, options: list[str], source: str = "corpus", **extra
) -> EmbedSpec:
    return build_spec(
        EmbedSpec,
        {
            "model": str(model),
            "input": [store.url(source)],
            "output": store.url(output),
            "rows_per_shard": 20,
            "workers": 2,
            "progress": False,
            "storage_option": options,
            **extra,
        },
    )


def dedup_spec(store: Store, source: str, output: str, options: list[str], mode: str = "exact") -> DedupSpec:
    return build_spec(
        DedupSpec,
        {
            "input": [store.url(source)],
            "output": store.url(output),
            "threshold": 0.99,
            "workers": 1,
            "mode": mode,
            "progress": False,
            "storage_option": options,
        },
    )


def mine_spec(model, store: Store, output: str, options: list[str]) -> MineSpec:
    return build_spec(
        MineSpec,
        {
            "model": str(model),
            "input": [store.url("pairs")],
            "output": store.url(output),
            "num_negatives": 2,
            "anchors_per_block": 10,
            "workers": 1,
            "progress": False,
            "storage_option": options,
        },
    )


def digests(objects: dict[str, bytes], skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        name: hashlib.sha256(data).hexdigest()
        for name, data in objects.items()
        if not name.startswith(skip) and not name.rsplit("/", 1)[-1].startswith("_tmp.")
    }


def without(report: dict, *keys: str) -> dict:
    return {k: v for k, v in report.items() if k not in keys}


def fault_stats(job: str, proxy: FaultProxy, seconds: float, **extra: Any) -> dict:
    stats = dict(proxy.stats)
    faults = sum(stats.get(k, 0) for k in ("slowdown", "internal", "reset", "delay"))
    return {
        "job": job,
        "seconds": round(seconds, 1),
        **stats,
        "faults": faults,
        "fault_rate": round(faults / max(1, stats.get("requests", 0)), 3),
        **extra,
    }


def fault_figures(job: str, proxy: FaultProxy, seconds: float, **extra: Any) -> dict:
    figures = fault_stats(job, proxy, seconds, **extra)
    print("FIGURES", json.dumps(figures))
    return figures


@pytest.fixture(scope="module")
def clean_embed(ray_local, tiny_model_dir, store: Store) -> str:
    """The reference: the same embed straight against the server."""
    summary = run_embed(
        embed_spec(tiny_model_dir, store, "clean/embed", option_flags(store.server.endpoint)),
        log=lambda _m: None,
    )
    assert summary["rows"] == 100
    return "clean/embed"


@pytest.fixture(scope="module")
def clean_dedup(ray_local, store: Store, clean_embed: str):
    """The reference dedup of the clean embed output, per mode (run once, straight against the server):
    mode -> (report, output prefix)."""
    runs: dict[str, tuple[dict, str]] = {}

    def get(mode: str) -> tuple[dict, str]:
        if mode not in runs:
            output = "clean/dedup" if mode == "exact" else f"clean/dedup-{mode}"
            report = run_dedup(
                dedup_spec(store, clean_embed, output, option_flags(store.server.endpoint), mode),
                log=lambda _m: None,
            )
            assert report["removed"] > 0
            runs[mode] = report, output
        return runs[mode]

    return get


@pytest.fixture(scope="module")
def clean_mine(ray_local, tiny_model_dir, store: Store) -> dict:
    """The reference mining run, straight against the server, into clean/mine."""
    report = run_mine(
        mine_spec(tiny_model_dir, store, "clean/mine", option_flags(store.server.endpoint)),
        log=lambda _m: None,
    )
    assert report["rows_out"] > 0
    return report


# --------------------------------------------------------------------------- 10% faults: same output


def test_embed_through_ten_percent_faults(ray_local, tiny_model_dir, store: Store, clean_embed: str) -> None:
    started = time.perf_counter()
    with FaultProxy(store.server.endpoint, seed=11, **TEN_PERCENT) as proxy:
        summary = run_embed(
            embed_spec(tiny_model_dir, store, "faulty/embed", option_flags(proxy.endpoint)),
            log=lambda _m: None,
        )
        figures = fault_figures("embed", proxy, time.perf_counter() - started)
    assert figures["faults"] >= 5 and figures["slowdown"] + figures["internal"] > 0 and figures["reset"] > 0
    assert summary["rows"] == 100
    assert check_output(f"{store.name}/faulty/embed", store.fs) == []
    faulty = store.objects("faulty/embed")
    clean = store.objects(clean_embed)
    part_names = sorted(n for n in clean if n.startswith("part-"))
    assert len(part_names) == 5
    assert {n: faulty[n] for n in part_names} == {n: clean[n] for n in part_names}  # byte for byte
    assert json.loads(faulty[".embedpipe/manifest.json"])["parts"] and ".embedpipe/SUCCESS" in faulty
    table = read_dataset(store.url("faulty/embed"), store.server.storage_options)
    assert sorted(table.column("id").to_pylist()) == list(range(100))  # every row exactly once


def test_dedup_through_ten_percent_faults(ray_local, store: Store, clean_embed: str, clean_dedup) -> None:
    clean, _ = clean_dedup("exact")
    started = time.perf_counter()
    with FaultProxy(store.server.endpoint, seed=12, **TEN_PERCENT) as proxy:
        faulty = run_dedup(
            dedup_spec(store, clean_embed, "faulty/dedup", option_flags(proxy.endpoint)), log=lambda _m: None
        )
        figures = fault_figures("dedup", proxy, time.perf_counter() - started)
    assert figures["faults"] >= 3
    assert without(faulty, "timings", "output") == without(clean, "timings", "output")
    got, want = store.objects("faulty/dedup"), store.objects("clean/dedup")
    assert ".embedpipe/SUCCESS" in got
    assert digests(got, skip=REPORTS) == digests(want, skip=REPORTS)


def test_mine_through_ten_percent_faults(ray_local, tiny_model_dir, store: Store, clean_mine: dict) -> None:
    clean = clean_mine
    started = time.perf_counter()
    with FaultProxy(store.server.endpoint, seed=13, **TEN_PERCENT) as proxy:
        faulty = run_mine(
            mine_spec(tiny_model_dir, store, "faulty/mine", option_flags(proxy.endpoint)), log=lambda _m: None
        )
        figures = fault_figures("mine", proxy, time.perf_counter() - started)
    assert figures["faults"] >= 3
    assert clean["rows_out"] > 0
    assert without(faulty, "timings", "output") == without(clean, "timings", "output")
    got, want = store.objects("faulty/mine"), store.objects("clean/mine")
    assert ".embedpipe/SUCCESS" in got and any(n.startswith("part-") for n in got)
    assert digests(got, skip=REPORTS) == digests(want, skip=REPORTS)


# --------------------------------------------------------------------------- 10% faults, botocore's retries off
# Every fault reaches s3fs and the project's own retry layer (`with_retries`, embed's shard queue): a storage
# call that bypasses them fails the job here. The proxy seed is fixed, so the faults are reproducible (up to
# the order in which concurrent requests arrive).


def without_client_retries(job: str, seed: int, store: Store, run: Any) -> tuple[Any, dict]:
    """``run(storage options)`` through a 10% FaultProxy with botocore's retries off; (its result, figures).
    A run that fails prints its figures with the error, then re-raises."""
    started = time.perf_counter()
    with FaultProxy(store.server.endpoint, seed=seed, **TEN_PERCENT) as proxy:
        try:
            result = run(option_flags(proxy.endpoint, NO_BOTOCORE_RETRIES))
        except Exception as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            fault_figures(
                job, proxy, time.perf_counter() - started, result=f"failed: {type(exc).__name__}: {first}"
            )
            raise
        figures = fault_stats(job, proxy, time.perf_counter() - started)
    assert figures["faults"] >= 3 and figures.get("slowdown", 0) + figures.get("internal", 0) > 0, figures
    return result, figures


def identical(figures: dict) -> None:
    print("FIGURES", json.dumps({**figures, "result": "finished, output identical to the clean run"}))


def test_embed_without_client_retries_through_ten_percent_faults(
    ray_local, tiny_model_dir, store: Store, clean_embed: str
) -> None:
    summary, figures = without_client_retries(
        "embed, botocore retries off",
        21,
        store,
        lambda options: run_embed(
            embed_spec(tiny_model_dir, store, "noretry/embed", options), log=lambda _m: None
        ),
    )
    assert summary["rows"] == 100
    assert check_output(f"{store.name}/noretry/embed", store.fs) == []
    got, want = store.objects("noretry/embed"), store.objects(clean_embed)
    part_names = sorted(n for n in want if n.startswith("part-"))
    assert len(part_names) == 5 and ".embedpipe/SUCCESS" in got
    assert {n: got[n] for n in part_names} == {n: want[n] for n in part_names}  # byte for byte
    identical(figures)


@pytest.mark.parametrize("mode", ["exact", "partitioned"])
def test_dedup_without_client_retries_through_ten_percent_faults(
    ray_local, store: Store, clean_embed: str, clean_dedup, mode: str
) -> None:
    clean, clean_output = clean_dedup(mode)
    output = f"noretry/dedup-{mode}"
    report, figures = without_client_retries(
        f"dedup {mode}, botocore retries off",
        22 if mode == "exact" else 23,
        store,
        lambda options: run_dedup(dedup_spec(store, clean_embed, output, options, mode), log=lambda _m: None),
    )
    assert without(report, "timings", "output") == without(clean, "timings", "output")
    got, want = store.objects(output), store.objects(clean_output)
    assert ".embedpipe/SUCCESS" in got and any(n.startswith("kept/") for n in got)
    assert digests(got, skip=REPORTS) == digests(want, skip=REPORTS)
    identical(figures)


def test_mine_without_client_retries_through_ten_percent_faults(
    ray_local, tiny_model_dir, store: Store, clean_mine: dict
) -> None:
    report, figures = without_client_retries(
        "mine, botocore retries off",
        24,
        store,
        lambda options: run_mine(
            mine_spec(tiny_model_dir, store, "noretry/mine", options), log=lambda _m: None
        ),
    )
    assert without(report, "timings", "output") == without(clean_mine, "timings", "output")
    got, want = store.objects("noretry/mine"), store.objects("clean/mine")
    assert ".embedpipe/SUCCESS" in got and any(n.startswith("part-") for n in got)
    assert digests(got, skip=REPORTS) == digests(want, skip=REPORTS)
    identical(figures)


def reembed_corpora(store: Store) -> tuple[str, str]:
    """Two versions of a 100-row corpus with stable ids: the second changes 3 texts, drops 2 rows, adds 2."""
    rows = [{"id": f"doc-{i:03d}", "text": t} for i, t in enumerate(texts(100, seed=7))]
    store.put_parquet("reembed-in/v1/corpus.parquet", pa.Table.from_pylist(rows))
    edited = [dict(r) for r in rows if r["id"] not in ("doc-010", "doc-077")]
    for row in edited:
        if row["id"] in ("doc-003", "doc-050", "doc-098"):
            row["text"] += " revised"
    edited += [{"id": f"doc-{i:03d}", "text": t} for i, t in zip((100, 101), texts(2, seed=8), strict=True)]
    store.put_parquet("reembed-in/v2/corpus.parquet", pa.Table.from_pylist(edited))
    return "reembed-in/v1", "reembed-in/v2"


def reembed(model, store: Store, source: str, output: str, options: list[str]) -> dict:
    return run_reembed(
        build_spec(
            ReembedSpec,
            {
                "model": str(model),
                "input": [store.url(source)],
                "output": store.url(output),
                "rows_per_shard": 50,
                "workers": 1,
                "progress": False,
                "storage_option": options,
            },
        ),
        log=lambda _m: None,
    )


def same_summary(got: dict, want: dict) -> None:
    """Reembed summaries agree apart from timings and the store's URL (embed: rows and tokens)."""

    def core(summary: dict) -> dict:
        kept = without(summary, "seconds", "store", "embed")
        kept["embed"] = {k: (summary.get("embed") or {}).get(k) for k in ("rows", "tokens")}
        return kept

    assert core(got) == core(want)


def test_reembed_without_client_retries_through_ten_percent_faults(
    ray_local, tiny_model_dir, store: Store
) -> None:
    first, second = reembed_corpora(store)
    clean_options = option_flags(store.server.endpoint)
    clean = [
        reembed(tiny_model_dir, store, source, "clean/reembed", clean_options) for source in (first, second)
    ]
    assert clean[0]["version"] == "v00001" and clean[1]["version"] == "v00002"
    assert clean[1]["changed"] == 3 and clean[1]["deleted"] == 2 and clean[1]["new"] == 2
    for number, (source, want) in enumerate(zip((first, second), clean, strict=True), start=1):
        summary, figures = without_client_retries(
            f"reembed version {number}, botocore retries off",
            24 + number,
            store,
            lambda options, source=source: reembed(tiny_model_dir, store, source, "noretry/reembed", options),
        )
        same_summary(summary, want)
        version = f"v{number:05d}"
        got, expected = store.objects(f"noretry/reembed/{version}"), store.objects(f"clean/reembed/{version}")
        assert ".embedpipe/SUCCESS" in got and any(n.startswith("part-") for n in got)
        # Parts and receipts byte for byte; the manifest holds the run's summary (timings, the store's URL).
        assert digests(got, skip=(".embedpipe/manifest.json",)) == digests(
            expected, skip=(".embedpipe/manifest.json",)
        )
        names = {n.split("/", 1)[0] for n in store.objects("noretry/reembed")}
        assert "_LOCK" not in names and "_staging" not in names
        assert json.loads(store.objects("noretry/reembed")["_LATEST"])["version"] == version
        identical(figures)


# --------------------------------------------------------------------------- 100% faults: clear failure


def cli_args(job: str, model, store: Store, output: str, options: list[str], source: str) -> list[str]:
    flags = [f"--storage-option={o}" for o in options]
    common = ["--output", store.url(output), "--no-progress", "--workers", "1", *flags]
    if job == "embed":
        return [
            "embed",
            "--model",
            str(model),
            "--input",
            store.url("corpus"),
            "--rows-per-shard",
            "20",
            *common,
        ]
    if job == "dedup":
        return ["dedup", "--input", store.url(source), "--threshold", "0.99", *common]
    return ["mine", "--model", str(model), "--input", store.url("pairs"), "--num-negatives", "2", *common]


@pytest.mark.parametrize("job", ["embed", "dedup", "mine"])
def test_every_request_failing_ends_with_one_clear_error_and_nothing_committed(
    ray_local, tiny_model_dir, store: Store, job: str, capsys, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.io.storage")
    output = f"outage/{job}"
    started = time.perf_counter()
    with FaultProxy(store.server.endpoint, error_rate=1.0, seed=14) as proxy:
        options = option_flags(proxy.endpoint, NO_BOTOCORE_RETRIES)
        code = cli.main(cli_args(job, tiny_model_dir, store, output, options, "clean/embed"))
        seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    figures = fault_figures(f"{job} at 100%", proxy, seconds)
    errors = [line for line in err.splitlines() if line.startswith(f"embedpipe {job}: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "Traceback" not in err
    # The object it gave up on, after how many attempts, and why.
    assert re.search(
        rf"s3://{store.name}/\S+: failed after 5 attempts: .*({TRANSIENT_TEXT})", errors[0], re.IGNORECASE
    ), errors[0]
    # Back-off: each of the 4 retries was logged with a growing delay, then it stopped.
    delays = [float(d) for d in re.findall(r"retrying in ([0-9.]+)s", caplog.text)]
    assert len(delays) == 4 and delays[-1] > delays[0], caplog.text
    # Bounded: s3fs repeats a SlowDown call at most 5 times, botocore not at all, we 5 times.
    assert figures["requests"] <= 5 * 5 * 2 and seconds < 60
    assert store.objects(output) == {}  # nothing committed, not even a plan


def test_part_commits_failing_end_the_embed_with_no_part_visible(
    ray_local, tiny_model_dir, store: Store
) -> None:
    """Reads work, every write of a part or receipt fails: each shard is tried max_attempts times (each
    try retrying the commit with back-off), the job fails naming the shard, and no part, receipt or
    .embedpipe/SUCCESS is visible. The plan alone is there, so a later run resumes."""

    def part_writes(method: str, path: str, headers: Any) -> bool:
        return method in ("PUT", "POST") and "part-" in path

    started = time.perf_counter()
    with FaultProxy(store.server.endpoint, error_rate=1.0, fault_filter=part_writes, seed=15) as proxy:
        spec = embed_spec(
            tiny_model_dir,
            store,
            "outage/parts",
            option_flags(proxy.endpoint, NO_BOTOCORE_RETRIES),
            source="corpus/b.jsonl",
            max_attempts=2,
            workers=1,
        )
        with pytest.raises(EmbedError) as info:
            run_embed(spec, log=lambda _m: None)
        figures = fault_figures("embed, part writes at 100%", proxy, time.perf_counter() - started)
    message = str(info.value)
    assert re.search(r"shard \d+ \(s3://\S+ rows \d+-\d+\) failed after 2 attempt\(s\)", message), message
    assert "failed after 5 attempts" in message and "0 of 1 shards are committed" in message
    assert figures["slowdown"] + figures["internal"] >= 2 * 5  # 2 shard attempts x 5 commit attempts
    written = store.objects("outage/parts")
    assert set(written) <= {".embedpipe/plan.json"} | {
        n for n in written if n.rsplit("/", 1)[-1].startswith("_tmp.")
    }
    assert check_output(f"{store.name}/outage/parts", store.fs) == []
