"""Lost actors in dedup and mine, on a real multi-node local Ray cluster (head + 2 worker nodes, one CPU each).

What embed survives (tests/test_reliability_chaos.py), the other jobs must survive too: an IndexShardActor
(dedup, mine) or an EncoderActor (mine) SIGKILLed in the middle of the job is replaced, its work is
re-issued, and the output is byte-identical to a clean run of the same job on the same cluster.

Each faulty run writes to the moto S3 server through a FaultProxy that holds some PUTs a moment, so the
stage under attack lasts long enough for the kill to land in its middle on any machine. The kill is gated
on what a reader sees in the bucket (watched directly, not through the proxy): at least one part of the
stage committed, and not all. Victims are found in the cluster's GCS actor table (class name, state ALIVE,
pid; ``ray.util.state.list_actors`` would need the dashboard, which these clusters do not run) and checked
against the process title on this machine before ``os.kill``.

- dedup, exact mode: one committed part per source part (12 steps, each on both index actors); one actor
  is killed once a step is committed.
- dedup, partitioned mode: one committed part per owner (2). Once the first is visible (its receipt held),
  both index actors are killed: which one still owes its part cannot be told from outside, and the
  missing owner's pairs must be redone on a replacement.
- mine, one run: an encoder actor is killed inside an encoding call (stopped with SIGSTOP, its process
  title checked again, then SIGKILLed), then an index actor once an output part is committed (part PUTs
  held).

``FIGURES {...}`` lines (with ``pytest -s``) give the numbers quoted in RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.spec import DedupSpec, EmbedSpec, MineSpec, build_spec
from pipeline.tasks.dedup import run_dedup
from pipeline.tasks.embed import run_embed
from pipeline.tasks.mine import run_mine
from tests.support.faultproxy import FaultProxy
from tests.support.raycluster import multi_node_cluster
from tests.support.s3server import option_flags

pytestmark = pytest.mark.slow

ROWS, ROWS_PER_PART = 240, 20  # 12 source parts: 12 steps in exact mode's pairs stage
THRESHOLD = 0.99
PAIRS, ANCHORS_PER_BLOCK, TEXTS_PER_TASK = 120, 12, 6  # 10 output parts; 20 + 10 encoding tasks
MINE_PARTS = -(-PAIRS // ANCHORS_PER_BLOCK)
PART_PUT_DELAY_S = 0.05  # each PUT of a part (its temporary upload and its copy into place)
RECEIPT_PUT_DELAY_S = 0.5  # partitioned mode: holds the driver between the two owners' parts
# Where dedup commits one part per pairs step (query part, or cluster owner): pairs/, or .embedpipe/search/ when
# pairs/ holds only the final spanning forest.
STEP_DIRS = ("pairs/", ".embedpipe/search/")
# Their receipts: .embedpipe/receipts/pairs/, .embedpipe/receipts/search/.
STEP_RECEIPTS = tuple(".embedpipe/receipts/" + d.removeprefix(".embedpipe/") for d in STEP_DIRS)
WORDS = str.split(
    "index actor encoder shard worker node cluster query positive negative anchor corpus pairs kept "
    "duplicate near exact score cosine vector slice owner part receipt manifest commit retry replace lost"
)


def log_nothing(_message: str) -> None:
    pass


# --------------------------------------------------------------------------- cluster, data, outputs


@pytest.fixture(scope="module")
def multi_node():
    """Head and two worker nodes with one CPU each: two actors of a kind, and room for a replacement."""
    with multi_node_cluster(join=True) as cluster:
        yield cluster


def corpus_texts() -> list[str]:
    """ROWS texts with planted exact duplicates (every 13th text copied) and near ones (one word added)."""
    rng = random.Random(3)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(ROWS)]
    for i in range(0, ROWS, 13):
        texts[(i + 101) % ROWS] = texts[i]
    for i in range(5, ROWS, 17):
        texts[(i + 57) % ROWS] = texts[i] + " again"
    return texts


@pytest.fixture(scope="module")
def embedded(multi_node, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An embed output of ROWS texts in ROWS / ROWS_PER_PART parts (local: every node reads it)."""
    folder = tmp_path_factory.mktemp("jobs")
    corpus = folder / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(ROWS)), "text": corpus_texts()}), corpus)
    output = folder / "embedded"
    values = {
        "model": str(tiny_model_dir),
        "input": [str(corpus)],
        "output": str(output),
        "rows_per_shard": ROWS_PER_PART,
        "workers": 2,
        "ray_address": multi_node.address,
        "progress": False,
    }
    summary = run_embed(build_spec(EmbedSpec, values), log=log_nothing)
    assert summary["rows"] == ROWS
    return str(output)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(5)
    queries = [
        f"q{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for i in range(PAIRS)
    ]
    positives = [
        f"p{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) for i in range(PAIRS)
    ]
    path = tmp_path_factory.mktemp("mine") / "pairs.parquet"
    pq.write_table(pa.table({"query": queries, "positive": positives}), path)
    return path


