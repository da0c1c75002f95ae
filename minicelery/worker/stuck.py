"""What a worker records for a task it cannot stop: one past its time limit, or one that goes on
after its cancel, a lease after it was told. Nothing in the process can end such a task, so the
worker records it and exits (Worker.end_stuck_task); this builds what it records and says why."""

from __future__ import annotations

import logging
import time

from ..errors import Cancelled, TaskTimeout
from ..records import Outcome, Running
from ..transport import JSONTransport

log = logging.getLogger("minicelery.worker")

EXIT_TASK_STUCK = 70  # EX_SOFTWARE: a task could not be stopped; the supervisor restarts the worker


def stuck_outcome(
    running: Running, name: str, *, cancelled: bool, lease_seconds: float, transport: JSONTransport
) -> Outcome:
    """The run's outcome: timed out (never retried), or cancelled when its cancel came first (the
    cancel already settled it in Redis: finish.lua then writes nothing and says 'cancelled').
    Either way it is counted in the outcome metrics like any run."""
    error: Exception
    if cancelled:
        log.error(
            "task %s did not stop within %g s after it was cancelled (it catches Cancelled, or is "
            "stuck outside Python): it stays cancelled; the worker exits %d to end it",
            running.task_id, lease_seconds, EXIT_TASK_STUCK,
        )  # fmt: skip
        error = Cancelled("task cancelled while it ran, and did not stop; its worker exited")
    else:
        limit = running.time_limit or 0
        log.error(
            "task %s did not stop within %g s after its time limit of %g s (it catches the "
            "interruption, or is stuck outside Python): recorded as timed out; the worker exits %d to end it",
            running.task_id, lease_seconds, limit, EXIT_TASK_STUCK,
        )  # fmt: skip
        error = TaskTimeout(f"task did not stop after its time limit of {limit:g} s; its worker exited")
    return Outcome(
        name,
        False,
        transport.dumps_error(error),
        time.monotonic() - running.started,
        type(error).__name__,
        timed_out=not cancelled,
        error=error,
    )
