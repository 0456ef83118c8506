"""ActorPool on a real local Ray cluster, with toy actors: SIGKILLed actors mid-queue and mid-call,
retries, the replacement budget, constructor errors, actors the cluster cannot place, and that every
actor is gone after the ``with`` block."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import ray
from ray.exceptions import RayActorError

from pipeline.runtime.pool import ActorInitError, ActorPool, ActorsLost, ActorStartTimeout, ShardFailed


def toy_classes() -> tuple[type, type]:
    """A stateless worker and a slot-stateful slice holder. Defined in a function so that Ray ships the
    classes by value (workers cannot import this test module)."""

    class Worker:
        def __init__(self, slot: int) -> None:
            self.slot = slot

        def pid(self) -> int:
            return os.getpid()

        def run(self, key, item, attempt, following, fail) -> dict:
            """Returns who ran the item; raises ValueError for keys in ``fail`` up to attempt fail[key]
            (None: every attempt)."""
            time.sleep(0.05)
            if key in fail and (fail[key] is None or attempt <= fail[key]):
                raise ValueError(f"item {key} attempt {attempt}")
            return {"key": key, "item": item, "attempt": attempt, "pid": os.getpid(), "following": following}

        def counted(self, n: int) -> tuple[int, list[int]]:
            return n, list(range(n))

        def die(self) -> None:
            os._exit(1)

    class Slice:
        """Holds rows slot*10 .. slot*10+9; its constructor fails once ``marker`` exists."""

        def __init__(self, slot: int, marker: str | None = None) -> None:
            if marker and os.path.exists(marker):
                raise ValueError(f"slice {slot}: vectors file /data/slice-{slot}.npy is corrupt")
            self.slot = slot
            self.rows = list(range(slot * 10, slot * 10 + 10))

        def pid(self) -> int:
            return os.getpid()

        def total(self, factor: int, delay: float = 0.0) -> tuple[int, int]:
            time.sleep(delay)
            return self.slot, sum(self.rows) * factor

    return Worker, Slice


Worker, Slice = toy_classes()


def run_item(fail: dict | None = None):
    fail = fail or {}

    def submit(actor, ticket, following):
        return actor.run.remote(ticket.key, ticket.item, ticket.attempt, following and following.key, fail)

    return submit


def workers(size: int, **kwargs) -> ActorPool:
    return ActorPool.of(Worker, size, lambda slot: (slot,), num_cpus=0.1, what="worker", **kwargs)


def slices(size: int, marker: str | None = None, **kwargs) -> ActorPool:
    return ActorPool.of(Slice, size, lambda slot: (slot, marker), num_cpus=0.1, what="slice actor", **kwargs)


def assert_all_gone(handles: list, pids: list[int]) -> None:
    """Every handle answers as dead (ray.kill is asynchronous: a call may still be served for a moment) and
    every process has exited."""
    deadline = time.monotonic() + 30
    for actor in handles:
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=30)
            except RayActorError:
                break
            assert time.monotonic() < deadline, "an actor still answers 30 s after the pool was closed"
            time.sleep(0.1)
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        time.sleep(0.1)
    assert not alive, f"actor processes still running: {alive}"


def test_every_item_once_when_an_actor_is_sigkilled_mid_queue(ray_local) -> None:
    results: list[dict] = []
    with workers(2) as pool:
        pids = pool.call_each("pid", lambda slot: ())

        def on_result(key, item, result) -> None:
            results.append(result)
            if len(results) == 6:  # the other actor is running an item right now
                os.kill(next(p for p in pids if p != result["pid"]), signal.SIGKILL)

        stats = pool.run_queue([(i, i * 10) for i in range(40)], run_item(), on_result=on_result)
        final_pids = pool.call_each("pid", lambda slot: ())
    assert sorted(r["key"] for r in results) == list(range(40))  # every item exactly once
    assert all(r["item"] == r["key"] * 10 for r in results)
    assert all(r["attempt"] == 1 for r in results)  # a lost actor spends no attempt
    assert any(r["following"] is not None for r in results)  # actors were told their next item
    assert stats is pool.stats and stats.actors_replaced == 1 and stats.retried >= 1
    assert any("worker lost" in e for e in stats.errors)
    replacement = (set(final_pids) - set(pids)).pop()
    assert any(r["pid"] == replacement for r in results)  # the replacement took over work


def test_retries_and_failing_items(ray_local) -> None:
    with workers(2) as pool:
        results: dict = {}
        stats = pool.run_queue(
            [(i, i) for i in range(8)], run_item({3: 1}), on_result=lambda k, i, r: results.setdefault(k, r)
        )
        assert sorted(results) == list(range(8)) and results[3]["attempt"] == 2
        assert stats.retried == 1 and stats.actors_replaced == 0 and "item 3 attempt 1" in stats.errors[0]

        # Several returns: only the first is fetched, the others come as refs (mine's encoded vectors).
        got: dict = {}
        pool.run_queue(
            [(n, n) for n in range(1, 5)],
            lambda actor, ticket, following: actor.counted.options(num_returns=2).remote(ticket.item),
            on_result=lambda key, item, result: got.setdefault(key, result),
            lookahead=False,
        )
        assert sorted(got) == [1, 2, 3, 4] and all(got[n][0] == n for n in got)
        assert all(isinstance(got[n][1], ray.ObjectRef) and ray.get(got[n][1]) == list(range(n)) for n in got)

        with pytest.raises(ShardFailed, match="shard 5 failed after 3 attempt") as caught:
            pool.run_queue([(i, i) for i in range(8)], run_item({5: None}), on_result=lambda *a: None)
        assert caught.value.key == 5 and isinstance(caught.value.cause, ValueError)

        with pytest.raises(ShardFailed, match="shard 2 failed after 1 attempt"):  # not retryable
            pool.run_queue(
                [(i, i) for i in range(8)],
                run_item({2: None}),
                on_result=lambda *a: None,
                is_retryable=lambda exc: not isinstance(exc, ValueError),
            )


def test_slot_calls_survive_a_killed_slot_actor(ray_local) -> None:
    with slices(3) as pool:
        expected = [(0, 90), (1, 290), (2, 490)]
        assert pool.call_each("total", lambda slot: (2,)) == expected
        pids = pool.call_each("pid", lambda slot: ())

        os.kill(pids[1], signal.SIGKILL)  # lost between calls
        assert pool.call_each("total", lambda slot: (2,)) == expected  # slot 1 re-created with its slice

        pids = pool.call_each("pid", lambda slot: ())
        threading.Timer(0.5, os.kill, (pids[2], signal.SIGKILL)).start()  # lost during a call
        assert pool.call_each("total", lambda slot: (2, 1.5)) == expected

        assert pool.call(1, "total", 3) == (1, 435)
        assert pool.call_each("total", lambda slot: None if slot == 0 else (1,)) == [(1, 145), (2, 245)]
        assert pool.stats.actors_replaced == 2 and pool.stats.retried == 2
        assert len(set(pool.call_each("pid", lambda slot: ())) & set(pids)) == 2  # slot 2's actor is new


def test_a_spent_replacement_budget_is_a_clear_error(ray_local) -> None:
    with workers(1, max_replacements=1) as pool, pytest.raises(ActorsLost) as caught:
        pool.call(0, "die")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "gave up after replacing 1 lost worker(s), the budget of 1; the last (worker 0)"
    )
    assert "ActorDiedError" in message and "free" in message

    with (
        workers(2, max_replacements=2) as pool,
        pytest.raises(ActorsLost, match="replacing 2 lost") as caught,
    ):
        pool.run_queue(
            [(i, i) for i in range(5)], lambda actor, t, n: actor.die.remote(), on_result=lambda *a: None
        )
    assert caught.value.key in range(5) and pool.stats.actors_replaced == 2


def test_a_constructor_error_is_one_line(ray_local, tmp_path) -> None:
    marker = tmp_path / "corrupt"
    marker.touch()
    pool = ActorPool.of(
        Slice, 2, lambda slot: (slot, str(marker) if slot == 1 else None), num_cpus=0.1, what="slice actor"
    )
    with pytest.raises(ActorInitError) as caught, pool:
        pass
    assert (
        str(caught.value) == "slice actor could not start: slice 1: vectors file /data/slice-1.npy is corrupt"
    )
    assert_all_gone(pool.actors, [])

    marker.unlink()  # a replacement's constructor fails: the same error, not a lost actor
    with slices(2, str(marker)) as pool:
        pid = pool.call(0, "pid")
        marker.touch()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(
            ActorInitError, match=r"^slice actor could not start: slice 0: vectors file .*corrupt$"
        ):
            pool.call_each("total", lambda slot: (1,))


def test_actors_are_gone_after_the_with_block(ray_local) -> None:
    with workers(2) as pool:
        os.kill(pool.call(0, "pid"), signal.SIGKILL)
        pids = pool.call_each("pid", lambda slot: ())  # slot 0 replaced
        handles = list(pool.actors)
    assert pool.stats.actors_replaced == 1
    assert_all_gone(handles, pids)

    with pytest.raises(RuntimeError, match="boom"), workers(2) as pool:
        pids = pool.call_each("pid", lambda slot: ())
        raise RuntimeError("boom")
    assert_all_gone(pool.actors, pids)


def test_an_unplaceable_actor_is_a_clear_error(ray_local, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDPIPE_ACTOR_START_TIMEOUT_S", "2")
    started = time.monotonic()
    with (
        pytest.raises(ActorStartTimeout) as caught,
        ActorPool.of(Worker, 1, lambda slot: (slot,), num_cpus=10_000),
    ):
        pass
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert "1 of 1 Worker(s) did not start within 2s" in message
    assert "each asks for 10000 CPU and 0 GPU" in message and "free" in message

    # A lost slot actor whose replacement cannot be placed: no other actor holds its slice.
    normal = ray.remote(Worker).options(num_cpus=0.1, max_restarts=0)
    huge = ray.remote(Worker).options(num_cpus=10_000, max_restarts=0)
    made: list[int] = []

    def make(slot: int):
        made.append(slot)
        return (normal if len(made) == 1 else huge).remote(slot)

    with ActorPool(make, 1, what="index actor", num_cpus=10_000) as pool:
        os.kill(pool.call(0, "pid"), signal.SIGKILL)
        with pytest.raises(
            ActorStartTimeout, match="replacement for lost index actor 0 did not start within 2s"
        ):
            pool.call(0, "pid")
    assert made == [0, 0]
