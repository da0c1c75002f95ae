"""What `minicelery worker -c N` tells systemd (and /healthz, /readyz) about its children.

Only the supervisor talks to $NOTIFY_SOCKET (NotifyAccess=main): READY=1 once every slot has a
ready child, WATCHDOG=1 only while every child pings (a child pings only while it is healthy:
one stuck past its time limit stops), STATUS= a one-line summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .notify import Notifier
from .pool_children import Children

log = logging.getLogger("minicelery.pool")


class SystemdRelay:
    def __init__(self, children: Children, notifier: Notifier, slots: Callable[[], int]) -> None:
        self.children = children
        self.notifier = notifier
        self.slots = slots  # how many children the pool should have now
        self.stopping = False
        self.reloading: Callable[[], bool] = lambda: False
        self.announced_ready = False
        self._watchdog_at = 0.0

    def all_ready(self) -> bool:
        """Every slot has a ready child that is not on its way out (/readyz)."""
        ready_slots = {c.slot for c in self.children.working() if c.ready}
        return len(ready_slots) == self.slots() and not self.stopping

    def healthy(self) -> bool:
        """Every child pings, but those stopping with the unit (/healthz, the watchdog)."""
        return not self.unhealthy()

    def unhealthy(self) -> list[str]:
        """A line for each child that stopped pinging (the body of a failing /healthz, so an
        operator's probe output names the process to look at)."""
        now = time.monotonic()
        return [
            f"worker child {c.pid} (slot {c.slot}) has not pinged for {c.silent_for(now):.0f} s"
            for c in list(self.children.by_pid.values())  # (a copy: the main loop adds and reaps children)
            if c.retiring != "stop" and not c.healthy(now)
        ]

    def totals(self) -> tuple[int, int, int]:
        """Tasks done and failed by every child so far, and children busy now."""
        live = self.children.by_pid.values()
        done = sum(r.done for r in self.children.slots) + sum(c.done for c in live)
        failed = sum(r.failed for r in self.children.slots) + sum(c.failed for c in live)
        return done, failed, sum(c.busy for c in live)

    def notify(self) -> None:
        """Called once per turn of the supervisor's loop."""
        self._log_health()
        n = self.slots()
        if not self.announced_ready and self.all_ready():
            self.announced_ready = True
            log.info("all %d worker children ready", n)
            self.notifier.ready()
        interval = self.notifier.watchdog_interval
        now = time.monotonic()
        if interval is not None and now >= self._watchdog_at and self.healthy():
            self._watchdog_at = now + interval
            self.notifier.watchdog()
        done, failed, busy = self.totals()
        up = sum(1 for c in self.children.working() if c.ready)
        state = "stopping" if self.stopping else "reloading" if self.reloading() else "running"
        self.notifier.status(f"{state}: {up}/{n} children ready, {busy} busy, {done} done, {failed} failed")

    def _log_health(self) -> None:
        now = time.monotonic()
        for child in self.children.by_pid.values():
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
