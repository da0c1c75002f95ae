"""Running one claimed task: decode it, find the function, fill in parents' results, call it.

Every way a task can go wrong ends in an Outcome with an error envelope; nothing here lets an
exception escape to the worker loop except HandBack (the worker must stop now).
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import (
    BadArguments,
    Cancelled,
    Retry,
    SerializationError,
    TaskAborted,
    TaskError,
    TaskTimeout,
    TimeLimitExceeded,
    UnknownTask,
    WorkerLost,
)
from .event_loop import TaskEventLoop
from .interrupts import HandBack, TaskAlarm
from .records import Claim, Outcome, RetryPlan
from .task import TaskDefinition
from .transport import TaskMessage

# Failures that running again cannot fix: the payload, the name, the arguments or the result
# itself is wrong, or the task already killed its workers too often.
NEVER_RETRIED = (SerializationError, UnknownTask, BadArguments, WorkerLost, Cancelled)

if TYPE_CHECKING:
    from .app import Client

log = logging.getLogger(__name__)


class TaskRunner:
    def __init__(self, app: Client, alarm: TaskAlarm, default_time_limit: float | None, max_lost_leases: int):
        self.app = app
        self.transport = app.broker.transport
        self.alarm = alarm
        self.default_time_limit = default_time_limit
        self.max_lost_leases = max_lost_leases
        self._peeked: tuple[str, TaskMessage] | None = None  # (lease token, its decoded payload)
        self.event_loop = TaskEventLoop()  # for async def tasks; made on first use

    def peek(self, claim: Claim) -> TaskMessage:
        """Decode a claim's payload ahead of its run (the worker wants the next task's name);
        run() then uses it instead of decoding again. Raises SerializationError."""
        message = self.transport.loads_message(claim.payload)
        self._peeked = (claim.token, message)
        return message

    def run(self, claim: Claim, on_start: Callable[[float | None], None] | None = None) -> Outcome:
        """Run the claimed task; `on_start` hears the time limit just before the function runs."""
        started = time.monotonic()
        try:
            return self._run(claim, on_start, started)
        except TimeLimitExceeded:
            # A repeated interruption that fired inside alarm.task_ended(), before it disarmed
            # the timer: the task timed out all the same.
            return self._failure(self.name_of(claim), self._timeout(None), started)
        finally:
            # Idempotent; disarms the timer that such an interruption re-armed (it would raise
            # into worker code a second later). Most tasks' timer is disarmed already: no syscall.
            self.alarm.task_ended()

    def _run(self, claim: Claim, on_start: Callable[[float | None], None] | None, started: float) -> Outcome:
        name = "?"
        message: TaskMessage | None = None
        definition: TaskDefinition | None = None
        try:
            peeked, self._peeked = self._peeked, None
            if peeked is not None and peeked[0] == claim.token:
                message = peeked[1]
            else:
                message = self.transport.loads_message(claim.payload)
            name = message.name
            if message.id != claim.id:
                raise SerializationError(f"payload id {message.id!r} does not match its key {claim.id!r}")
            definition = self.app.tasks.get(message.name)
            if definition is None:
                raise UnknownTask(f"no task named {message.name!r} is registered in this worker")
            if claim.leases_lost > self.max_lost_leases:
                raise WorkerLost(
                    f"task's worker died or hung {claim.leases_lost} times (limit {self.max_lost_leases}); "
                    "dead-lettered instead of run again"
                )
            args, kwargs = self._arguments(message, claim)
            check_arguments(definition, args, kwargs)
            time_limit = message.time_limit or definition.time_limit or self.default_time_limit
            if on_start is not None:
                on_start(time_limit)
            value = self._call(definition.fn, args, kwargs, time_limit, claim.token)
            envelope = self.transport.dumps_value(value)
            return Outcome(name, True, envelope, time.monotonic() - started)
        except Exception as exc:
            return self._failure(name, exc, started, self._retry_plan(definition, message, exc))

    def _call(
        self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], time_limit: float | None, token: str
    ) -> Any:
        """Call the task function under its time limit; an async one runs on this worker's event loop.

        Whatever the task raises comes out as an Exception: a time limit it swallowed or not as
        TaskTimeout, SystemExit / KeyboardInterrupt / other BaseExceptions as TaskAborted (a task
        must not stop its worker). Only HandBack, the worker's own stop, passes through."""
        error: BaseException | None = None
        self.alarm.task_started(time_limit, token)
        try:
            value = fn(*args, **kwargs)
            if inspect.iscoroutine(value):  # an async def task (or a function that returns one)
                value = self.event_loop.run(value, self.alarm)
        except HandBack:
            raise
        except BaseException as exc:
            error = exc
        finally:
            self.alarm.task_ended()
        if self.alarm.handing_back:
            raise HandBack()  # the task swallowed it and ended: hand it back all the same
        if self.alarm.cancelled:
            raise Cancelled("task cancelled while it ran") from error
        if self.alarm.timed_out:
            raise self._timeout(time_limit) from error
        if error is None:
            return value
        if isinstance(error, Exception):
            raise error
        raise TaskAborted(f"task raised {type(error).__name__}{_args_of(error)}; the worker kept running") from error

    @staticmethod
    def _timeout(time_limit: float | None) -> TaskTimeout:
        limit = "" if time_limit is None else f" of {time_limit:g} s"
        return TaskTimeout(f"task ran past its time limit{limit}")

    def name_of(self, claim: Claim) -> str:
        """The task name in a claim's payload ('?' for one that cannot be read)."""
        try:
            return self.transport.loads_message(claim.payload).name
        except SerializationError:
            return "?"

    def _arguments(self, message: TaskMessage, claim: Claim) -> tuple[list[Any], dict[str, Any]]:
        """Put each parent's result (or its exception) where the parent handle was passed."""
        args = list(message.args)
        kwargs = dict(message.kwargs)
        for position, parent_id in message.arg_deps.items():
            index = int(position)
            if not 0 <= index < len(args):
                raise SerializationError(f"dependency position {position} is outside the arguments")
            args[index] = self._parent_value(claim, parent_id)
        for key, parent_id in message.kwarg_deps.items():
            kwargs[key] = self._parent_value(claim, parent_id)
        return args, kwargs

    def _parent_value(self, claim: Claim, parent_id: str) -> Any:
        envelope = claim.inputs.get(parent_id)
        if envelope is None:
            raise TaskError(f"the result of parent task {parent_id} is missing")
        _ok, value = self.transport.loads_outcome(envelope)
        return value  # a failed parent's exception is passed as the argument

    @staticmethod
    def _retry_plan(definition: TaskDefinition | None, message: TaskMessage | None, exc: Exception) -> RetryPlan | None:
        if definition is None or message is None or message.retries <= 0 or isinstance(exc, NEVER_RETRIED):
            return None
        # A TaskAborted is retried only if the user asked for what it wraps (e.g. SystemExit).
        cause = exc.__cause__ if isinstance(exc, TaskAborted) else exc
        if not isinstance(exc, Retry) and not isinstance(cause, definition.retry_on):
            return None
        return RetryPlan(
            max_retries=message.retries,
            base_ms=int(definition.retry_backoff * 1000),
            cap_ms=int(definition.retry_backoff_max * 1000),
            jitter=random.uniform(0.5, 1.0) if definition.retry_jitter else 1.0,
            fixed_ms=int(exc.delay * 1000) if isinstance(exc, Retry) and exc.delay is not None else -1,
        )

    def _failure(self, name: str, exc: Exception, started: float, retry: RetryPlan | None = None) -> Outcome:
        if isinstance(exc, Retry) and isinstance(exc.__cause__, Exception):
            exc = exc.__cause__  # with no retries left, the task fails with what caused the retry
        envelope = self.transport.dumps_error(exc)
        return Outcome(
            name=name,
            succeeded=False,
            envelope=envelope,
            duration=time.monotonic() - started,
            error_type=type(exc).__name__,
            timed_out=isinstance(exc, TaskTimeout),
            retry=retry,
            error=exc,
        )


