"""One error tree for minicelery: a root, and a branch per layer.

Redis exceptions are translated once, at the broker boundary, into `BrokerError`
subclasses; task failures travel as `RemoteError` (or a builtin exception).
"""

from __future__ import annotations


class MiniceleryError(Exception):
    """Root of every error minicelery raises on purpose."""


# --- configuration ---------------------------------------------------------------------------


class ConfigError(MiniceleryError):
    """A setting, a task registration or a task module is wrong."""


class DuplicateTaskError(ConfigError):
    """Two tasks were registered under one name."""


class DependencyError(ConfigError):
    """A task graph cannot be expressed (a nested handle, parents on another queue, ...)."""


# --- serialization ---------------------------------------------------------------------------


class SerializationError(MiniceleryError):
    """A payload or result could not be encoded or decoded as JSON."""


class PayloadTooLarge(SerializationError):
    """An encoded payload or result is over the configured size limit."""


# --- broker ----------------------------------------------------------------------------------


class BrokerError(MiniceleryError):
    """Redis answered with something the broker did not expect."""


class BrokerUnavailable(BrokerError):
    """Redis could not be reached (connection refused, reset, timed out, loading)."""


class NotReplicated(BrokerError):
    """An enqueue reached the primary but not the replicas redis.min_replicas_acked asks for."""


class BrokerAuthError(ConfigError, BrokerError):
    """Redis refused our credentials or the ACL user lacks a command: retrying cannot fix it."""


class ClusterMismatch(ConfigError, BrokerError):
    """redis.cluster says one thing and the server another (a cluster node without it, or a
    plain Redis with it): retrying cannot fix it."""


# --- tasks -----------------------------------------------------------------------------------


class TaskError(MiniceleryError):
    """Something about a task itself went wrong."""


class BadArguments(TaskError):
    """The payload's arguments do not fit the task function's signature (never retried)."""


class UnknownTask(TaskError):
    """A payload names a task that no registered function has."""


class Retry(TaskError):
    """Raise `app.Retry(delay=seconds)` inside a task to run it again later.

    It spends one of the task's `retries=`; with none left the task fails with the exception
    this one was raised from (`raise app.Retry(delay=5) from exc`), else with this one.
    """

    def __init__(self, delay: float | None = None, message: str = "") -> None:
        if delay is not None and delay < 0:
            raise ValueError("Retry delay must not be negative")
        self.delay = delay
        super().__init__(message or (f"retry requested in {delay} s" if delay is not None else "retry requested"))


class TaskTimeout(TaskError):
    """A task ran past its time limit (what its result and its children get)."""


class Cancelled(TaskError):
    """The task was cancelled (`handle.cancel()`, `minicelery cancel`): what its result, its
    children and `.result()` get, and what is raised inside it if it was running."""


class TaskAborted(TaskError):
    """A task raised SystemExit, KeyboardInterrupt or another BaseException that is not an
    Exception (e.g. it called sys.exit()). The worker records it as the task's failure, with
    the original type and message, and keeps running."""


class WorkerLost(TaskError):
    """The task's worker died (lease expired) more often than allowed."""


class ParentNeverStarted(TaskError):
    """A waiting task's parents were never started within `worker.orphan_ttl`: the orphan sweep
    dead-lettered it (its children get this error as their argument)."""


class TaskNotFound(TaskError):
    """No task with this id is stored (never sent, or its result expired)."""


class ResultNotKept(TaskError):
    """The task succeeded, but its result was not kept (`@app.task(store_result=False)` or
    `[worker] store_results = false`): what `.result()` raises once it finished, and what a
    child registered after such a parent finished gets as that argument."""


class TimeLimitExceeded(BaseException):
    """Raised inside a task that passed its time limit, and again every second while it goes on.

    Not an Exception, so `except Exception:` in task code does not swallow it (asyncio made
    CancelledError a BaseException for the same reason); `finally:` blocks still run. The task's
    result is then TaskTimeout, whatever the task did with this one.
    """


class RemoteError(TaskError):
    """A task failed with an exception type that is not a Python builtin.

    No class is ever imported from a payload, so a custom exception comes back as this,
    carrying the original type name, message and the traceback from the worker.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.traceback))
