"""The worker's one helper thread: renews the running task's lease, pings the systemd watchdog,
wakes the idle wait when a stop signal arrives, and stores results a busy worker held back
behind a task that runs long (Worker.store_held_results, every HELD_RESULTS_CHECK_EVERY).

A task within its time limit (plus one lease of margin) is healthy: its lease is renewed and the
watchdog is fed. A task stuck beyond that is not: renewals stop, so another worker reclaims it
after one lease, and the watchdog goes hungry, so systemd restarts this worker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BrokerError

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)

# How often to look for results held back behind a task that usually runs briefly but runs
# long this time (Worker.store_held_results stores them). A busy worker's results then wait at
# most about this long for a task they do not depend on.
HELD_RESULTS_CHECK_EVERY = 0.25


@dataclass(frozen=True)
class Running:
    """What the main thread is running now, as the heartbeat sees it."""

    queue: str
    task_id: str
    token: str
    started: float  # monotonic
    time_limit: float | None


class Heartbeat(threading.Thread):
    def __init__(self, worker: Worker) -> None:
        super().__init__(name="minicelery-heartbeat", daemon=True)
        self.worker = worker
        self.lease_ms = int(worker.settings.worker.lease_seconds * 1000)
        intervals = [worker.settings.worker.lease_seconds / 3]
        if worker.notifier.watchdog_interval is not None:
            intervals.append(worker.notifier.watchdog_interval)
        self.interval = min(intervals)
        self._finished = threading.Event()
        self._stop_seen = False
        self._reported_unhealthy = False

    def shutdown(self) -> None:
        self._finished.set()
        self.worker.signals.event.set()

    def run(self) -> None:
        signals = self.worker.signals
        next_beat = time.monotonic() + self.interval
        while not self._finished.is_set():
            pause = max(0.0, min(HELD_RESULTS_CHECK_EVERY, next_beat - time.monotonic()))
            # Once a stop is seen its event stays set: pace the loop on the other event instead.
            (self._finished if self._stop_seen else signals.event).wait(pause)
            if self._finished.is_set():
                return
            if signals.event.is_set() and not self._stop_seen:
                self._stop_seen = True
                self._on_stop()
                next_beat = 0.0  # at once
            self.worker.store_held_results()
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + self.interval

    def beat(self) -> None:
        healthy = self.worker.healthy()
        if healthy:
            self.worker.notifier.watchdog()
            self._reported_unhealthy = False
        else:
            if self.worker.running is not None:
                self.worker.end_stuck_task()  # exits the process where time limits are enforced
            if not self._reported_unhealthy:
                self._reported_unhealthy = True
                log.error(
                    "task %s is stuck past its time limit: stopped pinging the watchdog and renewing its lease",
                    self.worker.running.task_id if self.worker.running else "?",
                )
            return  # a stuck worker lets go of everything it holds: other workers reclaim it
        running = self.worker.running
        # The running task first, then those claimed in its batch but not run (or not stored) yet.
        leases = self.worker.held_leases()
        if running is not None:
            leases.insert(0, (running.queue, running.task_id, running.token))
        if not leases:
            return
        try:
            owned = self.worker.broker.renew_many(leases, self.lease_ms)
        except BrokerError as exc:
            log.warning("could not renew %d leases: %s", len(leases), exc)
            return
        if running is not None and not owned[0] and self.worker.running is running:
            log.warning("task %s lost its lease: another worker may run it again", running.task_id)

    def _on_stop(self) -> None:
        # INFO: a requested stop is normal operation (a deploy, the demo ending), not a problem.
        log.info(
            "stop requested: claiming nothing new; a running task gets %.1f s to finish "
            "(a second signal hands it back at once)",
            self.worker.settings.worker.shutdown_grace,
        )
        self.worker.notifier.stopping()
        try:
            self.worker.broker.wake_worker(self.worker.id)
        except BrokerError as exc:  # the main loop notices the stop within one idle block
            log.warning("could not wake the idle wait: %s", exc)
