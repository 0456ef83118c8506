"""Chaos on a real multi-node local Ray cluster (head + 2 worker nodes, one CPU each).

Worker faults: while an embed job runs (to S3, through a FaultProxy that holds each receipt a moment so the
job lasts long enough on any machine), a random live EncoderActor is SIGKILLed every few seconds (an actor
that has loaded its model, once both have and a shard was committed since the last kill); the job
replaces the actors, requeues their shards, and its output equals a clean run's (every id exactly once,
the same bytes in every part).

Driver faults: `embedpipe embed` runs as a subprocess joining the cluster and is SIGKILLed at points
found by watching the output (S3, through a FaultProxy that only delays, to hold the driver in the
windows that are otherwise milliseconds wide): right after start (before planning); mid-shard, with a
part committed and its receipt not; with every receipt committed and no `.embedpipe/manifest.json`; with the
manifest and no `.embedpipe/SUCCESS`. After each kill `.embedpipe/SUCCESS` is absent and every visible part is whole; the next
run finishes, and its output is byte-identical to the clean run's and checks out against its manifest.
The checker itself (tests/support/outputcheck.py) is shown to catch a tampered part.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.dataset import embeddings_of, read_dataset
from pipeline.spec import EmbedSpec, build_spec
from pipeline.tasks.embed import run_embed
from tests.support.faultproxy import FaultProxy
from tests.support.outputcheck import check_output, visible_parts
from tests.support.paths import REPO_ROOT
from tests.support.raycluster import multi_node_cluster
from tests.support.s3server import option_flags

pytestmark = pytest.mark.slow

ROOT = REPO_ROOT
# Encoding a shard takes milliseconds with the tiny model, so the work phase is made of many shards, each
# held RECEIPT_DELAY_S at its commit (and S3 commits are slower still): long enough for three kills.
ROWS, ROWS_PER_SHARD = 200, 2
SHARDS = ROWS // ROWS_PER_SHARD
# The driver-kill runs use the first rows only (same row groups, so the same first parts as the clean run).
DRIVER_ROWS = 60
DRIVER_SHARDS = DRIVER_ROWS // ROWS_PER_SHARD
RECEIPT_DELAY_S = 0.06  # per shard and actor, in the worker-kill run


@pytest.fixture(scope="module")
def multi_node():
    """Head and two worker nodes with one CPU each: two encoder actors, and room for a replacement."""
    with multi_node_cluster() as cluster:
        yield cluster


def texts(n: int) -> list[str]:
    words = str.split(
        "a worker or a driver dies at a random point and the next run finishes the job exactly once"
    )
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(2 + i % 19)) for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chaos") / "corpus.parquet"
    pq.write_table(
        pa.table({"id": list(range(ROWS)), "text": texts(ROWS)}), path, row_group_size=ROWS_PER_SHARD
    )
    return path


def driver_corpus() -> bytes:
    sink = io.BytesIO()
    pq.write_table(
        pa.table({"id": list(range(DRIVER_ROWS)), "text": texts(DRIVER_ROWS)}),
        sink,
        row_group_size=ROWS_PER_SHARD,
    )
    return sink.getvalue()


def spec_of(model: Path, corpus: Path, output: str, address: str, **extra) -> EmbedSpec:
    return build_spec(
        EmbedSpec,
        {
            "model": str(model),
            "input": [str(corpus)],
            "output": output,
            "rows_per_shard": ROWS_PER_SHARD,
            "workers": 2,
            "ray_address": address,
            "progress": False,
            **extra,
        },
    )


@pytest.fixture(scope="module")
def clean(multi_node, tiny_model_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same job on the same cluster, undisturbed."""
    output = tmp_path_factory.mktemp("clean") / "out"
    summary = run_embed(spec_of(tiny_model_dir, corpus, str(output), multi_node.address), log=lambda _m: None)
    assert summary["rows"] == ROWS and summary["actors_replaced"] == 0
    return output


def part_digests(fs, root: str) -> dict[str, str]:
    return {
        name: hashlib.sha256(fs.cat_file(f"{root}/{name}")).hexdigest() for name in visible_parts(fs, root)
    }


def local_fs():
    import fsspec

    return fsspec.filesystem("file")


def assert_same_as_clean(clean: Path, fs, root: str, shards: int = SHARDS) -> None:
    assert check_output(root, fs) == []
    want = dict(sorted(part_digests(local_fs(), str(clean)).items())[:shards])
    assert len(want) == shards and part_digests(fs, root) == want  # byte for byte, every part


# --------------------------------------------------------------------------- worker faults


def loaded_encoder_pids(cluster) -> list[int]:
    """This cluster's encoder actors that have loaded their model: workers under its raylets whose process
    title is `ray::EncoderActor...` but not `...__init__` (other clusters on the machine are left alone)."""
    import psutil

    pids = []
    for node in cluster.list_all_nodes():
        for raylet in node.all_processes.get("raylet", []):
            for child in psutil.Process(raylet.process.pid).children(recursive=True):
                try:
                    title = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if title.startswith("ray::EncoderActor") and "__init__" not in title:
                    pids.append(child.pid)
    return pids


