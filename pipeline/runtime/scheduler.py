"""A shard queue over a pool of actors: look-ahead, retries, requeue on actor death.

The driver hands each actor one shard plus the next one it will get (so the actor can start reading
it), retries a failing shard up to ``max_attempts`` times, and gives a dead actor's shard to another
actor (a new actor replaces the dead one). A shard that keeps failing stops the job after the shards
in flight have finished, so their work is committed for the next run.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, NodeDiedError, ObjectLostError, RayActorError, RayTaskError

INFRASTRUCTURE_ERRORS = (RayActorError, NodeDiedError, ObjectLostError)
try:  # not in every Ray release
    from ray.exceptions import WorkerCrashedError

    INFRASTRUCTURE_ERRORS = (*INFRASTRUCTURE_ERRORS, WorkerCrashedError)
except ImportError:  # pragma: no cover
    pass


@dataclass
class Ticket:
    key: Hashable
    item: Any
    attempt: int = 1


@dataclass
class QueueStats:
    retried: int = 0
    actors_replaced: int = 0
    errors: list[str] = field(default_factory=list)


class ShardFailed(RuntimeError):
    """A shard failed on every attempt; ``item`` and ``cause`` say which and why."""

    def __init__(self, key: Hashable, item: Any, cause: BaseException, attempts: int) -> None:
        super().__init__(f"shard {key} failed after {attempts} attempt(s): {cause}")
        self.key, self.item, self.cause, self.attempts = key, item, cause, attempts


def task_cause(exc: BaseException) -> BaseException:
    """The exception raised inside the actor, not Ray's wrapper."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


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
) -> QueueStats:
    """Run every item on the actors; returns counts of retries and replaced actors."""
    queue: deque[Ticket] = deque(Ticket(key, item) for key, item in items)
    reserved: dict[int, Ticket] = {}  # actor slot -> the ticket it is prefetching
    in_flight: dict[ray.ObjectRef, tuple[int, Ticket]] = {}
    stats = QueueStats()
    failure: ShardFailed | None = None
    budget = max_replacements if max_replacements is not None else 4 * max(1, len(actors)) + 4

    def dispatch(slot: int) -> None:
        ticket = reserved.pop(slot, None) or (queue.popleft() if queue else None)
        if ticket is None:
            return
        lookahead = None
        if queue:
            reserved[slot] = queue.popleft()
            lookahead = (reserved[slot].key, reserved[slot].item)
        ref = actors[slot].run.remote(work, ticket.key, ticket.item, ticket.attempt, lookahead)
        in_flight[ref] = (slot, ticket)

    def busy() -> set[int]:
        return {slot for slot, _ in in_flight.values()}

    while in_flight or (failure is None and (queue or reserved)):
        if failure is None:
            for slot in range(len(actors)):
                if slot not in busy():
                    dispatch(slot)
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            slot, ticket = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except INFRASTRUCTURE_ERRORS as exc:
                stats.retried += 1
                stats.errors.append(f"shard {ticket.key}: worker lost ({type(exc).__name__})")
                queue.appendleft(ticket)
                if slot in reserved:
                    queue.appendleft(reserved.pop(slot))
                if stats.actors_replaced >= budget:
                    failure = failure or ShardFailed(ticket.key, ticket.item, exc, ticket.attempt)
                    continue
                stats.actors_replaced += 1
                with contextlib.suppress(Exception):
                    ray.kill(actors[slot], no_restart=True)
                actors[slot] = replace_actor()
                continue
            except (RayTaskError, GetTimeoutError) as exc:
                cause = task_cause(exc)
                if ticket.attempt < max_attempts and is_retryable(cause):
                    stats.retried += 1
                    stats.errors.append(f"shard {ticket.key}: attempt {ticket.attempt}: {cause}")
                    queue.append(Ticket(ticket.key, ticket.item, ticket.attempt + 1))
                elif failure is None:
                    failure = ShardFailed(ticket.key, ticket.item, cause, ticket.attempt)
                continue
            on_result(ticket.key, ticket.item, result)
    if failure is not None:
        raise failure
    return stats
