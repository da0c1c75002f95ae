"""The worker children of `minicelery worker -c N`, by slot: starting them, hearing them, reaping them.

A slot is a child's place (0..N-1), kept by its replacements. The first N children are forked
from the supervisor after it imported the task modules (they share that memory); every later
one (a restart, a recycle, a reload) is a fresh interpreter that reads the current config and
code: the supervisor forks only before it starts any thread. Each child reports on its own pipe,
one JSON line at a time (minicelery.pool_child): `ready`, then a `ping` with its counts every
second while it is healthy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .pool_child import PING_EVERY, run_child
from .settings import Settings

log = logging.getLogger("minicelery.pool")

EXIT_CONFIG = 78
STARTUP_GRACE = 120.0  # a child that has not pinged yet counts as healthy this long (imports, Redis)
PING_STALE = 5 * PING_EVERY  # a child that has not pinged for this long is not healthy


@dataclass
class Child:
    slot: int
    pid: int
    reader: int
    started: float
    fresh: bool  # a fresh interpreter (not forked from the supervisor)
    ready: bool = False
    retiring: str | None = None  # why it was asked to stop: "reload", "memory", "stop", "surplus"
    last_ping: float | None = None
    done: int = 0
    failed: int = 0
    retried: int = 0
    busy: bool = False
    asked_to_stop: bool = False
    reported_unhealthy: bool = False
    buffer: bytes = b""

    def healthy(self, now: float) -> bool:
        if self.last_ping is None:
            return now - self.started < STARTUP_GRACE
        return now - self.last_ping < PING_STALE

    def silent_for(self, now: float) -> float:
        """Seconds since its last ping (since it started, if it never pinged)."""
        return now - (self.started if self.last_ping is None else self.last_ping)


@dataclass
class SlotRecord:
    """What outlives one child of a slot: counts for metrics and the crash-loop check."""

    done: int = 0
    failed: int = 0
    restarts: dict[str, int] = field(default_factory=lambda: {"died": 0, "recycled": 0, "reloaded": 0})
    failures_before_ready: int = 0
    restart_at: float | None = None


def child_command(argv: Sequence[str]) -> list[str]:
    """The command line of a fresh child: this worker's own flags, one process, reporting on FD."""
    return [sys.executable, "-m", "minicelery", "worker", *argv]


class Children:
    """The live children by PID, and a record per slot that outlives them."""

    def __init__(self, settings: Settings, child_argv: Sequence[str]) -> None:
        self.settings = settings
        self.child_argv = list(child_argv)  # flags a fresh child gets (never -c), before --pool-child
        self.by_pid: dict[int, Child] = {}
        self.slots = [SlotRecord() for _ in range(settings.worker.processes())]
        self.close_in_children: list[int] = []  # e.g. the supervisor's wake pipe, the metrics socket
        self.on_exit: list[Callable[[int], None]] = []  # called with the PID, once reaped
        self.metrics_dir: str | None = None  # where children keep their metrics (None: off)

    def fork(self, slot: int) -> None:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which passes it on
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                for fd in [reader, *self.close_in_children, *(c.reader for c in self.by_pid.values())]:
                    os.close(fd)
                code = run_child(self.settings, writer, self.metrics_dir)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                from .errors import ConfigError

                code = EXIT_CONFIG if isinstance(exc, ConfigError) else 1
                log.exception("worker child failed")
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(writer)
        self._adopt(slot, pid, reader, fresh=False)

    def spawn(self, slot: int) -> None:
        """A fresh interpreter: re-reads the config and re-imports the task modules."""
        reader, writer = os.pipe()
        os.set_inheritable(writer, True)
        skip = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PROMETHEUS_MULTIPROC_DIR")
        env = {k: v for k, v in os.environ.items() if k not in skip}
        if self.metrics_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        argv = child_command([*self.child_argv, "--pool-child", str(writer)])
        try:
            pid = os.posix_spawn(argv[0], argv, env, setpgroup=0)
        finally:
            os.close(writer)
        self._adopt(slot, pid, reader, fresh=True)

    def _adopt(self, slot: int, pid: int, reader: int, *, fresh: bool) -> None:
        os.set_blocking(reader, False)
        self.by_pid[pid] = Child(slot, pid, reader, time.monotonic(), fresh)
        log.info("worker child %d started in slot %d (%s)", pid, slot, "fresh interpreter" if fresh else "forked")

    def read(self, child: Child) -> None:
        """Take in what the child said since the last read (whole lines only)."""
        try:
            data = os.read(child.reader, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        child.buffer += data
        *lines, child.buffer = child.buffer.split(b"\n")
        for line in lines:
            try:
                message: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if message.get("ready") and not child.ready:
                child.ready = True
                child.last_ping = time.monotonic()  # from now on judged by its pings
                self.slots[child.slot].failures_before_ready = 0
                log.info("worker child %d (slot %d) is ready", child.pid, child.slot)
            if message.get("ping"):
                child.last_ping = time.monotonic()
                child.done, child.failed = message["done"], message["failed"]
                child.retried, child.busy = message["retried"], message["busy"]

    def reap(self) -> list[tuple[Child, int]]:
        """The children that exited since the last call, with their exit codes (-N: signal N);
        their counts are added to their slot's record."""
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.by_pid.pop(pid, None)
            if child is None:
                continue
            self.read(child)  # its last words (its final counts)
            os.close(child.reader)
            record = self.slots[child.slot]
            record.done += child.done
            record.failed += child.failed
            for hook in self.on_exit:
                hook(pid)
            exited.append((child, os.waitstatus_to_exitcode(status)))
        return exited

    def of_slot(self, slot: int) -> list[Child]:
        return [c for c in self.by_pid.values() if c.slot == slot]

    def working(self) -> list[Child]:
        """Children not asked to go: the ones that count towards N."""
        return [c for c in self.by_pid.values() if c.retiring is None]

    def retire(self, child: Child, why: str) -> None:
        """Ask a child to stop gracefully: it finishes its task (a worker's first SIGTERM)."""
        child.retiring = why
        child.asked_to_stop = True
        kill(child.pid, signal.SIGTERM)


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
