"""Actor placement and the actor pool's queue on a real local Ray cluster: more workers than CPUs share them,
actors the cluster cannot place end in a clear error instead of a hang, and a replacement that never
starts hands its shards to the actors that are left."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.io.dataset import read_dataset
from pipeline.runtime import cluster
from pipeline.runtime.actors import ActorStartTimeout, wait_started
from pipeline.runtime.pool import ActorPool
from pipeline.spec import EmbedSpec, build_spec
from pipeline.tasks.embed import run_embed


def worker_class() -> type:
    """Stands in for an encoder actor: `run` returns its item after a short pause. Defined in a function
    so that Ray ships the class by value (workers cannot import this test module)."""

    class Worker:
        def run(self, work, key, item, attempt, lookahead):
            time.sleep(0.05)
            return {"key": key, "item": item, "attempt": attempt}

    return Worker


def workers(count: int, num_cpus: float = 0.1) -> list:
    remote = ray.remote(worker_class()).options(num_cpus=num_cpus, max_restarts=0)
    return [remote.remote() for _ in range(count)]


def unplaceable() -> object:
    """An actor no node of this cluster can hold."""
    return ray.remote(worker_class()).options(num_cpus=10_000, max_restarts=0).remote()


def test_more_workers_than_cpus_share_them(ray_local, tiny_model_dir, tmp_path) -> None:
    cpus = int(ray.cluster_resources()["CPU"])
    plan = cluster.plan_actors(cpus + 1)
    assert plan.workers == cpus + 1 and plan.num_cpus * plan.workers <= cpus and plan.threads == 1
    assert cluster.plan_actors(cpus).num_cpus == 1 and cluster.plan_actors(1).num_cpus == cpus

    rows = 24
    corpus = tmp_path / "c.parquet"
    pq.write_table(
        pa.table({"id": list(range(rows)), "text": [f"text number {i}" for i in range(rows)]}),
        corpus,
        row_group_size=4,
    )
    spec = build_spec(
        EmbedSpec,
        {
            "model": str(tiny_model_dir),
            "input": [str(corpus)],
            "output": str(tmp_path / "o"),
            "rows_per_shard": 4,
            "workers": cpus + 1,
            "progress": False,
        },
    )
    summary = run_embed(spec, log=lambda _m: None)
    assert summary["workers"] == cpus + 1 and summary["rows"] == rows
    assert read_dataset(str(tmp_path / "o")).column("id").to_pylist() == list(range(rows))


def test_actors_that_cannot_be_placed_are_a_clear_error(ray_local, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDPIPE_ACTOR_START_TIMEOUT_S", "2")
    started = time.monotonic()
    with pytest.raises(ActorStartTimeout) as caught:
        wait_started([unplaceable()], "encoder actor", 10_000, 0)
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert "1 of 1 encoder actor(s) did not start within 2s" in message
    assert "10000 CPU" in message and "free" in message and "--workers" in message


def pool_whose_replacements_never_start(size: int) -> ActorPool:
    """``size`` workers; every actor made after them (a replacement) cannot be placed."""
    made = []

    def make(slot: int):
        made.append(slot)
        return workers(1)[0] if len(made) <= size else unplaceable()

    return ActorPool(make, size, what="worker", num_cpus=0.1, start_timeout_s=2)


def submit(actor, ticket, _following):
    return actor.run.remote(None, ticket.key, ticket.item, ticket.attempt, None)


def test_a_replacement_that_never_starts_hands_its_shards_to_the_others(ray_local) -> None:
    results: list[dict] = []
    with pool_whose_replacements_never_start(2) as pool:

        def on_result(key, item, result) -> None:
            results.append(result)
            if len(results) == 3:
                ray.kill(
                    pool.actors[0], no_restart=True
                )  # a lost worker; its replacement can never be placed

        stats = pool.run_queue([(i, i * 10) for i in range(30)], submit, on_result=on_result)
    assert sorted(r["key"] for r in results) == list(range(30))  # every item exactly once
    assert all(r["item"] == r["key"] * 10 for r in results)
    assert stats.actors_replaced == 1 and stats.retried >= 1


def test_no_actor_left_is_a_clear_error(ray_local) -> None:
    done: list = []
    with pool_whose_replacements_never_start(2) as pool:

        def on_result(key, item, result) -> None:
            done.append(key)
            if len(done) == 2:
                for actor in list(pool.actors):
                    ray.kill(actor, no_restart=True)

        with pytest.raises(ActorStartTimeout, match="no worker is left.*did not start within 2s"):
            pool.run_queue([(i, i) for i in range(30)], submit, on_result=on_result)
    assert len(done) < 30
