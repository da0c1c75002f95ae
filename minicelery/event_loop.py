"""Running `async def` tasks: one event loop per worker process, made on first use.

The worker stays single-threaded and runs one task at a time; an async task's coroutine runs to
completion on a loop that lives as long as the worker, so clients a task module keeps per loop
(an HTTP session, a database pool) can be reused by the next task, as in arq or SAQ.

Time limits: at the limit the task is cancelled (CancelledError at its next await, so its
`finally` blocks and `async with` exits run); a coroutine that never awaits gets
TimeLimitExceeded raised into it a second later, as a plain function would (see TaskAlarm).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .interrupts import TaskAlarm


class TaskEventLoop:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, coroutine: Coroutine[Any, Any, Any], alarm: TaskAlarm) -> Any:
        """Run one task's coroutine to completion and return its value (or raise its error)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.new_event_loop()
        task = loop.create_task(coroutine)

        def cancel() -> bool:
            # Called from the SIGALRM handler: only the signal-safe way into the loop.
            loop.call_soon_threadsafe(task.cancel)
            return True

        alarm.cancel_task = cancel
        try:
            return loop.run_until_complete(task)
        finally:
            alarm.cancel_task = None
            if not task.done():  # an interruption came out of the loop itself: end the task there
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