class Bucket:
    """One bucket for the module's faulty runs, read directly (never through a proxy) by the test."""

    def __init__(self, s3_server) -> None:
        import fsspec

        self.name = f"jobs-{uuid.uuid4().hex[:10]}"
        s3_server.make_bucket(self.name)
        self.fs = fsspec.filesystem("s3", **s3_server.storage_options)

    def url(self, prefix: str) -> str:
        return f"s3://{self.name}/{prefix}"

    def names(self, prefix: str) -> set[str]:
        """Names under the prefix that a reader sees (temporaries left out)."""
        self.fs.invalidate_cache()
        root = f"{self.name}/{prefix}"
        try:
            found = self.fs.find(root)
        except FileNotFoundError:
            return set()
        return {n[len(root) + 1 :] for n in found if "_tmp." not in n}

    def files(self, prefix: str) -> dict[str, bytes]:
        return {name: self.fs.cat_file(f"{self.name}/{prefix}/{name}") for name in self.names(prefix)}


@pytest.fixture(scope="module")
def bucket(s3_server) -> Bucket:
    return Bucket(s3_server)


def local_files(root: str) -> dict[str, bytes]:
    base = Path(root)
    return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def digests(files: dict[str, bytes]) -> dict[str, str]:
    """sha256 of every file but the report (report.json, and dedup's report.html: they hold timings)."""
    return {
        name: hashlib.sha256(data).hexdigest()
        for name, data in sorted(files.items())
        if name not in ("report.json", "report.html", ".embedpipe/report.json")
    }


def without(report: dict, *keys: str) -> dict:
    return {k: v for k, v in report.items() if k not in keys}


def figures(**values) -> None:
    print("FIGURES", json.dumps(values))


# --------------------------------------------------------------------------- finding and killing actors


