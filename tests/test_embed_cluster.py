"""The embed job on a real multi-node local Ray cluster (head + 2 worker nodes, one CPU each): a worker
node dies mid-job, its actor's shard is requeued on a replacement actor, and the job finishes with
every id exactly once and the same vectors as a clean run on the same cluster."""

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

pytestmark = pytest.mark.slow

OBJECT_STORE_BYTES = 96 * 1024 * 1024
ROWS, ROWS_PER_SHARD = 240, 4


@pytest.fixture(scope="module")
def multi_node():
    """Head and two worker nodes, each with one CPU: two encoder actors fill two of the three CPUs,
    so a replacement actor has somewhere to go when a worker node dies."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the local cluster of the in-process tests; `ray_local` restarts it if needed
    # RAY_AUTH_MODE is set once for the session (conftest): changing it after a first ray.init in
    # this process makes every actor creation on the new cluster fail (SchedulingCancelled).
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False})
        try:
            workers = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(2)]
            cluster.wait_for_nodes()
            yield cluster, workers
        finally:
            ray.shutdown()
            cluster.shutdown()


def spec_of(model: Path, corpus: Path, output: Path, address: str) -> EmbedSpec:
    return build_spec(EmbedSpec, {
        "model": str(model), "input": [str(corpus)], "output": str(output), "rows_per_shard": ROWS_PER_SHARD,
        "workers": 2, "ray_address": address, "progress": False, "max_attempts": 2,
    })


def actor_nodes() -> set[str]:
    """Node ids of the live encoder actors (from the GCS actor table)."""
    import ray

    return {info["Address"]["NodeID"] for info in ray._private.state.actors().values()
            if info["ActorClassName"] == "EncoderActor" and info["State"] == "ALIVE"}


def test_worker_node_dies_mid_job(multi_node, tiny_model_dir, tmp_path) -> None:
    cluster, workers = multi_node
    words = str.split("a node dies in the middle of the job and its shard goes to another actor")
    texts = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 25)) for i in range(ROWS)]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(ROWS)), "text": texts}), corpus, row_group_size=ROWS_PER_SHARD)

    clean_out = tmp_path / "clean"
    clean = run_embed(spec_of(tiny_model_dir, corpus, clean_out, cluster.address), log=lambda _m: None)
    assert clean["shards"]["done"] == ROWS // ROWS_PER_SHARD and clean["actors_replaced"] == 0

    output = tmp_path / "faulty"
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["summary"] = run_embed(spec_of(tiny_model_dir, corpus, output, cluster.address),
                                           log=lambda _m: None)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not list(output.glob(f"{RECEIPTS_DIR}/part-*.json")):
            assert thread.is_alive(), outcome
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.02)
        victim = None
        while victim is None:  # the GCS actor table may lag a moment behind the actors
            busy = actor_nodes()
            victim = next((node for node in workers if node.node_id in busy), None)
            assert victim or time.monotonic() < deadline, (busy, [node.node_id for node in workers])
            time.sleep(0.02)
        cluster.remove_node(victim, allow_graceful=False)
        committed_at_kill = len(list(output.glob(f"{RECEIPTS_DIR}/part-*.json")))
    finally:
        thread.join(timeout=180)  # never leave the job running into the fixture's shutdown
    assert not thread.is_alive(), "the job did not finish after the node died"
    assert "error" not in outcome, outcome.get("error")

    summary = outcome["summary"]
    assert committed_at_kill < ROWS // ROWS_PER_SHARD, "the job finished before the node died"
    assert summary["actors_replaced"] >= 1 and summary["shards"]["retried"] >= 1
    assert summary["shards"]["done"] == ROWS // ROWS_PER_SHARD and summary["rows"] == ROWS
    assert (output / SUCCESS_FILE).exists()
    faulty, reference = read_dataset(str(output)), read_dataset(str(clean_out))
    assert faulty.column("id").to_pylist() == list(range(ROWS))  # every id exactly once, in order
    np.testing.assert_array_equal(embeddings_of(faulty), embeddings_of(reference))
