"""Task definitions (what @app.task makes) and Task handles (what calling one returns)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import numbers
import os
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import BrokerUnavailable, Cancelled, DependencyError, ResultNotKept, TaskError, TaskNotFound
from .occurrences import skip_plans
from .records import FINISHED_STATES, ScriptStatus
from .schedules import ScheduleSpec
from .transport import TaskMessage

if TYPE_CHECKING:
    from .app import Client

log = logging.getLogger(__name__)

# What `.state` says for a handle that has not been sent to Redis.
CREATED = "created"
# Plans of a schedule's next occurrence made for a cancel, should the schedule keep changing
# meanwhile; the last try sends none (that schedule is then left with no next occurrence).
CANCEL_PLAN_TRIES = 3


_ID_DIGITS = string.digits + string.ascii_letters


def new_task_id() -> str:
    """83 random bits as 14 letters and digits: unique enough (a collision among ten million
    tasks kept at once has a chance of about 1 in 10^11), and short enough for Redis to keep
    each copy of it (a hash field, a sorted set member) in a 16-byte allocation: from 15
    characters on, 32 (16 bytes more per copy; see bench/README.md, memory). No '-' or '_',
    so an id never reads as a command-line option."""
    n = int.from_bytes(os.urandom(11))
    digits = []
    for _ in range(14):
        n, digit = divmod(n, 62)
        digits.append(_ID_DIGITS[digit])
    return "".join(digits)


@dataclass(frozen=True)
class TaskDefinition:
    """A registered task: the function plus its options. Calling it makes a lazy Task."""

    app: Client
    fn: Callable[..., Any]
    name: str
    queue: str
    retries: int = 0
    time_limit: float | None = None
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    retry_backoff: float = 1.0  # seconds before the first retry; doubles each time
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    schedule: ScheduleSpec | None = None  # @app.periodic: when it runs by itself
    store_result: bool | None = None  # keep what it returns; None: the worker's store_results

    def __call__(self, *args: Any, **kwargs: Any) -> Task:
        return Task(self, args, kwargs)

    def run_locally(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function in this process, bypassing the queue (for tests and scripts)."""
        return self.fn(*args, **kwargs)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self.fn


