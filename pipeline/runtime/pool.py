"""One actor pool for every job: place actors, hand out work, replace lost actors, always release them.

``ActorPool`` starts ``size`` actors from a factory ``make(slot)``, so a slot-stateful actor (an index
actor holding slice ``slot`` of the vectors) is re-created with the same arguments when it is lost. It
waits at most the start timeout (``EMBEDPIPE_ACTOR_START_TIMEOUT_S``) for them, and reports a
constructor's error in one line. Work is handed out in two ways:

- ``run_queue``: a queue of items that any actor may take. Each actor is told the next item it will get
  (so it can prefetch), a failing item is retried up to ``max_attempts`` times, an item whose actor died
  is requeued without spending an attempt, and a replacement actor that the cluster cannot place in time
  is given up, its items going to the actors that are left.
- ``call_each`` / ``call``: one call per slot, for slot-stateful actors. A lost actor is re-created by
  ``make(slot)`` and the call re-issued on it.

Lost actors draw on a replacement budget (4 x size + 4 by default); when it is spent the pool gives up
with ``ActorsLost``. The pool is a context manager and kills every actor it started on exit, error or
not. ``pool.stats`` counts what happened, for reports.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, NodeDiedError, ObjectLostError, RayActorError, RayTaskError

from pipeline.runtime.cluster import describe_resources

DEFAULT_START_TIMEOUT_S = 600.0

INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (RayActorError, NodeDiedError, ObjectLostError)
try:  # not in every Ray release
    from ray.exceptions import WorkerCrashedError

    INFRASTRUCTURE_ERRORS = (*INFRASTRUCTURE_ERRORS, WorkerCrashedError)
except ImportError:  # pragma: no cover
    pass


# -- errors ------------------------------------------------------------------------------------------


class ActorStartTimeout(RuntimeError):
    """Actors that the cluster could not place (or construct) in time."""


class ActorInitError(RuntimeError):
    """An actor's constructor raised: the model or the data it loads is bad (not a lost worker)."""


class ActorsLost(RuntimeError):
    """Actors kept being lost and the replacement budget is spent. In a queue, ``key`` and ``item`` are
    the item that was in the hands of the last lost actor, on its ``attempt``."""

    def __init__(
        self, message: str, key: Hashable = None, item: Any = None, attempt: int | None = None
    ) -> None:
        super().__init__(message)
        self.key, self.item, self.attempt = key, item, attempt


class ShardFailed(RuntimeError):
    """A queue item failed on every attempt; ``item`` and ``cause`` say which and why."""

    def __init__(self, key: Hashable, item: Any, cause: BaseException, attempts: int) -> None:
        super().__init__(f"shard {key} failed after {attempts} attempt(s): {cause}")
        self.key, self.item, self.cause, self.attempts = key, item, cause, attempts


def init_error(exc: Exception) -> str:
    """The message of the exception an actor's constructor raised (Ray wraps it in its traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else str(exc)
    name, sep, message = last.partition(": ")
    return message if sep and name.replace(".", "").replace("_", "").isalnum() else last


def task_cause(exc: BaseException) -> BaseException:
    """The exception raised inside the actor, not Ray's wrapper."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