def test_killing_encoder_actors_every_few_seconds(
    multi_node, tiny_model_dir: Path, corpus: Path, clean: Path, s3_server, tmp_path: Path
) -> None:
    fs = s3_fs(s3_server)
    bucket = f"workers-{os.getpid()}-{int(time.time() * 1000)}"
    s3_server.make_bucket(bucket)
    root = f"{bucket}/out"
    watch = Watch(fs, root)
    outcome: dict = {}

    def job(endpoint: str) -> None:
        try:
            outcome["summary"] = run_embed(
                spec_of(
                    tiny_model_dir,
                    corpus,
                    f"s3://{root}",
                    multi_node.address,
                    storage_option=option_flags(endpoint),
                ),
                log=lambda _m: None,
            )
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    rng = random.Random(7)
    kills: list[tuple[float, int]] = []
    started = time.monotonic()
    # Every receipt PUT is held a moment, so the work phase lasts SHARDS * RECEIPT_DELAY_S / 2 seconds at
    # least, however fast the machine encodes: the kills land while shards are being processed.
    with FaultProxy(
        s3_server.endpoint,
        delay_rate=1.0,
        delay_s=RECEIPT_DELAY_S,
        fault_filter=lambda method, path, _h: method == "PUT" and "/.embedpipe/receipts/" in path,
    ) as proxy:
        thread = threading.Thread(target=job, args=(proxy.endpoint,), daemon=True)
        thread.start()
        try:
            # A kill every few seconds: of an actor that has loaded its model, once both actors are loaded
            # (a replacement has taken over) and a shard was committed since the last kill.
            last = 0
            while thread.is_alive() and len(kills) < 3:
                time.sleep(rng.uniform(0.5, 1.5))
                done = len(watch.receipts(watch.names()))
                if done >= SHARDS - 40:
                    break
                victims = loaded_encoder_pids(multi_node)
                if done <= last or len(victims) < 2:
                    continue
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                kills.append((round(time.monotonic() - started, 1), done))
                last = done
        finally:
            thread.join(timeout=240)  # never leave the job running into the fixture's shutdown
    assert not thread.is_alive(), "the job did not finish"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    print(
        "FIGURES",
        json.dumps(
            {
                "test": "worker kills",
                "kills": len(kills),
                "at (s, shards done)": kills,
                "actors_replaced": summary["actors_replaced"],
                "retried": summary["shards"]["retried"],
                "rows": summary["rows"],
                "seconds": round(time.monotonic() - started, 1),
            }
        ),
    )
    assert len(kills) >= 3, f"too few kills landed while the job ran: {kills}"
    assert summary["actors_replaced"] >= len(kills) and summary["shards"]["retried"] >= len(kills)
    assert summary["rows"] == ROWS and summary["shards"]["done"] == SHARDS
    assert_same_as_clean(clean, fs, root)
    table = read_dataset(f"s3://{root}", s3_server.storage_options)
    assert table.column("id").to_pylist() == list(range(ROWS))  # every id exactly once, in order


# --------------------------------------------------------------------------- driver faults


def s3_fs(s3_server):
    import fsspec

    return fsspec.filesystem("s3", **s3_server.storage_options)


def cli_command(model: Path, corpus_url: str, output_url: str, endpoint: str, address: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "embed",
        "--model",
        str(model),
        "--input",
        corpus_url,
        "--output",
        output_url,
        "--rows-per-shard",
        str(ROWS_PER_SHARD),
        "--workers",
        "2",
        "--no-progress",
        "--ray-address",
        address,
        *(f"--storage-option={flag}" for flag in option_flags(endpoint)),
    ]


def cli_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    return env


class Watch:
    """What a reader sees in the output (straight from the server, not through the proxy)."""

    def __init__(self, fs, root: str) -> None:
        self.fs, self.root = fs, root

    def names(self) -> set[str]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return set()
        return {n[len(self.root) + 1 :] for n in found if "_tmp." not in n}

    def parts(self, names: set[str]) -> set[str]:
        return {n[: -len(".parquet")] for n in names if n.startswith("part-")}

    def receipts(self, names: set[str]) -> set[str]:
        return {
            n[len(".embedpipe/receipts/") : -len(".json")]
            for n in names
            if n.startswith(".embedpipe/receipts/part-")
        }