def _args_of(error: BaseException) -> str:
    """`(3)` for SystemExit(3), `('bye',)`-style for more, "" for none: the message a log shows."""
    if not error.args:
        return ""
    return f"({error.args[0]!r})" if len(error.args) == 1 else repr(error.args)


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """Cached: inspect.signature costs ~50 µs, a sixth of a task's whole overhead."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: let the call decide
        return None


@functools.lru_cache(maxsize=4096)
def _misfit(fn: Callable[..., Any], positional: int, keywords: tuple[str, ...]) -> str | None:
    """Why this many positional arguments and these keyword names cannot be bound to fn (the
    TypeError's message), or None if they can. Binding looks at how many arguments and which
    names, never at the values, so the answer for one shape of call is cached (binding cost
    10 µs per task)."""
    signature = _signature(fn)
    if signature is None:
        return None
    try:
        signature.bind(*([None] * positional), **dict.fromkeys(keywords))
    except TypeError as exc:
        return str(exc)
    return None


def check_arguments(definition: TaskDefinition, args: list[Any], kwargs: dict[str, Any]) -> None:
    """A clear, never-retried error for arguments that cannot fit, instead of a TypeError from
    inside the call that looks like the task's own bug."""
    misfit = _misfit(definition.fn, len(args), tuple(kwargs))
    if misfit is not None:
        raise BadArguments(f"arguments do not fit {definition.name}{_signature(definition.fn)}: {misfit}")
