"""A shard queue over a pool of actors: look-ahead, retries, requeue on actor death.

The driver hands each actor one shard plus the next one it will get (so the actor can start reading
it), retries a failing shard up to ``max_attempts`` times, and gives a dead actor's shard to another
actor (a new actor replaces the dead one). A replacement the cluster cannot place within the start
timeout is given up, and its shards go to the actors that are left; with none left the job stops. A
shard that keeps failing stops the job after the shards in flight have finished, so their work is
committed for the next run.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, NodeDiedError, ObjectLostError, RayActorError, RayTaskError

from pipeline.runtime.actors import ActorStartTimeout
from pipeline.runtime.actors import start_timeout_s as actor_start_timeout
from pipeline.runtime.cluster import describe_resources

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
    start_timeout_s: float | None = None,
) -> QueueStats:
    """Run every item on the actors; returns counts of retries and replaced actors."""
    start_timeout = actor_start_timeout() if start_timeout_s is None else start_timeout_s
    queue: deque[Ticket] = deque(Ticket(key, item) for key, item in items)
    reserved: dict[int, Ticket] = {}  # actor slot -> the ticket it is prefetching
    in_flight: dict[ray.ObjectRef, tuple[int, Ticket]] = {}
    stats = QueueStats()
    failure: ShardFailed | None = None
    budget = max_replacements if max_replacements is not None else 4 * max(1, len(actors)) + 4
    starting: dict[ray.ObjectRef, tuple[int, float]] = {}  # replacement's ready ref -> (slot, deadline)
    given_up: set[int] = set()  # slots whose replacement never started: no more work for them

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
                if slot not in busy() and slot not in given_up:
                    dispatch(slot)
        if not in_flight:
            break
        timeout = max(0.0, min(d for _, d in starting.values()) - time.monotonic()) if starting else None
        ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=timeout, fetch_local=False)
        if not ready:  # a replacement was not placed in time: its shards go to the other actors
            for ref, (slot, deadline) in list(starting.items()):
                if deadline <= time.monotonic():
                    del starting[ref]
                    given_up.add(slot)
                    with contextlib.suppress(Exception):
                        ray.kill(actors[slot], no_restart=True)
            if len(given_up) == len(actors):
                raise ActorStartTimeout(
                    f"no actor is left: replacements for the lost ones did not start within {start_timeout:g}s "
                    f"(the cluster has {describe_resources()}); a re-run resumes from the committed shards"
                )
            continue
        for ref in ready:
            if ref in starting:  # a replacement is up
                del starting[ref]
                continue
            slot, ticket = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except INFRASTRUCTURE_ERRORS as exc:
                stats.retried += 1
                stats.errors.append(f"shard {ticket.key}: worker lost ({type(exc).__name__})")
                queue.appendleft(ticket)
                if slot in reserved:
                    queue.appendleft(reserved.pop(slot))
                if slot in given_up:  # its actor was killed for not starting in time
                    continue
                if stats.actors_replaced >= budget:
                    failure = failure or ShardFailed(ticket.key, ticket.item, exc, ticket.attempt)
                    continue
                stats.actors_replaced += 1
                with contextlib.suppress(Exception):
                    ray.kill(actors[slot], no_restart=True)
                actors[slot] = replace_actor()
                starting[actors[slot].__ray_ready__.remote()] = (slot, time.monotonic() + start_timeout)
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