def title_of(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def live_pids(class_name: str) -> list[int]:
    """Pids of this cluster's live actors of a class (GCS actor table), each a process on this machine whose
    title says it is that actor (so a stale table entry or a reused pid is never shot)."""
    import ray

    pids = []
    for info in ray._private.state.actors().values():
        pid = int(info.get("Pid") or 0)
        alive = info["ActorClassName"] == class_name and info["State"] == "ALIVE" and pid
        if alive and title_of(pid).startswith(f"ray::{class_name}"):
            pids.append(pid)
    return sorted(pids)


NOT_WORK = ("__init__", "__ray_ready__", "__ray_terminate__", "describe")


def in_a_task(title: str, class_name: str) -> bool:
    """Whether an actor's process title says it is running a work method (``ray::EncoderActor.encode``,
    ``.encode_counted``, ``.run``, ...): Ray sets ``ray::Class.method`` for the time of each call and
    ``ray::Class`` between calls."""
    if not title.startswith(f"ray::{class_name}."):
        return False
    return title[len(f"ray::{class_name}.") :].split(" ", 1)[0] not in NOT_WORK


def wait_until_none_alive(class_name: str, seconds: float = 60) -> None:
    """The previous run's actors leave the table a moment after it: a victim must be one of this run's."""
    deadline = time.monotonic() + seconds
    while live_pids(class_name):
        assert time.monotonic() < deadline, f"{class_name} actors of an earlier run still alive"
        time.sleep(0.1)


@dataclass
class Kill:
    """One kill in a run: the pids ``victims()`` names (None: not yet) are SIGKILLed at once; ``too_late()``
    says in words when the moment has passed (checked just before the kill too)."""

    what: str
    victims: Callable[[], list[int] | None]
    too_late: Callable[[], str | None]
    poll_s: float = 0.02
    pids: list[int] = field(default_factory=list)
    at_s: float | None = None
    late: str | None = None  # what too_late() said just before the kill (None: in time)
    missed: str | None = None

    def figures(self) -> dict:
        return {"what": self.what, "at_s": self.at_s, "pids": len(self.pids)}


def run_and_kill(
    job: Callable[[str], dict], s3_server, kills: list[Kill], proxy: dict, timeout_s: float = 180
) -> tuple[dict, dict]:
    """Run ``job(endpoint)`` in a thread, writing through a FaultProxy with ``proxy`` settings, and make the
    kills in order. Returns (the job's report, requests and seconds). A job that raises fails the test with
    its own exception; a kill that never landed, or landed too late, fails it after that."""
    outcome: dict = {}
    started = time.monotonic()

    def target(endpoint: str) -> None:
        try:
            outcome["report"] = job(endpoint)
        except BaseException as exc:  # re-raised by the test thread
            outcome["error"] = exc

    with FaultProxy(s3_server.endpoint, **proxy) as fault_proxy:
        thread = threading.Thread(target=target, args=(fault_proxy.endpoint,), daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        try:
            for kill in kills:
                while thread.is_alive() and time.monotonic() < deadline:
                    kill.missed = kill.too_late()
                    if kill.missed:
                        break
                    pids = kill.victims()
                    if pids:
                        kill.late = kill.too_late()  # the last look before the kill
                        for pid in pids:
                            os.kill(pid, signal.SIGKILL)
                        kill.pids, kill.at_s = pids, round(time.monotonic() - started, 2)
                        break
                    time.sleep(kill.poll_s)
        finally:
            thread.join(timeout=timeout_s)  # never leave the job running into the fixture's shutdown
        run = {"requests": fault_proxy.stats["requests"], "seconds": round(time.monotonic() - started, 1)}
    assert not thread.is_alive(), "the job did not finish"
    if "error" in outcome:
        raise outcome["error"]
    for kill in kills:
        assert kill.pids, f"{kill.what}: no kill landed ({kill.missed or 'the job ended first'})"
        assert kill.late is None, f"{kill.what}: the kill landed too late ({kill.late})"
    return outcome["report"], run


# --------------------------------------------------------------------------- dedup


def dedup_spec(source: str, output: str, mode: str, address: str, endpoint: str | None = None) -> DedupSpec:
    values = {
        "input": [source],
        "output": output,
        "threshold": THRESHOLD,
        "mode": mode,
        "workers": 2,
        "ray_address": address,
        "progress": False,
    }
    if endpoint:
        values["storage_option"] = option_flags(endpoint)
    return build_spec(DedupSpec, values)


@pytest.mark.parametrize("mode", ["exact", "partitioned"])
def test_dedup_survives_a_lost_index_actor(
    mode: str, multi_node, embedded: str, s3_server, bucket: Bucket, tmp_path: Path
) -> None:
    started = time.monotonic()
    clean_out = str(tmp_path / "clean")
    clean = run_dedup(dedup_spec(embedded, clean_out, mode, multi_node.address), log=log_nothing)
    clean_seconds = round(time.monotonic() - started, 1)
    assert clean["removed"] > 0 and clean["actors_replaced"] == 0
    want = local_files(clean_out)
    assert any(n.startswith("pairs/") for n in want)
    steps = ROWS // ROWS_PER_PART if mode == "exact" else 2  # query parts, or owners (one per index actor)
    wait_until_none_alive("IndexShardActor")
    prefix = f"dedup-{mode}"

    def committed_steps() -> int:
        """Step parts committed (receipt visible): under pairs/, or under .embedpipe/search/ where pairs/ is only the
        final forest."""
        return sum(1 for n in bucket.names(prefix) if n.startswith(STEP_RECEIPTS))

    def too_late() -> str | None:
        done = committed_steps()
        return f"{done} of {steps} pairs steps committed" if done >= steps else None

    if mode == "exact":
        # Each step part's upload and copy are held: 12 steps last >= 12 * 2 * PART_PUT_DELAY_S seconds.
        def held(method: str, path: str, _headers) -> bool:
            return (
                method == "PUT"
                and any(f"/{d}" in path for d in STEP_DIRS)
                and "/.embedpipe/receipts/" not in path
            )

        proxy = {"delay_rate": 1.0, "delay_s": PART_PUT_DELAY_S, "fault_filter": held}
        rng = random.Random(11)

        def victims() -> list[int] | None:
            alive = live_pids("IndexShardActor")
            return [rng.choice(alive)] if len(alive) == 2 and committed_steps() >= 1 else None

        kill = Kill("an index actor, once a pairs step is committed", victims, too_late)
    else:
        # Two owners: once the first owner's part is visible its receipt is still held, so the second owner's
        # pairs are not computed yet. Both actors die; the second owner's work must be redone.
        def held(method: str, path: str, _headers) -> bool:
            return method == "PUT" and any(f"/{r}" in path for r in STEP_RECEIPTS)

        proxy = {"delay_rate": 1.0, "delay_s": RECEIPT_PUT_DELAY_S, "fault_filter": held}

        def victims() -> list[int] | None:
            visible = any(
                n.startswith(STEP_DIRS) and not n.endswith("/pairs.parquet") for n in bucket.names(prefix)
            )
            alive = live_pids("IndexShardActor")
            return alive if visible and len(alive) == 2 else None

        kill = Kill("both index actors, once the first owner's step part is visible", victims, too_late)

    report, run = run_and_kill(
        lambda endpoint: run_dedup(
            dedup_spec(embedded, bucket.url(prefix), mode, multi_node.address, endpoint), log=log_nothing
        ),
        s3_server,
        [kill],
        proxy,
    )
    got = bucket.files(prefix)
    figures(
        test=f"dedup {mode}, lost index actor",
        kills=[kill.figures()],
        actors_replaced=report["actors_replaced"],
        pairs_steps=steps,
        kept_parts=sum(n.startswith("kept/") for n in got),
        rows_in=report["rows_in"],
        rows_out=report["rows_out"],
        lost=clean["rows_out"] - report["rows_out"],
        clean_seconds=clean_seconds,
        **run,
    )
    assert report["actors_replaced"] >= len(kill.pids)
    assert ".embedpipe/SUCCESS" in got and any(n.startswith("kept/") for n in got)
    # kept/, pairs/, duplicates.parquet, receipts, manifest: byte for byte
    assert digests(got) == digests(want)
    ignored = ("timings", "actors_replaced", "output")
    assert without(report, *ignored) == without(clean, *ignored)
    assert without(json.loads(got["report.json"]), *ignored) == without(
        json.loads(want["report.json"]), *ignored
    )


# --------------------------------------------------------------------------- mine


def mine_spec(model: Path, pairs: Path, output: str, address: str, endpoint: str | None = None) -> MineSpec:
    values = {
        "model": str(model),
        "input": [str(pairs)],
        "output": output,
        "num_negatives": 2,
        "anchors_per_block": ANCHORS_PER_BLOCK,
        "texts_per_task": TEXTS_PER_TASK,
        "workers": 2,
        "ray_address": address,
        "progress": False,
    }
    if endpoint:
        values["storage_option"] = option_flags(endpoint)
    return build_spec(MineSpec, values)


def test_mine_survives_a_lost_encoder_actor_then_a_lost_index_actor(
    multi_node, tiny_model_dir: Path, pairs_file: Path, s3_server, bucket: Bucket, tmp_path: Path
) -> None:
    started = time.monotonic()
    clean_out = str(tmp_path / "clean")
    clean = run_mine(mine_spec(tiny_model_dir, pairs_file, clean_out, multi_node.address), log=log_nothing)
    clean_seconds = round(time.monotonic() - started, 1)
    assert clean["parts"] == MINE_PARTS and clean["rows_out"] > 0
    wait_until_none_alive("EncoderActor")
    wait_until_none_alive("IndexShardActor")
    prefix = "mine"
    encoders: list[int] = []

    def encoder_in_a_task() -> list[int] | None:
        """An encoder actor caught inside an encoding call: stopped, its title checked again, then handed to
        the SIGKILL, so the task it runs never finishes. One caught idle goes on (SIGCONT). Probes the two
        actors' titles every 2 ms for up to 50 ms at a time (cheap), the GCS table only until both are known."""
        if len(encoders) < 2:
            encoders[:] = live_pids("EncoderActor")
        until = time.monotonic() + 0.05
        while encoders and time.monotonic() < until:
            for pid in encoders:
                if in_a_task(title_of(pid), "EncoderActor"):
                    os.kill(pid, signal.SIGSTOP)
                    if in_a_task(title_of(pid), "EncoderActor"):
                        return [pid]
                    os.kill(pid, signal.SIGCONT)
            time.sleep(0.002)
        return None

    def encoding_over() -> str | None:
        return "encoding was over: index actors are up" if live_pids("IndexShardActor") else None

    def committed() -> int:
        return sum(1 for n in bucket.names(prefix) if n.startswith(".embedpipe/receipts/part-"))

    rng = random.Random(13)

    def index_actor() -> list[int] | None:
        alive = live_pids("IndexShardActor")
        return [rng.choice(alive)] if len(alive) == 2 and committed() >= 1 else None

    def search_over() -> str | None:
        done = committed()
        return f"{done} of {MINE_PARTS} parts committed" if done >= MINE_PARTS else None

    def held(method: str, path: str, _headers) -> bool:  # a part's upload and its copy into place
        name = urlsplit(path).path.rsplit("/", 1)[-1]
        return (
            method == "PUT"
            and "part-" in name
            and name.endswith(".parquet")
            and "/.embedpipe/receipts/" not in path
        )

    kills = [
        Kill("an encoder actor inside an encoding call", encoder_in_a_task, encoding_over, poll_s=0.001),
        Kill("an index actor, once a part is committed", index_actor, search_over),
    ]
    report, run = run_and_kill(
        lambda endpoint: run_mine(
            mine_spec(tiny_model_dir, pairs_file, bucket.url(prefix), multi_node.address, endpoint),
            log=log_nothing,
        ),
        s3_server,
        kills,
        {"delay_rate": 1.0, "delay_s": PART_PUT_DELAY_S, "fault_filter": held},
    )
    got = bucket.files(prefix)
    figures(
        test="mine, lost encoder actor then lost index actor",
        kills=[k.figures() for k in kills],
        actors_replaced=report.get("actors_replaced"),
        parts=report["parts"],
        rows_in=report["pairs_in"],
        rows_out=report["rows_out"],
        lost=clean["rows_out"] - report["rows_out"],
        clean_seconds=clean_seconds,
        **run,
    )
    assert report.get("actors_replaced", 0) >= len(kills)
    want = local_files(clean_out)
    assert ".embedpipe/SUCCESS" in got and sum(n.startswith("part-") for n in got) == MINE_PARTS
    assert digests(got) == digests(want)  # every part, receipt and the manifest, byte for byte
    ignored = ("timings", "workers", "actors_replaced", "output")
    assert without(report, *ignored) == without(clean, *ignored)
    assert without(json.loads(got[".embedpipe/report.json"]), *ignored) == without(
        json.loads(want[".embedpipe/report.json"]), *ignored
    )
