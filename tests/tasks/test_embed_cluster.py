"""The embed job on a real multi-node local Ray cluster (head + 2 worker nodes, one CPU each): a worker
node dies mid-job, its actor's shard is requeued on a replacement actor, and the job finishes with
every id exactly once and the same vectors as a clean run on the same cluster.

The faulty run writes to S3 through a proxy that holds every receipt PUT a moment, so the job lasts a
few seconds however fast the machine is, and the node always dies while its actor has shards to do."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.dataset import RECEIPTS_DIR, SUCCESS_FILE, embeddings_of, read_dataset
from pipeline.spec import EmbedSpec, build_spec
from pipeline.tasks.embed import run_embed
from tests.support.faultproxy import FaultProxy
from tests.support.raycluster import multi_node_cluster
from tests.support.s3server import option_flags

pytestmark = pytest.mark.slow

ROWS, ROWS_PER_SHARD = 240, 4
RECEIPT_DELAY_S = 0.15  # per shard and actor: 60 shards on two actors take at least 4.5 s


@pytest.fixture(scope="module")
def multi_node():
    """Head and two worker nodes, each with one CPU: two encoder actors fill two of the three CPUs,
    so a replacement actor has somewhere to go when a worker node dies."""
    with multi_node_cluster() as cluster:
        yield cluster, cluster.added


def s3fs_of(options: dict):
    import fsspec

    return fsspec.filesystem("s3", **options)


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
            "max_attempts": 2,
            **extra,
        },
    )


def live_actors() -> dict[str, str]:
    """Actor id -> node id of the live encoder actors (from the GCS actor table)."""
    import ray

    return {
        actor_id: info["Address"]["NodeID"]
        for actor_id, info in ray._private.state.actors().items()
        if info["ActorClassName"] == "EncoderActor" and info["State"] == "ALIVE"
    }


def wait_until_no_actor_lives(seconds: float = 60) -> None:
    """The previous run's actors leave the actor table a moment after the run: a victim chosen from it
    must be one of this run's actors."""
    deadline = time.monotonic() + seconds
    while live_actors():
        assert time.monotonic() < deadline, live_actors()
        time.sleep(0.1)


def test_worker_node_dies_mid_job(multi_node, tiny_model_dir, s3_server, tmp_path) -> None:
    cluster, workers = multi_node
    words = str.split("a node dies in the middle of the job and its shard goes to another actor")
    texts = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 25)) for i in range(ROWS)]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(ROWS)), "text": texts}), corpus, row_group_size=ROWS_PER_SHARD)

    clean_out = tmp_path / "clean"
    clean = run_embed(spec_of(tiny_model_dir, corpus, str(clean_out), cluster.address), log=lambda _m: None)
    assert clean["shards"]["done"] == ROWS // ROWS_PER_SHARD and clean["actors_replaced"] == 0

    wait_until_no_actor_lives()

    bucket = f"node-{int(time.time() * 1000)}"
    s3_server.make_bucket(bucket)
    output = f"s3://{bucket}/faulty"
    fs = s3fs_of(s3_server.storage_options)
    outcome: dict = {}

    def committed() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{bucket}/faulty/{RECEIPTS_DIR}/part-*.json"))

    with FaultProxy(
        s3_server.endpoint,
        delay_rate=1.0,
        delay_s=RECEIPT_DELAY_S,
        fault_filter=lambda method, path, _h: method == "PUT" and f"/{RECEIPTS_DIR}/" in path,
    ) as proxy:

        def job() -> None:
            try:
                outcome["summary"] = run_embed(
                    spec_of(
                        tiny_model_dir,
                        corpus,
                        output,
                        cluster.address,
                        storage_option=option_flags(proxy.endpoint),
                    ),
                    log=lambda _m: None,
                )
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while not committed():
                assert thread.is_alive(), outcome
                assert time.monotonic() < deadline, "no shard was committed in time"
                time.sleep(0.05)
            victim = None
            while victim is None:  # the GCS actor table may lag a moment behind the actors
                busy = set(live_actors().values())
                victim = next((node for node in workers if node.node_id in busy), None)
                assert victim or time.monotonic() < deadline, (busy, [node.node_id for node in workers])
                time.sleep(0.02)
            cluster.remove_node(victim, allow_graceful=False)
            committed_at_kill = committed()
        finally:
            thread.join(timeout=180)  # never leave the job running into the fixture's shutdown
    assert not thread.is_alive(), "the job did not finish after the node died"
    assert "error" not in outcome, outcome.get("error")

    summary = outcome["summary"]
    assert committed_at_kill < ROWS // ROWS_PER_SHARD, "the job finished before the node died"
    assert summary["actors_replaced"] >= 1 and summary["shards"]["retried"] >= 1
    assert summary["shards"]["done"] == ROWS // ROWS_PER_SHARD and summary["rows"] == ROWS
    assert fs.exists(f"{bucket}/faulty/{SUCCESS_FILE}")
    faulty, reference = read_dataset(output, s3_server.storage_options), read_dataset(str(clean_out))
    assert faulty.column("id").to_pylist() == list(range(ROWS))  # every id exactly once, in order
    np.testing.assert_array_equal(embeddings_of(faulty), embeddings_of(reference))
