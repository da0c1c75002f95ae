"""The worker's one helper thread: renews the running task's lease, pings the systemd watchdog,
reacts to a stop signal, and stores results a busy worker held back behind a task that runs
long (every HELD_RESULTS_CHECK_EVERY).

A task within its time limit (plus one lease of margin) is healthy: its lease is renewed and the
watchdog is fed. A task stuck beyond that is ended by its host (HeartbeatHost.end_stuck_task);
where that cannot run, renewals stop, so another worker reclaims it after one lease, and the
watchdog goes hungry, so systemd restarts this worker.

The thread sees the worker only through HeartbeatHost: what it needs, nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from ..errors import BrokerError
from ..records import Lease, Running, ScriptStatus

log = logging.getLogger("minicelery.heartbeat")

# While it holds tasks, the heartbeat renews their leases at least this often: that is how a
# worker learns that a task it runs (or holds, not started) was cancelled (renew.lua).
CANCEL_CHECK_EVERY = 1.0

# How often to look for results held back behind a task that usually runs briefly but runs
# long this time (HeartbeatHost.store_held_results stores them). A busy worker's results then
# wait at most about this long for a task they do not depend on.
HELD_RESULTS_CHECK_EVERY = 0.25


class HeartbeatHost(Protocol):
    """What the heartbeat thread may ask of the worker (each safe to call from that thread)."""

    @property
    def stop_event(self) -> threading.Event:
        """Set on the first stop signal."""
        ...

    def running_task(self) -> Running | None: ...

    def healthy(self) -> bool: ...

    def held_leases(self) -> list[Lease]:
        """Leases of tasks claimed but not running, or run but not stored yet."""
        ...

    def renew(self, leases: list[Lease]) -> list[ScriptStatus]:
        """Renew these leases: OK, LATE (no longer this worker's) or CANCELLED each."""
        ...

    def cancelled(self, lease: Lease) -> None:
        """This task was cancelled: interrupt it if it runs; do not start it if it waits."""
        ...

    def store_held_results(self) -> None: ...

    def end_stuck_task(self) -> None:
        """The running task is past its limit and will not stop (may end the process)."""
        ...

    def on_stop(self) -> None:
        """A stop was requested: tell systemd and wake the idle wait."""
        ...

    def watchdog(self) -> None: ...


class Heartbeat(threading.Thread):
    def __init__(self, host: HeartbeatHost, interval: float, shutdown_grace: float) -> None:
        super().__init__(name="minicelery-heartbeat", daemon=True)
        self.host = host
        self.interval = interval
        self.shutdown_grace = shutdown_grace
        self._finished = threading.Event()
        self._stop_seen = False
        self._reported_unhealthy = False

    def shutdown(self) -> None:
        self._finished.set()
        self.host.stop_event.set()

    def run(self) -> None:
        stop = self.host.stop_event
        next_beat = time.monotonic() + self.interval
        while not self._finished.is_set():
            pause = max(0.0, min(HELD_RESULTS_CHECK_EVERY, next_beat - time.monotonic()))
            # Once a stop is seen its event stays set: pace the loop on the other event instead.
            (self._finished if self._stop_seen else stop).wait(pause)
            if self._finished.is_set():
                return
            if stop.is_set() and not self._stop_seen:
                self._stop_seen = True
                # INFO: a requested stop is normal operation (a deploy, the demo ending), not a problem.
                log.info(
                    "stop requested: claiming nothing new; a running task gets %.1f s to finish "
                    "(a second signal hands it back at once)",
                    self.shutdown_grace,
                )
                self.host.on_stop()
                next_beat = 0.0  # at once
            self.host.store_held_results()
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + self.interval

    def beat(self) -> None:
        host = self.host
        if host.healthy():
            host.watchdog()
            self._reported_unhealthy = False
        else:
            running = host.running_task()
            if running is not None:
                host.end_stuck_task()  # exits the process where time limits are enforced
            if not self._reported_unhealthy:
                self._reported_unhealthy = True
                log.error(
                    "task %s is stuck past its time limit: stopped pinging the watchdog and renewing its lease",
                    running.task_id if running else "?",
                )
            return  # a stuck worker lets go of everything it holds: other workers reclaim it
        running = host.running_task()
        # The running task first, then those claimed in its batch but not run (or not stored) yet.
        leases = host.held_leases()
        if running is not None:
            leases.insert(0, Lease(running.queue, running.task_id, running.token))
        if not leases:
            return
        try:
            statuses = host.renew(leases)
        except BrokerError as exc:
            log.warning("could not renew %d leases: %s", len(leases), exc)
            return
        for lease, status in zip(leases, statuses, strict=True):
            if status is ScriptStatus.CANCELLED:
                host.cancelled(lease)
        if running is not None and statuses[0] is ScriptStatus.LATE and host.running_task() is running:
            log.warning("task %s lost its lease: another worker may run it again", running.task_id)