def loss_reason(exc: BaseException) -> str:
    """One line about why an actor was lost: the error's type and the first line of its message."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def is_init_failure(exc: BaseException) -> bool:
    return isinstance(exc, RayActorError) and bool(getattr(exc, "actor_init_failed", False))


# -- starting actors ----------------------------------------------------------------------------------


def start_timeout_s() -> float:
    """How long an actor may take to be placed and load its model (``EMBEDPIPE_ACTOR_START_TIMEOUT_S``):
    long enough for an autoscaler to add a node, short enough that a job never hangs for good."""
    return float(os.environ.get("EMBEDPIPE_ACTOR_START_TIMEOUT_S", DEFAULT_START_TIMEOUT_S))


def kill_quietly(actor: Any) -> None:
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)


def wait_started(
    actors: Sequence, what: str, num_cpus: float, num_gpus: float, timeout: float | None = None
) -> None:
    """Return once every actor is constructed; raise ActorInitError with the cause if a constructor
    failed, ActorStartTimeout naming what they ask for if the cluster cannot place them. Either way the
    actors are stopped, so they hold no CPU or GPU after the error."""
    refs = [actor.__ray_ready__.remote() for actor in actors]
    timeout = start_timeout_s() if timeout is None else timeout
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=False)
    try:
        ray.get(ready)
    except RayActorError as exc:
        for actor in actors:
            kill_quietly(actor)
        if is_init_failure(exc):
            raise ActorInitError(f"{what} could not start: {init_error(exc)}") from None
        raise
    if pending:
        for actor in actors:
            kill_quietly(actor)
        raise ActorStartTimeout(
            f"{len(pending)} of {len(actors)} {what}(s) did not start within {timeout:g}s: each asks for "
            f"{num_cpus:g} CPU and {num_gpus:g} GPU and the cluster has {describe_resources()}; use fewer "
            "--workers, add nodes, or raise EMBEDPIPE_ACTOR_START_TIMEOUT_S"
        )


# -- the pool -----------------------------------------------------------------------------------------


@dataclass
class Ticket:
    """A queue item: its key, the item, and which attempt this is (1 = first)."""

    key: Hashable
    item: Any
    attempt: int = 1


@dataclass
class PoolStats:
    actors_replaced: int = 0  # lost actors re-created (also counts a replacement that was then given up)
    retried: int = 0  # queue items run again (after an error or a lost actor), per-slot calls re-issued
    errors: list[str] = field(default_factory=list)  # one line per retry or loss, for reports

    def as_dict(self) -> dict:
        return asdict(self)


Submit = Callable[[Any, Ticket, "Ticket | None"], Any]


class ActorPool:
    """``size`` actors made by ``make(slot)`` (not waited for: the pool waits). Use as a context manager.

    ``num_cpus`` / ``num_gpus`` are what each actor asks Ray for; they only go into error messages
    (``ActorPool.of`` sets both the actor options and these). ``what`` names the actors in messages
    ("encoder actor"). ``max_replacements`` bounds how many lost actors are re-created over the pool's
    life (default 4 x size + 4). ``start_timeout_s`` bounds the start of every actor, replacements
    included (default ``EMBEDPIPE_ACTOR_START_TIMEOUT_S``, read when needed). ``actors`` adopts handles
    that are already started (the list itself is kept and updated in place when actors are replaced).
    """

    def __init__(
        self,
        make: Callable[[int], Any],
        size: int,
        *,
        what: str = "actor",
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_replacements: int | None = None,
        start_timeout_s: float | None = None,
        actors: list | None = None,
    ) -> None:
        if actors is not None and len(actors) != size:
            raise ValueError(f"{len(actors)} actors given for a pool of {size}")
        self.make, self.size, self.what = make, size, what
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.max_replacements = 4 * max(1, size) + 4 if max_replacements is None else max_replacements
        self._start_timeout_s = start_timeout_s
        self.actors: list = actors if actors is not None else []
        self.started = actors is not None
        self.stats = PoolStats()
        self._retired: list = []  # replaced handles, killed already; killed again on close to be sure
        self._starting: dict[
            ray.ObjectRef, tuple[int, float]
        ] = {}  # replacement's ready ref -> (slot, deadline)
        self._given_up: set[int] = set()  # queue slots whose replacement never started

    @classmethod
    def of(
        cls,
        actor_class: type,
        size: int,
        args_for_slot: Callable[[int], tuple] = lambda slot: (),
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        what: str | None = None,
        **kwargs: Any,
    ) -> ActorPool:
        """A pool of ``actor_class(*args_for_slot(slot))`` actors asking for ``num_cpus`` / ``num_gpus``
        each, never restarted by Ray (the pool replaces them); ``kwargs`` go to ``ActorPool``."""
        remote = ray.remote(actor_class).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
        return cls(
            lambda slot: remote.remote(*args_for_slot(slot)),
            size,
            what=what or actor_class.__name__,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            **kwargs,
        )

    # -- life cycle

    @property
    def start_timeout(self) -> float:
        return start_timeout_s() if self._start_timeout_s is None else self._start_timeout_s

    def start(self) -> ActorPool:
        """Make every actor and wait until all are constructed (ActorInitError / ActorStartTimeout
        otherwise, with every actor stopped)."""
        if self.started:
            return self
        try:
            for slot in range(self.size):
                self.actors.append(self.make(slot))
            wait_started(self.actors, self.what, self.num_cpus, self.num_gpus, timeout=self.start_timeout)
        except BaseException:
            self.close()
            raise
        self.started = True
        return self

    def close(self) -> None:
        """Kill every actor the pool holds or held (idempotent)."""
        for actor in [*self.actors, *self._retired]:
            kill_quietly(actor)
        self._retired.clear()
        self._starting.clear()

    def __enter__(self) -> ActorPool:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- losses and replacements

    def _replace(self, slot: int, exc: BaseException, ticket: Ticket | None = None) -> None:
        """Kill slot's actor and make a new one (watched until it starts); ActorsLost past the budget."""
        if self.stats.actors_replaced >= self.max_replacements:
            raise ActorsLost(
                f"gave up after replacing {self.stats.actors_replaced} lost {self.what}(s), the budget of "
                f"{self.max_replacements}; the last ({self.what} {slot}) was lost with {loss_reason(exc)}; "
                f"the cluster has {describe_resources()}",
                *((ticket.key, ticket.item, ticket.attempt) if ticket else ()),
            )
        self.stats.actors_replaced += 1
        old = self.actors[slot]
        kill_quietly(old)
        self._retired.append(old)
        self._given_up.discard(slot)
        self.actors[slot] = self.make(slot)
        deadline = time.monotonic() + self.start_timeout
        self._starting[self.actors[slot].__ray_ready__.remote()] = (slot, deadline)

    def _wait(self, refs: Iterable[ray.ObjectRef]) -> tuple[list, list[int]]:
        """Wait for one of ``refs`` or for a starting replacement's deadline. Returns (ready refs among
        ``refs``, slots whose replacement did not start in time); both may be empty (one started)."""
        refs = list(refs)
        timeout = None
        if self._starting:
            timeout = max(0.0, min(deadline for _, deadline in self._starting.values()) - time.monotonic())
        ready, _ = ray.wait([*refs, *self._starting], num_returns=1, timeout=timeout, fetch_local=False)
        for ref in ready:
            # Up (or its constructor failed: the call issued on it says so).
            self._starting.pop(ref, None)
        expired = []
        now = time.monotonic()
        for ref, (slot, deadline) in list(self._starting.items()):
            if deadline <= now:
                del self._starting[ref]
                expired.append(slot)
        wanted = set(refs)
        return [ref for ref in ready if ref in wanted], expired

    def _init_error(self, exc: BaseException) -> ActorInitError:
        return ActorInitError(f"{self.what} could not start: {init_error(exc)}")

    # -- per-slot calls

    def call_each(self, method: str, args_for_slot: Callable[[int], tuple | None]) -> list:
        """Call ``method`` on every slot's actor with ``args_for_slot(slot)`` (None skips that slot) and
        return the results of the called slots, in slot order. A lost actor is re-created by
        ``make(slot)`` and its call re-issued; an error raised by the method itself is raised here."""
        if not self.started:
            self.start()
        args = {slot: args_for_slot(slot) for slot in range(self.size)}
        args = {slot: a for slot, a in args.items() if a is not None}
        pending = {getattr(self.actors[slot], method).remote(*a): slot for slot, a in args.items()}
        results: dict[int, Any] = {}
        while pending:
            ready, expired = self._wait(pending)
            if expired:
                raise ActorStartTimeout(
                    f"the replacement for lost {self.what} {expired[0]} did not start within "
                    f"{self.start_timeout:g}s: it asks for {self.num_cpus:g} CPU and {self.num_gpus:g} GPU and "
                    f"the cluster has {describe_resources()}; add nodes, or raise EMBEDPIPE_ACTOR_START_TIMEOUT_S"
                )
            for ref in ready:
                slot = pending.pop(ref)
                try:
                    results[slot] = ray.get(ref)
                except INFRASTRUCTURE_ERRORS as exc:
                    if is_init_failure(exc):
                        raise self._init_error(exc) from None
                    self._replace(slot, exc)
                    self.stats.retried += 1
                    self.stats.errors.append(
                        f"{self.what} {slot}: lost ({type(exc).__name__}) during {method}; re-created, call re-issued"
                    )
                    pending[getattr(self.actors[slot], method).remote(*args[slot])] = slot
        return [results[slot] for slot in sorted(results)]

    def call(self, slot: int, method: str, *args: Any) -> Any:
        """``method(*args)`` on one slot's actor, re-issued on a re-created actor if it is lost."""
        if not 0 <= slot < self.size:
            raise IndexError(f"slot {slot} is not in a pool of {self.size}")
        (result,) = self.call_each(method, lambda s: args if s == slot else None)
        return result

    # -- the queue

    def run_queue(
        self,
        items: Iterable[tuple[Hashable, Any]],
        submit: Submit,
        *,
        on_result: Callable[[Hashable, Any, Any], None],
        max_attempts: int = 3,
        is_retryable: Callable[[BaseException], bool] = lambda exc: True,
        lookahead: bool = True,
    ) -> PoolStats:
        """Run every ``(key, item)`` on whichever actor is free; ``on_result(key, item, result)`` is
        called once per item, on this thread, as results arrive.

        ``submit(actor, ticket, next_ticket)`` issues the call and returns its ObjectRef;
        ``next_ticket`` is the item that actor will get next (None at the end of the queue, or always
        with ``lookahead=False``), so it can start loading it. ``submit`` may instead return several refs
        (a call with ``num_returns=n``): then only the first is fetched (keep it small, e.g. a count)
        and ``result`` is ``(first value, *other refs)``, so large results stay in the object store.

        An item whose call raised is retried, at the back of the queue, up to ``max_attempts`` times if
        ``is_retryable(the exception raised in the actor)``; otherwise ``ShardFailed``. An item whose
        actor was lost goes back to the front without spending an attempt, and a replacement actor is
        started; one that is not placed within the start timeout is given up and its items go to the
        other actors (``ActorStartTimeout`` when none is left). On ``ShardFailed``, ``ActorsLost`` or
        ``ActorInitError`` no new item is handed out, the calls in flight are finished (their results
        delivered), then the error is raised. Returns ``self.stats``.
        """
        if not self.started:
            self.start()
        queue: deque[Ticket] = deque(Ticket(key, item) for key, item in items)
        reserved: dict[int, Ticket] = {}  # slot -> the ticket its actor is prefetching
        in_flight: dict[ray.ObjectRef, tuple[int, Ticket, tuple]] = {}  # ref -> (slot, ticket, other refs)
        failure: BaseException | None = None
        self._given_up.clear()  # a new queue tries every slot again (a dead one is replaced on first use)

        def dispatch(slot: int) -> None:
            ticket = reserved.pop(slot, None) or (queue.popleft() if queue else None)
            if ticket is None:
                return
            following = None
            if lookahead and queue:
                following = reserved[slot] = queue.popleft()
            refs = submit(self.actors[slot], ticket, following)
            if isinstance(refs, ray.ObjectRef):
                in_flight[refs] = (slot, ticket, ())
            else:
                first, *rest = refs
                in_flight[first] = (slot, ticket, tuple(rest))

        while in_flight or (failure is None and (queue or reserved)):
            if failure is None:
                busy = {slot for slot, _, _ in in_flight.values()}
                for slot in range(self.size):
                    if slot not in busy and slot not in self._given_up:
                        dispatch(slot)
            if not in_flight:
                break
            ready, expired = self._wait(in_flight)
            for slot in expired:  # its calls fail as lost; its items go to the actors that are left
                self._given_up.add(slot)
                kill_quietly(self.actors[slot])
            if len(self._given_up) == self.size:
                raise ActorStartTimeout(
                    f"no {self.what} is left: replacements for the lost ones did not start within "
                    f"{self.start_timeout:g}s (the cluster has {describe_resources()}); a re-run resumes "
                    "from the committed work"
                )
            for ref in ready:
                slot, ticket, rest = in_flight.pop(ref)
                try:
                    value = ray.get(ref)
                except INFRASTRUCTURE_ERRORS as exc:
                    self.stats.retried += 1
                    self.stats.errors.append(f"shard {ticket.key}: worker lost ({type(exc).__name__})")
                    queue.appendleft(ticket)
                    if slot in reserved:
                        queue.appendleft(reserved.pop(slot))
                    if is_init_failure(exc):
                        failure = failure or self._init_error(exc)
                    elif slot not in self._given_up and failure is None:
                        try:
                            self._replace(slot, exc, ticket)
                        except ActorsLost as lost:
                            failure = lost
                    continue
                except (RayTaskError, GetTimeoutError) as exc:
                    cause = task_cause(exc)
                    if ticket.attempt < max_attempts and is_retryable(cause):
                        self.stats.retried += 1
                        self.stats.errors.append(f"shard {ticket.key}: attempt {ticket.attempt}: {cause}")
                        queue.append(Ticket(ticket.key, ticket.item, ticket.attempt + 1))
                    elif failure is None:
                        failure = ShardFailed(ticket.key, ticket.item, cause, ticket.attempt)
                    continue
                on_result(ticket.key, ticket.item, (value, *rest) if rest else value)
        if failure is not None:
            raise failure
        return self.stats
