"""SIGHUP to `minicelery worker -c N`: a rolling replacement of its children, one slot at a time.

For each slot in turn: start a fresh child (it reads the current config and imports the current
task modules), wait until it is ready, then stop the old one gracefully (it finishes its task)
and wait until it has gone. N stay working throughout (N+1 for a moment). A fresh child that
dies before it is ready abandons the reload: the old children keep working.

A SIGHUP that arrives during a reload is neither lost nor a restart of the one under way: one
more reload follows it (any number of SIGHUPs meanwhile make one), said in the log. The slots
already replaced may have read the code deployed before that SIGHUP, so only a full reload after
it makes every child run what was deployed when it was sent (gunicorn, too, acts on every HUP).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .notify import Notifier
from .pool_children import Child, Children

log = logging.getLogger("minicelery.pool")


class RollingReload:
    def __init__(self, children: Children, notifier: Notifier, prepare: Callable[[], int | None]) -> None:
        self.children = children
        self.notifier = notifier
        self.prepare = prepare  # before a reload: re-read the settings; how many slots to replace (None: refuse)
        self.requested = False
        self.queue: list[int] = []  # slots still to replace in this reload
        self.current: int | None = None  # the slot being replaced now
        self.started: float | None = None
        self.again = False  # a SIGHUP came during this reload: another follows it

    @property
    def running(self) -> bool:
        return self.started is not None

    def request(self) -> None:
        """From the signal handler: a flag only (the log line comes from the loop)."""
        self.requested = True

    def step(self) -> None:
        """Move the reload on as far as it can go now."""
        if self.requested and not self.running:
            self.requested = False
            slots = self.prepare()
            if slots is None:
                return
            self._begin(slots)
        elif self.requested and not self.again:
            self.again = True
            log.info("reload requested during a reload: one more follows once this one is done")
        if not self.running:
            return
        current = self.current
        if current is not None:
            members = self.children.of_slot(current)
            fresh_ready = any(c.retiring is None and c.ready for c in members)
            olds = [c for c in members if c.retiring == "reload"]
            for old in olds if fresh_ready else []:  # the fresh child is ready: the old one may go
                if not old.asked_to_stop:
                    self.children.retire(old, "reload")
            if not fresh_ready or olds:
                return  # one slot at a time: wait for this one's fresh child, then its old one's exit
            self.current = None
        if not self.queue:
            self._finish(ok=True)
            return
        slot = self.current = self.queue.pop(0)
        for old in self.children.of_slot(slot):
            old.retiring = "reload"
        record = self.children.slots[slot]
        record.restarts["reloaded"] += 1
        record.restart_at = None  # (a restart that was due: the fresh child is it)
        self.children.spawn(slot)

    def _begin(self, slots: int) -> None:
        self.again = False
        log.info("reload: replacing %d worker children one at a time", slots)
        self.notifier.reloading()
        self.started = time.monotonic()
        self.queue = list(range(slots))

    def fresh_child_died(self, child: Child, how: str) -> bool:
        """Whether `child`, dead before it was ready, was this reload's fresh child (the reload
        is then abandoned; the slot's old child keeps working)."""
        if not (child.slot == self.current and child.fresh and not child.ready):
            return False
        log.error("reload stopped: the fresh worker child %d died before it was ready (%s)", child.pid, how)
        self.queue.clear()
        self._finish(ok=False)
        return True

    def _finish(self, *, ok: bool) -> None:
        started = self.started or time.monotonic()
        self.started = self.current = None
        for child in self.children.by_pid.values():
            if child.retiring == "reload" and not child.asked_to_stop:
                child.retiring = None  # its replacement failed: it keeps working
        log.info("reload %s after %.2f s", "done" if ok else "abandoned", time.monotonic() - started)
        self.notifier.ready()
