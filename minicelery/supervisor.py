"""`minicelery worker -c N`: one supervisor process, N worker children; it runs no tasks.

The supervisor has loaded the settings and imported the task modules (a bad config or a module
that fails to import exits 78 before any fork), then forks the first N children: each is
exactly today's single-threaded Worker (minicelery.pool_child), sharing the imported code.
Every later child (a restart, a recycle, a reload) is a fresh interpreter that reads the
current config and code: the supervisor forks only before it starts any thread.

Only the supervisor talks to systemd: READY=1 once every child is ready, WATCHDOG=1 while every
child pings (a child pings only while it is healthy), STATUS= a summary. Signals only set
flags; the loop below acts on them:

  SIGTERM/SIGINT  stop every child gracefully (each drains as a single worker does); a second
                  signal is passed on, so they hand their tasks back. Exit 0 when every child
                  exited 0, 75 when any handed a task back (or died while stopping).
  SIGHUP          rolling replacement: for each child in turn, start a fresh one, wait until it
                  is ready, then stop the old one gracefully and wait until it has gone. N stay
                  working throughout (N+1 for a moment). A fresh child that fails to become
                  ready ends the reload; the others keep running.
  a child dies    restarted after a backoff; a slot whose child dies before it is ready
                  CRASH_LOOP times in a row makes the supervisor stop and exit 1 (78 when the
                  child said bad configuration), for systemd or Kubernetes to see.
  recycling       a child exits by itself after worker.max_tasks_per_child tasks; one above
                  worker.max_memory_per_child MiB of RSS is sent SIGTERM; either is replaced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from .notify import Notifier
from .pool_child import PING_EVERY, run_child
from .settings import Settings

log = logging.getLogger("minicelery.pool")

EXIT_OK = 0
EXIT_CRASH_LOOP = 1
EXIT_HANDED_BACK = 75
EXIT_CONFIG = 78
CRASH_LOOP = 5  # deaths before ready, in a row, of one slot's children
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0
STARTUP_GRACE = 120.0  # a child that has not pinged yet counts as healthy this long (imports, Redis)
PING_STALE = 5 * PING_EVERY  # a child that has not pinged for this long is not healthy
TICK = 0.5  # the loop wakes at least this often (signals and child messages wake it at once)


@dataclass
class Child:
    slot: int
    pid: int
    reader: int
    started: float
    fresh: bool  # a fresh interpreter (not forked from the supervisor)
    ready: bool = False
    retiring: str | None = None  # why it was asked to stop: "reload", "memory", "stop"
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


class Supervisor:
    def __init__(self, settings: Settings, child_argv: Sequence[str], *, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.n = settings.worker.processes()
        self.child_argv = list(child_argv)  # flags a fresh child gets (never -c), before --pool-child
        self.notifier = notifier or Notifier()
        self.children: dict[int, Child] = {}
        self.slots = [SlotRecord() for _ in range(self.n)]
        self.stop_signals = 0
        self._stops_passed_on = 0
        self.reload_requested = False
        self.reload_queue: list[int] = []  # slots still to replace in this reload
        self.reload_current: int | None = None  # the slot being replaced now
        self.reload_started: float | None = None
        self.exit_codes: list[int] = []
        self.announced_ready = False
        self.crash_loop_code: int | None = None
        self._watchdog_at = 0.0
        self._memory_at = 0.0
        self._wake_r, self._wake_w = os.pipe()
        self.after_forks: list[Callable[[], None]] = []  # e.g. the metrics server's start
        self.close_in_children: list[int] = []  # e.g. the metrics server's listening socket
        self.on_child_exit: list[Callable[[int], None]] = []  # called with the PID, once reaped
        self.metrics_dir: str | None = None  # where children keep their metrics (None: off)

    # --- signals: flags only ---------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signals += 1

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def _install_signals(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake the loop

    # --- children --------------------------------------------------------------------------------

    def _fork(self, slot: int) -> None:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which passes it on
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                inherited = [reader, self._wake_r, self._wake_w, *self.close_in_children]
                for fd in inherited + [c.reader for c in self.children.values()]:
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

    def _spawn(self, slot: int) -> None:
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
        self.children[pid] = Child(slot, pid, reader, time.monotonic(), fresh)
        log.info("worker child %d started in slot %d (%s)", pid, slot, "fresh interpreter" if fresh else "forked")

    def _read(self, child: Child) -> None:
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

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self._read(child)  # its last words (its final counts)
            os.close(child.reader)
            code = os.waitstatus_to_exitcode(status)
            record = self.slots[child.slot]
            record.done += child.done
            record.failed += child.failed
            for hook in self.on_child_exit:
                hook(pid)
            self._exited(child, code)

    def _exited(self, child: Child, code: int) -> None:
        record = self.slots[child.slot]
        how = f"exit {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if self.stop_signals:
            # Killed by the SIGTERM itself: it had no worker handler (still starting, or already
            # past its worker's end), so it held no task.
            self.exit_codes.append(0 if code == -signal.SIGTERM else code)
            log.info("worker child %d (slot %d) stopped: %s", child.pid, child.slot, how)
            return
        if child.retiring == "reload":
            log.info("worker child %d (slot %d) replaced by reload: %s", child.pid, child.slot, how)
            return
        if child.retiring == "memory" or (code == 0 and child.ready):
            reason = "memory" if child.retiring else "max_tasks_per_child"
            log.info("worker child %d (slot %d) recycled (%s): %s", child.pid, child.slot, reason, how)
            record.restarts["recycled"] += 1
            record.restart_at = time.monotonic()
            return
        if child.slot == self.reload_current and child.fresh and not child.ready:  # a reload's fresh child
            log.error("reload stopped: the fresh worker child %d died before it was ready (%s)", child.pid, how)
            self.reload_queue.clear()
            self._reload_finished(ok=False)
            if self._of_slot(child.slot):
                return  # the old child of the slot keeps working
        record.restarts["died"] += 1
        record.failures_before_ready = 0 if child.ready else record.failures_before_ready + 1
        if record.failures_before_ready >= CRASH_LOOP:
            log.error(
                "worker children of slot %d died %d times before they were ready: giving up", child.slot, CRASH_LOOP
            )
            self.crash_loop_code = EXIT_CONFIG if code == EXIT_CONFIG else EXIT_CRASH_LOOP
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, record.failures_before_ready - 1))
        log.warning("worker child %d (slot %d) died (%s): a new one in %.1f s", child.pid, child.slot, how, delay)
        record.restart_at = time.monotonic() + delay

    def _of_slot(self, slot: int) -> list[Child]:
        return [c for c in self.children.values() if c.slot == slot]

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        for slot in range(self.n):
            self._fork(slot)
        for start in self.after_forks:  # threads only now: no fork happens after this
            start()
        log.info("supervisor %d started %d worker children", os.getpid(), self.n)
        while self.children or (not self.stop_signals and self.crash_loop_code is None):
            self._wait()
            self._reap()
            if self.crash_loop_code is not None and not self.stop_signals:
                self.stop_signals = 1  # stop the others as on SIGTERM
            if self.stop_signals:
                self._pass_on_stop()
            else:
                self._restart_due()
                self._reload_step()
                self._recycle_by_memory()
            self._notify()
        if self.crash_loop_code is not None:
            return self.crash_loop_code
        return EXIT_OK if all(code == 0 for code in self.exit_codes) else EXIT_HANDED_BACK

    def _wait(self) -> None:
        readers = {c.reader: c for c in self.children.values()}
        try:
            ready, _, _ = select.select([self._wake_r, *readers], [], [], TICK)
        except InterruptedError:
            return
        for fd in ready:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._read(readers[fd])

    def _pass_on_stop(self) -> None:
        if self._stops_passed_on == 0:
            self.notifier.stopping()
            log.info(
                "stopping %d worker children (a second signal makes them hand their tasks back)", len(self.children)
            )
        while self._stops_passed_on < min(self.stop_signals, 2):
            self._stops_passed_on += 1
            for child in self.children.values():
                child.retiring = "stop"
                _kill(child.pid, signal.SIGTERM)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, record in enumerate(self.slots):
            if record.restart_at is not None and now >= record.restart_at and not self._of_slot(slot):
                record.restart_at = None
                self._spawn(slot)

    def _reload_step(self) -> None:
        if self.reload_requested and self.reload_started is None:  # one during a reload: after it
            self.reload_requested = False
            log.info("reload: replacing %d worker children one at a time", self.n)
            self.notifier.reloading()
            self.reload_started = time.monotonic()
            self.reload_queue = list(range(self.n))
        if self.reload_started is None:
            return
        current = self.reload_current
        if current is not None:
            members = self._of_slot(current)
            fresh_ready = any(c.retiring is None and c.ready for c in members)
            olds = [c for c in members if c.retiring == "reload"]
            for old in olds if fresh_ready else []:  # the fresh child is ready: the old one may go
                if not old.asked_to_stop:
                    old.asked_to_stop = True
                    _kill(old.pid, signal.SIGTERM)
            if not fresh_ready or olds:
                return  # one slot at a time: wait for this one's fresh child, then its old one's exit
            self.reload_current = None
        if not self.reload_queue:
            self._reload_finished(ok=True)
            return
        slot = self.reload_current = self.reload_queue.pop(0)
        for old in self._of_slot(slot):
            old.retiring = "reload"
        self.slots[slot].restarts["reloaded"] += 1
        self.slots[slot].restart_at = None  # (a restart that was due: the fresh child is it)
        self._spawn(slot)

    def _reload_finished(self, *, ok: bool) -> None:
        started = self.reload_started or time.monotonic()
        self.reload_started = self.reload_current = None
        for child in self.children.values():
            if child.retiring == "reload" and not child.asked_to_stop:
                child.retiring = None  # its replacement failed: it keeps working
        log.info("reload %s after %.2f s", "done" if ok else "abandoned", time.monotonic() - started)
        self.notifier.ready()

    def _recycle_by_memory(self) -> None:
        limit = self.settings.worker.max_memory_per_child
        now = time.monotonic()
        if limit is None or now < self._memory_at:
            return
        self._memory_at = now + 1.0
        for child in self.children.values():
            if child.retiring is None and child.ready and rss_mib(child.pid) > limit:
                log.info("worker child %d (slot %d) is above %d MiB RSS: recycling it", child.pid, child.slot, limit)
                child.retiring = "memory"
                _kill(child.pid, signal.SIGTERM)

    # --- what the outside sees -------------------------------------------------------------------

    def _log_health(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            healthy = child.healthy(now)
            if healthy == child.reported_unhealthy:
                child.reported_unhealthy = not healthy
                if healthy:
                    log.info("worker child %d (slot %d) pings again", child.pid, child.slot)
                else:
                    log.error(
                        "worker child %d (slot %d) stopped pinging (stuck past a time limit, or frozen): "
                        "unhealthy, no watchdog ping for the unit", child.pid, child.slot,
                    )  # fmt: skip

    def working(self) -> list[Child]:
        return [c for c in self.children.values() if c.retiring is None]

    def all_ready(self) -> bool:
        slots = {c.slot for c in self.working() if c.ready}
        return len(slots) == self.n and not self.stop_signals

    def healthy(self) -> bool:
        now = time.monotonic()
        return all(c.healthy(now) for c in self.children.values() if c.retiring != "stop")

    def totals(self) -> tuple[int, int, int]:
        """Tasks done and failed by every child so far, and children busy now."""
        done = sum(r.done for r in self.slots) + sum(c.done for c in self.children.values())
        failed = sum(r.failed for r in self.slots) + sum(c.failed for c in self.children.values())
        return done, failed, sum(c.busy for c in self.children.values())

    def _notify(self) -> None:
        self._log_health()
        if not self.announced_ready and self.all_ready():
            self.announced_ready = True
            log.info("all %d worker children ready", self.n)
            self.notifier.ready()
        interval = self.notifier.watchdog_interval
        now = time.monotonic()
        if interval is not None and now >= self._watchdog_at and self.healthy():
            self._watchdog_at = now + interval
            self.notifier.watchdog()
        done, failed, busy = self.totals()
        up = sum(1 for c in self.working() if c.ready)
        state = "stopping" if self.stop_signals else "reloading" if self.reload_started else "running"
        self.notifier.status(f"{state}: {up}/{self.n} children ready, {busy} busy, {done} done, {failed} failed")


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
