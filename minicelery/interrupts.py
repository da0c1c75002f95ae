"""Signals for a single-threaded worker: SIGTERM/SIGINT to stop, SIGALRM to interrupt a task.

The stop handlers only count signals and set an event; the worker loop acts on them. The one
place that interrupts user code is the SIGALRM handler of TaskAlarm: it raises
TimeLimitExceeded when a task passes its time limit and HandBack when the worker must stop now
(shutdown grace over, or a second stop signal). Neither is an Exception, so task code's
`except Exception:` cannot swallow them. A single-threaded worker has no other way to stop Python code.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

from .errors import Cancelled, TimeLimitExceeded


class HandBack(BaseException):
    """Raised inside a running task when the worker must stop at once and return the task."""


# A task that swallows its interruption gets it again this often, until it stops (or the
# heartbeat ends the worker: see Worker.end_stuck_task).
INTERRUPT_REPEAT = 1.0


class TaskAlarm:
    """Arms SIGALRM for the earliest of a task's time limit, the shutdown deadline and a
    cancel the heartbeat learned of.

    At the limit the task gets TimeLimitExceeded (an async task is cancelled first, so its
    `finally` blocks and context managers run at an await); at the shutdown deadline HandBack;
    on a cancel, Cancelled. Each is raised again every INTERRUPT_REPEAT seconds while the task
    goes on, and `timed_out` / `handing_back` / `cancelled` stay set, so a task that catches
    everything and returns is still recorded as timed out, handed back or cancelled, never as
    succeeded.
    """

    def __init__(self) -> None:
        self._limit_at: float | None = None
        self._limit: float | None = None
        self._stop_at: float | None = None
        self._active = False
        self.installed = False  # without the handler an alarm would kill the process: arm none
        self._armed = False  # a timer may be pending (most tasks have no limit: no syscall to end them)
        self.timed_out = False  # the running task passed its time limit
        self.handing_back = False  # the running task must be handed back (stopping now)
        self.cancelled = False  # the running task was cancelled and told so
        self._token: str | None = None  # the running task's lease token
        self._cancel_at: float | None = None  # when to raise Cancelled (monotonic)
        self.cancelled_since: float | None = None  # when the running task's cancel arrived
        # Set while an async task runs: asks its event loop to cancel it; True if it will.
        self.cancel_task: Callable[[], bool] | None = None

    def install(self) -> None:
        signal.signal(signal.SIGALRM, self._on_alarm)
        self.installed = True

    def task_started(self, time_limit: float | None, token: str | None = None) -> None:
        self._limit = time_limit
        self._limit_at = None if time_limit is None else time.monotonic() + time_limit
        self.timed_out = self.handing_back = self.cancelled = False
        self._token, self._cancel_at, self.cancelled_since = token, None, None
        self._active = True
        self._arm()

    def task_ended(self) -> None:
        self._active = False
        self._limit_at = None
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False

    def cancel(self, token: str) -> bool:
        """Called by the heartbeat thread: the task with this lease token was cancelled; if it is
        the one running, interrupt it now (a signal to the main thread, whose handler raises).
        True the first time for that task."""
        if not (self._active and self.installed and token == self._token) or self.cancelled_since is not None:
            return False
        self.cancelled_since = self._cancel_at = time.monotonic()
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)
        return True

    def stop_by(self, seconds: float) -> None:
        """The running task (if any) must end within `seconds`, else it is handed back."""
        deadline = time.monotonic() + seconds
        self._stop_at = deadline if self._stop_at is None else min(self._stop_at, deadline)
        self._arm()

    def _arm(self) -> None:
        if not (self._active and self.installed):
            return
        deadlines = [d for d in (self._limit_at, self._stop_at, self._cancel_at) if d is not None]
        if deadlines:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, max(1e-6, min(deadlines) - time.monotonic()))

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if not self._active:
            return
        now = time.monotonic()
        if self._stop_at is not None and now >= self._stop_at:
            self.handing_back = True
            self._stop_at = now + INTERRUPT_REPEAT  # again, should the task swallow this one
            self._arm()
            raise HandBack()
        if self._cancel_at is not None and now >= self._cancel_at:
            first = not self.cancelled
            self.cancelled = True
            self._cancel_at = now + INTERRUPT_REPEAT
            self._arm()
            if first and self.cancel_task is not None and self.cancel_task():
                return  # an async task: cancelled at its next await
            raise Cancelled("task cancelled while it ran")
        if self._limit_at is not None and now >= self._limit_at:
            first = not self.timed_out
            self.timed_out = True
            self._limit_at = now + INTERRUPT_REPEAT
            self._arm()
            if first and self.cancel_task is not None and self.cancel_task():
                return  # an async task: cancelled at its next await; raised into it if it never gets there
            raise TimeLimitExceeded(f"task ran past its time limit of {self._limit:g} s")
        self._arm()  # woke early (the other deadline moved): wait for the rest


class StopSignals:
    """Counts SIGTERM/SIGINT: the first asks to drain, the second to stop at once."""

    def __init__(self, alarm: TaskAlarm, grace: float) -> None:
        self.alarm = alarm
        self.grace = grace
        self.count = 0
        self.event = threading.Event()  # set on the first signal; the heartbeat thread waits on it

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    @property
    def requested(self) -> bool:
        return self.count > 0

    @property
    def immediate(self) -> bool:
        return self.count > 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        # Safe from a handler: only the heartbeat thread ever waits on this event.
        self.event.set()
        self.alarm.stop_by(self.grace if self.count == 1 else 0.0)


@contextlib.contextmanager
def signals_captured(stop: StopSignals, alarm: TaskAlarm) -> Iterator[None]:
    """Install the worker's SIGTERM/SIGINT/SIGALRM handlers for the block, then put back the
    ones found (as uvicorn's capture_signals does): `app.start()` in a user's process leaves
    that process as it was."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    stop.install()
    alarm.install()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        alarm.installed = False
        for sig, handler in previous.items():
            # None: a handler not set from Python; the default is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