def kill_when(proc: subprocess.Popen, log: Path, ready, timeout: float = 120) -> set[str]:
    """SIGKILL the driver as soon as `ready()` returns the names it saw (never later than the timeout)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            seen = ready()
            if seen is not None:
                return seen
            assert proc.poll() is None, (
                f"the driver exited first ({proc.returncode}): {log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"kill point not reached: {log.read_text()[-3000:]}"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_killing_the_driver_at_each_stage(
    multi_node, tiny_model_dir: Path, clean: Path, s3_server, tmp_path: Path
) -> None:
    fs = s3_fs(s3_server)
    bucket = f"chaos-{os.getpid()}-{int(time.time())}"
    s3_server.make_bucket(bucket)
    fs.pipe_file(f"{bucket}/in/corpus.parquet", driver_corpus())
    root = f"{bucket}/out"
    watch = Watch(fs, root)

    def observe_killed(stage: str) -> None:
        names = watch.names()
        assert ".embedpipe/SUCCESS" not in names, f".embedpipe/SUCCESS after a kill {stage}"
        assert check_output(root, fs) == []  # every visible part is whole
        for part in watch.parts(names):  # and holds exactly its shard's rows
            table = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{part}.parquet")))
            first = int(part[len("part-") :]) * ROWS_PER_SHARD
            assert table.column("id").to_pylist() == list(range(first, first + ROWS_PER_SHARD))

    def ready_part_without_receipt():
        names = watch.names()
        return names if watch.parts(names) - watch.receipts(names) else None

    def ready_all_receipts():
        names = watch.names()
        return (
            names
            if len(watch.receipts(names)) == DRIVER_SHARDS and ".embedpipe/manifest.json" not in names
            else None
        )

    def ready_manifest():
        names = watch.names()
        return names if ".embedpipe/manifest.json" in names and ".embedpipe/SUCCESS" not in names else None

    def hold(word: str, seconds: float):
        """Delay every request whose path holds `word`, so the driver sits in the window before it."""
        return {"delay_rate": 1.0, "delay_s": seconds, "fault_filter": lambda m, path, h: word in path}

    # stage -> (proxy settings, when to kill: None = after a fixed moment)
    stages = [
        ("right after start", {}, None),
        ("a part committed, its receipt not", hold("/.embedpipe/receipts/", 3.0), ready_part_without_receipt),
        ("every receipt, no manifest", hold(".embedpipe/manifest.json", 20.0), ready_all_receipts),
        ("the manifest, no .embedpipe/SUCCESS", hold(".embedpipe/SUCCESS", 20.0), ready_manifest),
    ]
    figures = []
    with FaultProxy(s3_server.endpoint) as proxy:
        command = cli_command(
            tiny_model_dir, f"s3://{bucket}/in", f"s3://{root}", proxy.endpoint, multi_node.address
        )
        for number, (stage, settings, ready) in enumerate(stages):
            proxy.delay_rate, proxy.delay_s, proxy.fault_filter = (
                settings.get("delay_rate", 0.0),
                settings.get("delay_s", 0.0),
                settings.get("fault_filter"),
            )
            log = tmp_path / f"run{number}.log"
            with open(log, "wb") as sink:
                proc = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=cli_env(),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                if ready is None:
                    time.sleep(0.5)
                    kill_when(proc, log, lambda: set())
                else:
                    kill_when(proc, log, ready)
            observe_killed(stage)
            names = watch.names()
            figures.append(
                {"stage": stage, "parts": len(watch.parts(names)), "receipts": len(watch.receipts(names))}
            )

        proxy.delay_rate, proxy.fault_filter = 0.0, None
        final = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr[-3000:]
    summary = json.loads(final.stdout[final.stdout.index("{") :])
    assert summary["rows"] == DRIVER_ROWS and summary["shards"]["total"] == DRIVER_SHARDS
    assert ".embedpipe/SUCCESS" in watch.names()
    assert_same_as_clean(clean, fs, root, DRIVER_SHARDS)
    table = read_dataset(f"s3://{root}", s3_server.storage_options)
    assert table.column("id").to_pylist() == list(range(DRIVER_ROWS))
    assert (embeddings_of(table) == embeddings_of(read_dataset(str(clean)))[:DRIVER_ROWS]).all()
    print(
        "FIGURES",
        json.dumps(
            {
                "test": "driver kills",
                "kills": len(stages),
                "stages": figures,
                "final": summary["shards"],
                "requests": proxy.stats["requests"],
                "delays": proxy.stats["delay"],
            }
        ),
    )


def test_checker_catches_a_tampered_part(clean: Path, tmp_path: Path) -> None:
    """The checker is not vacuous: one changed byte, a swapped part, a missing or extra part each fail it."""
    import shutil

    assert check_output(str(clean)) == []
    for tamper in ("flip a byte", "swap two parts", "remove a part", "add a part"):
        copy = tmp_path / tamper.replace(" ", "-")
        shutil.copytree(clean, copy)
        first, second = copy / "part-00000.parquet", copy / "part-00001.parquet"
        if tamper == "flip a byte":
            data = bytearray(first.read_bytes())
            data[len(data) // 2] ^= 0x01
            first.write_bytes(bytes(data))
        elif tamper == "swap two parts":
            a, b = first.read_bytes(), second.read_bytes()
            first.write_bytes(b)
            second.write_bytes(a)
        elif tamper == "remove a part":
            first.unlink()
        else:
            shutil.copy(first, copy / f"part-{SHARDS:05d}.parquet")
        problems = check_output(str(copy))
        assert problems, tamper