class Task:
    """A handle to one run of a task.

    Nothing is sent until `.start()`, `.wait()` or `.start_at()` — except a task with parents
    (a Task passed as an argument), which is registered at once as waiting for them.
    """

    def __init__(self, definition: TaskDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.definition = definition
        self.id = new_task_id()
        self._sent = False
        self._parents: dict[str, Task] = {}
        arg_deps: dict[str, str] = {}
        kwarg_deps: dict[str, str] = {}
        plain_args: list[Any] = []
        for index, value in enumerate(args):
            if isinstance(value, Task):
                arg_deps[str(index)] = self._add_parent(value, f"argument {index}")
                value = None
            else:
                _check_argument(value, f"argument {index}", definition.name)
            plain_args.append(value)
        plain_kwargs: dict[str, Any] = {}
        for key, value in kwargs.items():
            if isinstance(value, Task):
                kwarg_deps[key] = self._add_parent(value, f"keyword argument {key!r}")
                value = None
            else:
                _check_argument(value, f"keyword argument {key!r}", definition.name)
            plain_kwargs[key] = value
        self.message = TaskMessage(
            id=self.id,
            name=definition.name,
            args=plain_args,
            kwargs=plain_kwargs,
            arg_deps=arg_deps,
            kwarg_deps=kwarg_deps,
            time_limit=definition.time_limit,
            retries=definition.retries,
        )
        if self._parents:
            self._send()  # a child is registered at once, waiting for its parents

    def _add_parent(self, parent: Task, where: str) -> str:
        if parent.queue != self.queue:
            raise DependencyError(
                f"{where} of task {self.definition.name!r} is a task on queue {parent.queue!r}, "
                f"but {self.definition.name!r} runs on {self.queue!r}: a task and its parents "
                "must share a queue"
            )
        self._parents[parent.id] = parent
        return parent.id

    # --- identity ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def queue(self) -> str:
        return self.definition.queue

    def __repr__(self) -> str:
        return f"<Task {self.name} {self.id} on {self.queue!r}>"

    @property
    def sent(self) -> bool:
        return self._sent

    @property
    def has_parents(self) -> bool:
        return bool(self._parents)

    def mark_sent(self) -> None:
        """Record that the task was sent another way (Client.start_many)."""
        self._sent = True

    # --- sending -------------------------------------------------------------------------------

    def start(self, *, key: str | None = None) -> Task:
        """Send the task to run now (and start any parent that was never started).

        `key` makes the enqueue idempotent: while a task with the same key is pending,
        this returns a handle to that task instead of sending another.
        """
        return self._start(key=key)

    def wait(self, delay: float | dt.timedelta) -> Task:
        """Send the task to run `delay` seconds from now (measured on the Redis clock).

        `delay` is a number of seconds or a timedelta. A string or bool is a TypeError (float("5")
        would pass silently); a negative, NaN or infinite delay is a ValueError: it is most likely
        a mistake, and `.start()` says "now" plainly.
        """
        if isinstance(delay, dt.timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, numbers.Real) and not isinstance(delay, bool):
            seconds = float(delay)
        else:
            raise TypeError(
                f"wait() takes a number of seconds or a datetime.timedelta, not {type(delay).__name__} {delay!r}"
                + (f": pass {float(delay):g}" if isinstance(delay, str) and _is_number(delay) else "")
            )
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"wait() needs a finite delay of 0 seconds or more, not {delay!r}")
        return self._start(delay_ms=int(seconds * 1000))

    def start_at(self, when: dt.datetime) -> Task:
        """Send the task to run at `when`; a naive datetime is taken as this machine's local time."""
        if not isinstance(when, dt.datetime):  # a date has no time of day, and no .timestamp()
            hint = ""
            if isinstance(when, dt.date):
                hint = (
                    f": pass datetime.datetime({when.year}, {when.month}, {when.day}) for its midnight "
                    "(local time), or datetime.datetime.combine(the_date, the_time)"
                )
            elif isinstance(when, str):
                hint = f": pass datetime.datetime.fromisoformat({when!r})"
            raise TypeError(f"start_at() takes a datetime.datetime, not {type(when).__name__} {when!r}{hint}")
        return self._start(at_ms=int(when.timestamp() * 1000))

    def _start(self, *, delay_ms: int | None = None, at_ms: int | None = None, key: str | None = None) -> Task:
        if self._sent:
            if delay_ms is not None or at_ms is not None:
                # A registered child: set when it may run once its parents are done.
                self.definition.app.broker.enqueue(
                    self.queue, self.id, b"", delay_ms=delay_ms, at_ms=at_ms, reschedule=True
                )
        else:
            reply = self._send(delay_ms=delay_ms, at_ms=at_ms, key=key)
            if reply is not None:
                return reply
        for parent in self._parents.values():
            parent._start_if_unsent()
        return self

    def _start_if_unsent(self) -> None:
        if not self._sent:
            self._send()
        for parent in self._parents.values():
            parent._start_if_unsent()

    def _send(self, delay_ms: int | None = None, at_ms: int | None = None, key: str | None = None) -> Task | None:
        app = self.definition.app
        payload = app.broker.transport.dumps_message(self.message)
        reply = app.broker.enqueue(
            self.queue,
            self.id,
            payload,
            delay_ms=delay_ms,
            at_ms=at_ms,
            parents=list(self._parents),
            dedup_key=key,
        )
        self._sent = True
        if reply.status == "duplicate":
            return app.handle(reply.detail, queue=self.queue, name=self.name)
        return None

    # --- observing -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """created (not sent), waiting, scheduled, ready, running, succeeded, failed, cancelled or unknown."""
        if not self._sent:
            return CREATED
        state, _ = self.definition.app.broker.outcome(self.queue, self.id)
        return state or "unknown"

    def cancel(self, *, cascade: bool = False, by: str = "api") -> bool:
        """Cancel the task if it has not finished; True if this stopped it.

        A waiting, scheduled or ready task never runs; a running one is interrupted within
        about a second (Cancelled is raised inside it). Its state becomes "cancelled" and
        `.result()` raises Cancelled; its children receive Cancelled as that argument, or, with
        `cascade=True`, are cancelled too, and theirs. A finished task is left as it is
        (False), except a dead letter, which is cancelled out of the dead letters. The cancel
        is kept in Redis: it holds even if no worker runs now. `by` is recorded as who did it.
        """
        return self.cancel_each(cascade=cascade, by=by).get(self.id) is ScriptStatus.CANCELLED

    def cancel_each(self, *, cascade: bool = False, by: str = "api") -> dict[str, ScriptStatus]:
        """`cancel()`, saying what became of the task and (with cascade) each descendant, in
        the order cancelled: CANCELLED for the ones this stopped, FINISHED for those already done."""
        if not self._sent:
            return {}  # never sent: nothing in Redis to cancel
        broker = self.definition.app.broker
        ids = [self.id, *(broker.descendants(self.queue, self.id) if cascade else [])]
        envelope = broker.transport.dumps_error(Cancelled(f"task cancelled (by {by})"))
        for attempt in range(CANCEL_PLAN_TRIES):
            # A schedule's occurrence: plan its next one, so cancelling skips this run only.
            plans = skip_plans(broker, self.queue, ids) if attempt < CANCEL_PLAN_TRIES - 1 else []
            statuses = broker.cancel(self.queue, ids, envelope, by, plans)
            if statuses[0] is not ScriptStatus.CHANGED:
                break
        return dict(zip(ids, statuses, strict=True))

    def result(self, timeout: float | None = None) -> Any:
        """Block until the task finishes; return its value or raise its error.

        Waits on Redis (no polling). Raises TimeoutError when `timeout` seconds pass first. A
        lost Redis connection is retried with backoff within the timeout (BrokerUnavailable
        once it has run out). A task that kept no result (store_result=False) raises
        ResultNotKept once it succeeded (its errors are kept: they are raised as usual)."""
        if not self._sent:
            raise TaskError(f"{self!r} was never started: call .start(), .wait() or .start_at()")
        broker = self.definition.app.broker
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = _RECONNECT_FIRST
        while True:
            try:
                state, envelope = broker.watch(self.queue, self.id)
            except BrokerUnavailable as exc:
                backoff = self._wait_for_redis(exc, deadline, backoff)
                continue
            if state in FINISHED_STATES and envelope is not None:
                ok, value = broker.transport.loads_outcome(envelope)
                if ok:
                    return value
                raise value
            if state == "succeeded":  # finished, and nothing stored: fire-and-forget
                raise ResultNotKept(
                    f"{self!r} succeeded, but its result was not kept (store_result=False, or the worker's "
                    "store_results = false)"
                )
            if state is None:
                raise TaskNotFound(
                    f"task {self.id} is not stored on queue {self.queue!r} (never sent there, or its result "
                    "expired; a task of another queue: app.handle(id, queue=...))"
                )
            remaining = broker.max_block if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self!r} did not finish within {timeout} s (state: {state})")
            try:
                broker.wait_done(self.queue, self.id, remaining)
                backoff = _RECONNECT_FIRST  # a whole round went through: Redis is back
            except BrokerUnavailable as exc:
                backoff = self._wait_for_redis(exc, deadline, backoff)

    def _wait_for_redis(self, exc: BrokerUnavailable, deadline: float | None, backoff: float) -> float:
        """Redis went away while .result() waited: wait for it to come back (a restart, a
        failover), within the caller's timeout; re-raise once that has run out. Returns the
        next backoff."""
        left = math.inf if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise exc
        log.warning("waiting for the result of %r: %s (retrying in %.1f s)", self, exc, min(backoff, left))
        time.sleep(min(backoff, left))
        return min(backoff * 2, _RECONNECT_MAX)


