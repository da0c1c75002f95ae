"""`minicelery worker -c N`: one supervisor process, N worker children; it runs no tasks.

The supervisor has loaded the settings and imported the task modules (a bad config or a module
that fails to import exits 78 before any fork), then forks the first N children: each is
exactly today's single-threaded Worker (minicelery.pool_child), sharing the imported code.
Its parts, one module each: the children and their pipes (pool_children), the rolling reload
(pool_reload), what systemd hears (pool_relay), /metrics (pool_metrics). Signals only set
flags; the loop below acts on them:

  SIGTERM/SIGINT  stop every child gracefully (each drains as a single worker does); a second
                  signal is passed on, so they hand their tasks back. Exit 0 when every child
                  exited 0, 75 when any handed a task back (or died while stopping).
  SIGHUP          read the settings again (an invalid config refuses the reload; a new
                  concurrency applies), then a rolling replacement, one slot at a time
                  (minicelery.pool_reload).
  a child dies    restarted after a backoff; a slot whose child dies before it is ready
                  CRASH_LOOP times in a row makes the supervisor stop and exit 1 (78 when the
                  child said bad configuration), for systemd or Kubernetes to see.
  recycling       a child exits by itself after worker.max_tasks_per_child tasks; one above
                  worker.max_memory_per_child MiB of RSS is sent SIGTERM; either is replaced.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable, Sequence
from types import FrameType

from .errors import ConfigError
from .notify import Notifier
from .pool_children import EXIT_CONFIG, Child, Children, SlotRecord, kill, rss_mib
from .pool_relay import SystemdRelay
from .pool_reload import RollingReload
from .settings import Settings

log = logging.getLogger("minicelery.pool")

EXIT_OK = 0
EXIT_CRASH_LOOP = 1
EXIT_HANDED_BACK = 75
CRASH_LOOP = 5  # deaths before ready, in a row, of one slot's children
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0
TICK = 0.5  # the loop wakes at least this often (signals and child messages wake it at once)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        child_argv: Sequence[str],
        *,
        notifier: Notifier | None = None,
        reread: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.n = settings.worker.processes()
        self.reread = reread  # the settings as a fresh start would load them (the same file, flags, env)
        self.notifier = notifier or Notifier()
        self.children = Children(settings, child_argv)
        self.reload = RollingReload(self.children, self.notifier, self._new_settings)
        self.relay = SystemdRelay(self.children, self.notifier, lambda: self.n)
        self.relay.reloading = lambda: self.reload.running
        self.stop_signals = 0
        self._stops_passed_on = 0
        self.exit_codes: list[int] = []
        self.crash_loop_code: int | None = None
        self._memory_at = 0.0
        self._wake_r, self._wake_w = os.pipe()
        self.children.close_in_children += [self._wake_r, self._wake_w]
        self.after_forks: list[Callable[[], None]] = []  # e.g. the metrics server's start

    # --- signals: flags only ---------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signals += 1

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload.request()

    def _install_signals(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake the loop

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        for slot in range(self.n):
            self.children.fork(slot)
        for start in self.after_forks:  # threads only now: no fork happens after this
            start()
        auto = f' (concurrency "auto": {self.n} usable CPUs)' if self.settings.worker.concurrency == "auto" else ""
        log.info("supervisor %d started %d worker children%s", os.getpid(), self.n, auto)
        while self.children.by_pid or (not self.stop_signals and self.crash_loop_code is None):
            self._wait()
            for child, code in self.children.reap():
                self._exited(child, code)
            if self.crash_loop_code is not None and not self.stop_signals:
                self.stop_signals = 1  # stop the others as on SIGTERM
            if self.stop_signals:
                self._pass_on_stop()
            else:
                self._restart_due()
                self.reload.step()
                self._recycle_by_memory()
            self.relay.stopping = bool(self.stop_signals)
            self.relay.notify()
        if self.crash_loop_code is not None:
            return self.crash_loop_code
        return EXIT_OK if all(code == 0 for code in self.exit_codes) else EXIT_HANDED_BACK

    def _wait(self) -> None:
        readers = {c.reader: c for c in self.children.by_pid.values()}
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
                self.children.read(readers[fd])

    # --- children's ends and what follows --------------------------------------------------------

    def _exited(self, child: Child, code: int) -> None:
        record = self.children.slots[child.slot]
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
        if child.retiring == "surplus":
            log.info("worker child %d (slot %d) stopped, concurrency is now %d: %s", child.pid, child.slot, self.n, how)
            return
        if child.retiring == "memory" or (code == 0 and child.ready):
            reason = "memory" if child.retiring else "max_tasks_per_child"
            log.info("worker child %d (slot %d) recycled (%s): %s", child.pid, child.slot, reason, how)
            record.restarts["recycled"] += 1
            record.restart_at = time.monotonic()
            return
        if self.reload.fresh_child_died(child, how) and self.children.of_slot(child.slot):
            return  # the old child of the slot keeps working
        record.restarts["died"] += 1
        record.failures_before_ready = 0 if child.ready else record.failures_before_ready + 1
        if record.failures_before_ready >= CRASH_LOOP:
            self.crash_loop_code = EXIT_CONFIG if code == EXIT_CONFIG else EXIT_CRASH_LOOP
            log.error(
                "worker children of slot %d died %d times before they were ready (the last: %s): a crash loop; "
                "stopping the others and exiting %d", child.slot, CRASH_LOOP, how, self.crash_loop_code,
            )  # fmt: skip
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, record.failures_before_ready - 1))
        log.warning("worker child %d (slot %d) died (%s): a new one in %.1f s", child.pid, child.slot, how, delay)
        record.restart_at = time.monotonic() + delay

    def _pass_on_stop(self) -> None:
        if self._stops_passed_on == 0:
            self.notifier.stopping()
            log.info(
                "stopping %d worker children (a second signal makes them hand their tasks back)",
                len(self.children.by_pid),
            )
        while self._stops_passed_on < min(self.stop_signals, 2):
            self._stops_passed_on += 1
            for child in self.children.by_pid.values():
                child.retiring = "stop"
                kill(child.pid, signal.SIGTERM)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, record in enumerate(self.children.slots[: self.n]):
            if record.restart_at is not None and now >= record.restart_at and not self.children.of_slot(slot):
                record.restart_at = None
                self.children.spawn(slot)

    def _recycle_by_memory(self) -> None:
        limit = self.settings.worker.max_memory_per_child
        now = time.monotonic()
        if limit is None or now < self._memory_at:
            return
        self._memory_at = now + 1.0
        for child in self.children.working():
            if child.ready and rss_mib(child.pid) > limit:
                log.info("worker child %d (slot %d) is above %d MiB RSS: recycling it", child.pid, child.slot, limit)
                self.children.retire(child, "memory")

    # --- a reload's new settings -----------------------------------------------------------------

    def _new_settings(self) -> int | None:
        """Before a reload: read the settings again. Applied here: worker.concurrency (slots
        added start at once, surplus ones stop gracefully) and worker.max_memory_per_child; the
        children read the rest themselves. The metrics server keeps its address until a restart.
        Returns how many slots the reload replaces; None (a bad config) refuses the reload."""
        if self.reread is None:
            return self.n
        try:
            new = self.reread()
        except ConfigError as exc:
            log.error("reload refused: the configuration is invalid; the children keep running as they are:\n%s", exc)
            return None
        if new.metrics != self.settings.metrics:
            log.warning("reload: [metrics] changed; it takes effect at a restart, not a reload")
        old_n, new_n = self.n, new.worker.processes()
        self.settings, self.n = new, new_n
        if new_n == old_n:
            return old_n
        log.info("reload: concurrency %d -> %d", old_n, new_n)
        self.children.slots += [SlotRecord() for _ in range(new_n - len(self.children.slots))]
        for slot in range(old_n, new_n):
            self.children.slots[slot].restart_at = None
            self.children.spawn(slot)
        for child in self.children.working():
            if child.slot >= new_n:
                self.children.retire(child, "surplus")
        for record in self.children.slots[new_n:]:
            record.restart_at = None  # a surplus slot whose child had died: no new one
        self.relay.announced_ready = False  # "all N ready" again, for the new N
        return min(old_n, new_n)
