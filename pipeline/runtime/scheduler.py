"""The shard queue's former home: ``run_queue`` over a list of started actors, now a thin wrapper over
``ActorPool.run_queue`` (look-ahead, retries, requeue on actor death, replacements given up when the
cluster cannot place them). New code uses ``pipeline.runtime.pool.ActorPool`` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from pipeline.runtime.pool import (  # noqa: F401  (re-exported for the tasks that import them from here)
    INFRASTRUCTURE_ERRORS,
    ActorPool,
    ActorsLost,
    PoolStats,
    ShardFailed,
    Ticket,
    task_cause,
)

QueueStats = PoolStats


def run_queue(
    actors: list,
    work: Any,
    items: Sequence[tuple[Hashable, Any]],
    *,
    on_result: Callable[[Hashable, Any, dict], None],
    replace_actor: Callable[[], Any],
    max_attempts: int = 3,
    is_retryable: Callable[[BaseException], bool] = lambda exc: True,
    max_replacements: int | None = None,
    start_timeout_s: float | None = None,
) -> QueueStats:
    """Run every item on the (started) actors with ``actor.run(work, key, item, attempt, lookahead)``;
    returns counts of retries and replaced actors. ``actors`` is updated in place with replacements, so
    the caller can kill them all; a spent replacement budget is reported as the item's ``ShardFailed``."""
    from pipeline.runtime.actors import run_shards

    pool = ActorPool(
        lambda slot: replace_actor(),
        len(actors),
        what="actor",
        max_replacements=max_replacements,
        start_timeout_s=start_timeout_s,
        actors=actors,
    )
    try:
        return pool.run_queue(
            items, run_shards(work), on_result=on_result, max_attempts=max_attempts, is_retryable=is_retryable
        )
    except ActorsLost as lost:
        raise ShardFailed(lost.key, lost.item, lost, lost.attempt or 1) from None
