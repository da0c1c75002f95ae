"""The worker's upkeep beside running tasks: sweeping children whose parents were never
started, and giving back tasks whose name this worker does not know."""

from __future__ import annotations

import logging

from ..broker import ORPHAN_SWEEP_BATCH, RedisBroker
from ..errors import BrokerError
from ..metrics import WorkerMetrics
from ..records import Claim, Outcome, ScriptStatus
from ..settings import WorkerSettings

log = logging.getLogger("minicelery.worker")

# A task whose name this worker lacks is given back to run this much later (or sooner: never
# later than the grace allows), for a worker that has it.
UNKNOWN_TASK_RETRY_MS = 5000


class Upkeep:
    def __init__(self, broker: RedisBroker, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self.broker = broker
        self.settings = settings
        self.metrics = metrics
        self._orphans_due_at = 0.0  # monotonic: the next orphan sweep (at once on start-up)

    def sweep_orphans_if_due(self, now: float) -> None:
        """Dead-letter the tasks that have waited worker.orphan_ttl for parents nobody started
        (scripts/orphans.lua). Once per lease period, like the idle sweep, but busy or idle: one
        call per queue per period, never one per task. Again at once while a batch came back full."""
        if now < self._orphans_due_at:
            return
        self._orphans_due_at = now + self.settings.lease_seconds
        ttl = self.settings.orphan_ttl
        for queue in self.settings.queues:
            swept = self.broker.sweep_orphans(queue, ttl)
            if swept:
                log.warning(
                    "dead-lettered %d task(s) on queue %s whose parents were never started within "
                    "orphan_ttl (%g s): %s",
                    len(swept), queue, ttl, " ".join(swept),
                )  # fmt: skip
            if len(swept) >= ORPHAN_SWEEP_BATCH:
                self._orphans_due_at = 0.0

    def defer_unknown(self, claim: Claim, outcome: Outcome) -> bool:
        """A task named for no task this worker has: give it back for a worker that has it (a
        rolling deploy sends new tasks before every worker runs the new code), until
        unknown_task_grace has passed since the first worker did so; then it is dead-lettered
        like any failure. True if it was given back (or is no longer ours)."""
        grace = self.settings.unknown_task_grace
        grace_ms = int(grace * 1000)
        if grace_ms <= 0:
            return False
        try:
            status, first_ms = self.broker.defer(
                claim.queue, claim.id, claim.token, min(UNKNOWN_TASK_RETRY_MS, grace_ms), grace_ms
            )
        except BrokerError as exc:
            log.warning("task %s: could not give back the unknown task %r: %s", claim.id, outcome.name, exc)
            return True  # its lease expires and it is claimed again
        if status is ScriptStatus.EXPIRED:
            log.warning(
                "task %s: no worker ran task %r within unknown_task_grace (%g s): dead-lettered",
                claim.id, outcome.name, grace,
            )  # fmt: skip
            return False
        if status is ScriptStatus.DEFERRED:
            self.metrics.unknown_tasks.labels(claim.queue).inc()
            waited = max(0.0, (claim.now_ms - first_ms) / 1000)
            log.warning(
                "task %s: task %r is not registered in this worker; given back for a worker that has it "
                "(first given back %.0f s ago; dead-lettered after unknown_task_grace, %g s)",
                claim.id, outcome.name, waited, grace,
            )  # fmt: skip
        return True
