"""One child of `minicelery worker -c N`: exactly today's single-threaded Worker, except that
it reports to its supervisor over a pipe instead of to systemd.

Only the supervisor talks to $NOTIFY_SOCKET (NotifyAccess=main). A child says, one JSON line
at a time on its pipe: `ready` (Redis answered), `ping` with its counters (sent by the
heartbeat only while the child is healthy, so a missing ping is the supervisor's sign of a
stuck child), `status` and `stopping`. A child is either forked by the supervisor after the
task modules were imported (the first N: they share that memory) or started as a fresh
interpreter (`minicelery worker --pool-child FD`: every later one, so a replacement reads the
current config and code).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from .notify import Notifier
from .settings import Settings

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("minicelery.pool")

# A healthy child pings its supervisor this often (seconds); its heartbeat beats at least as often.
PING_EVERY = 1.0
_PR_SET_PDEATHSIG = 1


class SupervisorLink(Notifier):
    """A Notifier whose messages go to the supervisor's pipe (one write per line: atomic)."""

    def __init__(self, fd: int) -> None:
        self.enabled = True
        self.fd = fd
        self._last_status: str | None = None
        self.worker: Worker | None = None

    @property
    def watchdog_interval(self) -> float | None:
        return PING_EVERY

    def _message(self, **fields: Any) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: PDEATHSIG stops this child
            os.write(self.fd, json.dumps(fields).encode() + b"\n")

    def _send(self, text: str) -> None:
        self._message(status=text)

    def ready(self) -> None:
        self._message(ready=True)

    def watchdog(self) -> None:
        self.report()

    def report(self) -> None:
        worker = self.worker
        if worker is None:
            return
        c = worker.counters
        self._message(ping=True, done=c.done, failed=c.failed, retried=c.retried, busy=worker.running is not None)

    def stopping(self) -> None:
        self._message(stopping=True)


def die_with_parent() -> None:
    """SIGTERM this child when the supervisor dies (even by SIGKILL): it drains and exits
    instead of working on, orphaned, outside the service."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def forget_inherited_connections() -> None:
    """Drop any Redis connection a task module opened at import, before the fork: a socket
    shared by two processes interleaves their replies. (redis-py's pools also notice a new
    PID; this does not depend on that.) Nothing is closed: the parent's sockets stay its own."""
    from .app import Client

    for client in Client.instances:
        client.broker.forget_connections()


def run_child(settings: Settings, fd: int, metrics_dir: str | None) -> int:
    """Run one worker reporting on `fd`; returns its exit code (as `minicelery worker` does).
    Its metrics go to files in `metrics_dir` for the supervisor to serve (None: metrics off)."""
    from .cli import build_worker_app
    from .metrics import record_for_supervisor
    from .worker import Worker

    for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(variable, None)
    die_with_parent()
    forget_inherited_connections()
    if metrics_dir:
        record_for_supervisor(metrics_dir)  # and the supervisor serves /metrics, /healthz, /readyz
    link = SupervisorLink(fd)
    worker = Worker(build_worker_app(settings), settings, notifier=link)
    link.worker = worker
    code = worker.run(max_tasks=settings.worker.max_tasks_per_child)
    link.report()  # the final counts, for the per-slot series
    return code
