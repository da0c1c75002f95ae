"""What the worker tells the world: counters, the outcome log line, metrics, systemd STATUS,
and whether it is healthy.

Counting is called from the main thread and, for results it stores, from the heartbeat thread:
the counters are guarded by one lock.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..broker import BLOCKING_SOCKET_SLACK, RedisBroker
from ..errors import ConfigError
from ..metrics import MetricsServer, WorkerMetrics
from ..notify import Notifier
from ..records import Claim, Outcome, Running, ScriptStatus
from ..settings import Settings

log = logging.getLogger("minicelery.worker")

# The task label for a name no task module registered: a client can send any name, and each
# would otherwise become a new metrics series.
UNKNOWN_TASK_LABEL = "(unknown)"
# Finishes that recorded nothing: the task was cancelled, another run owns it (lease lost), or
# Redis no longer has it. Such a run is neither done nor failed.
_NOT_RECORDED = frozenset({ScriptStatus.CANCELLED, ScriptStatus.LATE, ScriptStatus.GONE})

# A busy worker tells systemd which task it runs at most this often (seconds).
PER_TASK_STATUS_EVERY = 1.0


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    retried: int = 0
    late_finishes: int = 0
    gone_finishes: int = 0
    wasted_wakeups: int = 0
    handed_back: int = 0


class Observer:
    def __init__(
        self, tasks: Mapping[str, Any], settings: Settings, notifier: Notifier, metrics: WorkerMetrics
    ) -> None:
        self.tasks = tasks
        self.settings = settings
        self.notifier = notifier
        self.metrics = metrics
        self.counters = Counters()
        self._lock = threading.Lock()
        self.loop_alive_at = time.monotonic()  # the main loop turned (or backed off) then
        self._status_per_task = False  # the last status sent named the running task
        self._status_sent_at = -math.inf

    # --- per run -------------------------------------------------------------------------------

    def count_all(self, finished: list[tuple[Claim, Outcome]], statuses: list[ScriptStatus]) -> None:
        for (claim, outcome), status in zip(finished, statuses, strict=True):
            self.count(claim, outcome, status)

    def count(self, claim: Claim, outcome: Outcome, status: ScriptStatus) -> None:
        with self._lock:
            if status in _NOT_RECORDED:
                pass  # counted neither done nor failed: this run's outcome was not kept
            elif outcome.succeeded:
                self.counters.done += 1
            elif status is ScriptStatus.RETRY:
                self.counters.retried += 1
            else:
                self.counters.failed += 1
            if status is ScriptStatus.LATE:
                self.counters.late_finishes += 1
            elif status is ScriptStatus.GONE:
                self.counters.gone_finishes += 1
        if status is ScriptStatus.LATE:
            self.metrics.contention.labels("late_finish").inc()
            log.warning("task %s: late finish rejected (its lease was reclaimed; another run owns it)", claim.id)
        elif status is ScriptStatus.CANCELLED:
            log.info("task %s: cancelled while it ran; this run's outcome is dropped", claim.id)
        elif status is ScriptStatus.GONE:
            log.warning(
                "task %s: finished, but Redis no longer has the task (purged, or Redis lost its data: "
                "a restart without persistence or a flush); its result is dropped",
                claim.id,
            )
        if log.isEnabledFor(logging.INFO):  # (building the line costs more than the check)
            self._log_outcome(claim, outcome, status)
        if self.settings.metrics.enabled:  # per-task histograms are the costly part; skip when unserved
            self._observe(claim, outcome, status)

    def handed_back(self, name: str) -> None:
        """A running task was interrupted and handed back (the worker is stopping now)."""
        with self._lock:
            self.counters.handed_back += 1
        self.metrics.outcomes.labels(self.label(name), "handed_back").inc()

    def cancelled_unstarted(self, name: str) -> None:
        """A task claimed here was cancelled before it started, and was not run."""
        self.metrics.outcomes.labels(self.label(name), "cancelled").inc()

    def wasted_wakeup(self) -> None:
        self.counters.wasted_wakeups += 1  # (main thread only)
        self.metrics.contention.labels("wakeup").inc()

    def label(self, name: str) -> str:
        """A task name as a metrics label: only registered names (see UNKNOWN_TASK_LABEL)."""
        return name if name in self.tasks else UNKNOWN_TASK_LABEL

    def _observe(self, claim: Claim, outcome: Outcome, status: ScriptStatus) -> None:
        m = self.metrics
        task = self.label(outcome.name)
        series = m.series(claim.queue, task)
        series.latency.observe(max(0, claim.now_ms - claim.due_ms) / 1000)
        series.run_time.observe(outcome.duration)
        series.outcomes[outcome_kind(outcome, status)].inc()
        if not outcome.succeeded and status not in _NOT_RECORDED:
            m.failures.labels(task, outcome.error_type or "?").inc()
            if status is ScriptStatus.OK:  # failed for good: finish.lua put it in the dead-letter set
                series.outcomes["dead_lettered"].inc()

    def _log_outcome(self, claim: Claim, outcome: Outcome, status: ScriptStatus) -> None:
        kind = outcome_kind(outcome, status)
        result = kind if outcome.succeeded else f"{kind} ({_one_line(outcome)})"
        if status is ScriptStatus.LATE:
            result += ", rejected: lease lost"
        elif status is ScriptStatus.OK and not outcome.succeeded:
            result += ", dead-lettered"
        log.info(
            "task %s name=%s queue=%s attempt=%d outcome=%s duration=%.3fs",
            claim.id, outcome.name, claim.queue, claim.attempts, result, outcome.duration,
        )  # fmt: skip
        if outcome.error is not None:
            # The traceback: a warning when the task failed for good, detail when it runs again.
            level = logging.WARNING if status is ScriptStatus.OK else logging.DEBUG
            if log.isEnabledFor(level):
                trace = "".join(traceback.format_exception(outcome.error)).rstrip()
                log.log(level, "task %s name=%s failed:\n%s", claim.id, outcome.name, trace)

    # --- status and health ---------------------------------------------------------------------

    def status(self, state: str = "idle", *, per_task: bool = False) -> None:
        """Tell systemd what the worker does (`systemctl status`). Naming each running task is
        throttled while the worker stays busy: every status is a datagram to PID 1, and one per
        task cost the worker 21 µs of CPU per task, half again a no-op task's own 40 µs. Any
        other status (idle, waiting for Redis) goes out at once."""
        if not self.notifier.enabled:
            return
        now = time.monotonic()
        if per_task and self._status_per_task and now - self._status_sent_at < PER_TASK_STATUS_EVERY:
            return
        self._status_per_task, self._status_sent_at = per_task, now
        self.notifier.status(f"{state}, {self.counters.done} done, {self.counters.failed} failed")

    def healthy(self, running: Running | None, max_block: float) -> bool:
        """Alive: a running task within its limit (plus a lease), or the loop turned recently."""
        margin = self.settings.worker.lease_seconds
        if running is not None:
            return running.time_limit is None or time.monotonic() - running.started < running.time_limit + margin
        quiet = max_block + BLOCKING_SOCKET_SLACK + self.settings.worker.reconnect_max_delay + margin
        return time.monotonic() - self.loop_alive_at < quiet

    def serve_metrics(self, healthy: Callable[[], bool], ready: Callable[[], bool]) -> MetricsServer | None:
        config = self.settings.metrics
        if not config.enabled or self.metrics.multiprocess:  # a supervisor's child: it serves them
            return None
        server = MetricsServer(self.metrics.registry, healthy, ready)
        try:
            port = server.start(config.bind, config.port)
        except OSError as exc:
            where = f"{config.bind}:{config.port}"
            if "port" in config.model_fields_set:  # set in the file, environment or code: honour it
                raise ConfigError(f"invalid setting metrics.port: cannot listen on {where}: {exc}") from exc
            # Only the default is taken, most likely by another worker on this host (the original
            # README runs several): take a free port rather than refuse to start.
            port = server.start(config.bind, 0)
            log.warning(
                "default metrics port %s is taken (%s); metrics on http://%s:%d/metrics instead "
                "(set metrics.port to choose one)",
                where, exc.strerror, config.bind, port,
            )  # fmt: skip
            return server
        log.info("metrics on http://%s:%d/metrics", config.bind, port)
        return server

    def stopped(self, worker_id: str, code: int) -> None:
        c = self.counters
        log.log(
            logging.WARNING if code else logging.INFO,
            "worker %s stopped: %d done, %d failed, %d wasted wake-ups, %d late finishes, "
            "%d finishes of tasks Redis no longer had, exit %d",
            worker_id, c.done, c.failed, c.wasted_wakeups, c.late_finishes, c.gone_finishes, code,
        )  # fmt: skip


def build_metrics(
    tasks: Mapping[str, Any], broker: RedisBroker, queues: list[str], running: Callable[[], Running | None]
) -> WorkerMetrics:
    """The worker's metrics: every task's outcomes at 0, queue depths read at scrape time."""
    from .. import __version__

    metrics = WorkerMetrics()
    metrics.watch_queues(broker.depths, queues)
    metrics.expect_tasks(tasks)
    metrics.count_running(lambda: 0 if running() is None else 1)
    metrics.info.info({"version": __version__, "queues": ",".join(queues), "hostname": socket.gethostname()})
    return metrics


def outcome_kind(outcome: Outcome, status: ScriptStatus) -> str:
    """The outcome label of one run. A run whose finish Redis refused (its lease lost, or the
    task gone) is counted neither succeeded nor failed: the task's outcome is another run's, or
    none. A failed or timed_out run whose finish was recorded left its task in the dead-letter
    set, which `dead_lettered` counts besides; a retried run is scheduled to run again."""
    if status is ScriptStatus.CANCELLED:
        return "cancelled"
    if status is ScriptStatus.LATE:
        return "lease_lost"
    if status is ScriptStatus.GONE:
        return "gone"
    if outcome.succeeded:
        return "succeeded"
    if status is ScriptStatus.RETRY:
        return "retried"
    return "timed_out" if outcome.timed_out else "failed"


def _one_line(outcome: Outcome) -> str:
    """`ValueError: boom` for the outcome log line (the message cut to one short line)."""
    message = str(outcome.error).strip() if outcome.error is not None else ""
    if not message:
        return outcome.error_type or "?"
    return f"{outcome.error_type}: {message.splitlines()[0][:300]}"