# .result() retries a lost Redis connection after this long, doubling up to the max (seconds).
_RECONNECT_FIRST = 0.1
_RECONNECT_MAX = 5.0


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_argument(value: Any, where: str, task_name: str) -> None:
    """Refuse, at the call, what would only fail later as a puzzling JSON error when sent."""
    if isinstance(value, TaskDefinition):
        call = f"{value.fn.__name__}()"
        raise TypeError(
            f"{where} of task {task_name!r} is the task function {value.name!r} itself, which is not JSON: "
            f"pass {call} — call the task — to make it a parent whose result goes in its place"
        )
    _reject_nested(value, where, task_name)


def _reject_nested(value: Any, where: str, task_name: str) -> None:
    """A Task inside a container cannot be a dependency: say so instead of failing later."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Task):
            raise DependencyError(
                f"{where} of task {task_name!r} contains a Task inside a container; only a Task "
                "passed directly as an argument becomes a dependency"
            )
        if isinstance(item, TaskDefinition):
            raise TypeError(
                f"{where} of task {task_name!r} contains the task function {item.name!r}, which is not JSON; "
                "only a Task passed directly as an argument becomes a dependency"
            )
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)


def attach(app: Client, task_id: str, queue: str, name: str = "?") -> Task:
    """A handle to a task already in Redis (known by id), for .result() and .state."""
    definition = app.tasks.get(name) or TaskDefinition(app, _never_called, name, queue)
    if definition.queue != queue:  # (found on another queue than its task's: e.g. moved since)
        definition = dataclasses.replace(definition, queue=queue)
    handle = Task.__new__(Task)
    handle.definition = definition
    handle.id = task_id
    handle._sent = True
    handle._parents = {}
    handle.message = TaskMessage(id=task_id, name=name)
    return handle


def _never_called(*args: Any, **kwargs: Any) -> Any:
    raise TaskError("this handle was attached by id; its function is not known here")
