"""Prometheus metrics, and the HTTP endpoints /metrics, /healthz and /readyz.

Everything lives in a CollectorRegistry of the worker's own (no global state), served by
prometheus-client's WSGI app on a daemon thread. Labels stay low-cardinality: queue, task
name, outcome, exception type; never a task id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from .errors import BrokerError

log = logging.getLogger(__name__)

# From 100 µs (a claim on an idle queue) to 30 min (a long batch job).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)  # fmt: skip
OUTCOMES = (
    "succeeded", "failed", "retried", "timed_out", "cancelled", "lease_lost", "gone", "dead_lettered", "handed_back"
)  # fmt: skip


class QueueDepthCollector(Collector):
    """Reads queue depths from Redis at scrape time: one pipelined round trip per queue."""

    def __init__(self, depths: Callable[[str], dict[str, int]], queues: Iterable[str]) -> None:
        self.depths = depths
        self.queues = list(queues)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "minicelery_queue_depth", "Tasks in each state, read from Redis at scrape time", labels=["queue", "state"]
        )
        for queue in self.queues:
            try:
                depths = self.depths(queue)
            except BrokerError:
                continue  # Redis down: the scrape still answers; redis_errors_total says why
            for state in ("ready", "scheduled", "waiting", "running", "dead"):
                family.add_metric([queue, state], depths[state])
        yield family


class ScheduleCollector(Collector):
    """Each schedule's state, read from Redis at scrape time (one round trip per queue): every
    worker exports the same values, so `max by (schedule)` works whichever worker ran it."""

    def __init__(self, rows: Callable[[str], list[dict[str, Any]]], queues: Iterable[str]) -> None:
        self.rows = rows
        self.queues = list(queues)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["queue", "schedule"]
        last = GaugeMetricFamily(
            "minicelery_schedule_last_start_timestamp_seconds", "When a schedule's last run started", labels=labels
        )
        due = GaugeMetricFamily(
            "minicelery_schedule_next_due_timestamp_seconds", "When a schedule's next slot falls due", labels=labels
        )
        interval = GaugeMetricFamily(
            "minicelery_schedule_interval_seconds", "Seconds between a schedule's next two slots", labels=labels
        )
        paused = GaugeMetricFamily("minicelery_schedule_paused", "1 while a schedule is paused", labels=labels)
        for queue in self.queues:
            try:
                rows = self.rows(queue)
            except BrokerError:
                continue
            for row in rows:
                key = [queue, row["name"]]
                if row["last_start_ms"] is not None:
                    last.add_metric(key, row["last_start_ms"] / 1000)
                if row["next_due_ms"] is not None:
                    due.add_metric(key, row["next_due_ms"] / 1000)
                interval.add_metric(key, row["interval_ms"] / 1000)
                paused.add_metric(key, 1 if row["paused"] else 0)
        yield from (last, due, interval, paused)


@dataclass(frozen=True)
class TaskSeries:
    """One (queue, task)'s labelled children, looked up once: labels() costs ~3 µs a call, a
    third of the per-task metrics cost before this cache."""

    latency: Any
    run_time: Any
    outcomes: dict[str, Any]


def record_for_supervisor(directory: str) -> None:
    """In a child of `minicelery worker -c N`: every metric made from now on is kept in files in
    `directory` (prometheus-client's multiprocess mode), which the supervisor sums and serves."""
    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    WorkerMetrics.multiprocess = True


class WorkerMetrics:
    """The worker's metrics; `registry` is what /metrics serves.

    In a child of a supervisor (`multiprocess`, set by record_for_supervisor) the counters and
    histograms go to files the supervisor sums; tasks in progress, the start time and the queue
    depths are the supervisor's own series, so a child makes none of them."""

    multiprocess = False

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_latency = Histogram(
            "minicelery_queue_latency_seconds",
            "Seconds from when a task became due to when a worker started it",
            ["queue", "task"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.run_time = Histogram(
            "minicelery_task_run_seconds",
            "Seconds a task's function ran",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outcomes = Counter(
            "minicelery_task_outcomes",
            "Finished task runs by outcome; dead_lettered counts tasks put in the dead letters",
            ["task", "outcome"],
            registry=r,
        )
        self.failures = Counter(
            "minicelery_task_failures", "Failed task runs by exception type", ["task", "exception"], registry=r
        )
        self.contention = Counter(
            "minicelery_claim_contention",
            "Wake-ups that found nothing to claim (kind=wakeup) and late finishes rejected by token (kind=late_finish)",
            ["kind"], registry=r,
        )  # fmt: skip
        self.handoffs = Counter(
            "minicelery_handoffs",
            "Tasks handed straight to this worker while it waited idle: started with no claim",
            ["queue"], registry=r,
        )  # fmt: skip
        self.unknown_tasks = Counter(
            "minicelery_unknown_tasks",
            "Tasks whose name no task module of this worker registers, given back for a worker that has it",
            ["queue"], registry=r,
        )  # fmt: skip
        self.schedule_lag = Histogram(
            "minicelery_schedule_lag_seconds",
            "Seconds from a schedule's slot to the start of its run",
            ["schedule"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.schedule_missed = Counter(
            "minicelery_schedule_missed_slots",
            "Slots of a schedule given up by its catch-up policy (no run for them)",
            ["schedule"], registry=r,
        )  # fmt: skip
        self.in_progress: Gauge | None = None
        if not self.multiprocess:
            self.in_progress = Gauge("minicelery_tasks_in_progress", "Tasks running in this worker now", registry=r)
        self._series: dict[tuple[str, str], TaskSeries] = {}
        self.redis_errors = Counter("minicelery_redis_errors", "Redis calls that failed", registry=r)
        self.reconnects = Counter("minicelery_redis_reconnects", "Times the worker got Redis back", registry=r)
        self.unreplicated_results = Counter(
            "minicelery_results_unreplicated",
            "Results stored on the primary that fewer replicas than redis.min_replicas_acked acknowledged "
            "(redis.replicate_results): a failover could lose them, and those tasks would run again",
            registry=r,
        )
        self.info = Info("minicelery_worker", "This worker: version, queues, hostname", registry=r)
        if not self.multiprocess:
            start_time = Gauge("minicelery_worker_start_time_seconds", "Unix time the worker started", registry=r)
            start_time.set(time.time())
        for kind in ("wakeup", "late_finish"):
            self.contention.labels(kind)

    def series(self, queue: str, task: str) -> TaskSeries:
        found = self._series.get((queue, task))
        if found is None:
            found = self._series[(queue, task)] = TaskSeries(
                self.queue_latency.labels(queue, task),
                self.run_time.labels(task),
                {outcome: self.outcomes.labels(task, outcome) for outcome in OUTCOMES},
            )
        return found

    def count_running(self, running: Callable[[], int]) -> None:
        """tasks_in_progress is read at scrape time: nothing to update per task."""
        if self.in_progress is not None:
            self.in_progress.set_function(running)

    def expect_tasks(self, names: Iterable[str]) -> None:
        """Export every outcome of every registered task from the start, at 0: a rate() or a
        failure ratio then works from the first scrape instead of from a series' first event."""
        for name in names:
            for outcome in OUTCOMES:
                self.outcomes.labels(name, outcome)

    def watch_queues(self, depths: Callable[[str], dict[str, int]], queues: Iterable[str]) -> None:
        queues = list(queues)
        if not self.multiprocess:
            self.registry.register(QueueDepthCollector(depths, queues))
        for queue in queues:
            self.handoffs.labels(queue)  # at 0 from the start, like the outcomes
            self.unknown_tasks.labels(queue)

    def watch_schedules(self, rows: Callable[[str], list[dict[str, Any]]], queues: Iterable[str]) -> None:
        if not self.multiprocess:  # a supervisor's child: the supervisor reads them, once per scrape
            self.registry.register(ScheduleCollector(rows, queues))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class MetricsServer:
    """Serves /metrics, /healthz (the loop is alive) and /readyz (Redis reachable, tasks loaded)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        why_unhealthy: Callable[[], list[str]] = list,
    ):
        self.metrics_app = make_wsgi_app(registry)
        self.healthy, self.ready = healthy, ready
        self.why_unhealthy = why_unhealthy  # lines for a failing /healthz's body
        self.server: ThreadingWSGIServer | None = None

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        checks = {"/healthz": self.healthy, "/readyz": self.ready}
        if path in checks:
            ok = checks[path]()
            # The reasons are read after the check: a child that pinged in between leaves a
            # 503 that says only "not ok" (the next probe passes), never a 200 with reasons.
            why = [] if ok or path != "/healthz" else self.why_unhealthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else "".join(f"{line}\n" for line in ["not ok", *why]).encode()]
        return self.metrics_app(environ, start_response)  # type: ignore[no-any-return]

    def start(self, bind: str, port: int) -> int:
        """Start serving on a daemon thread; returns the port (useful when port=0)."""
        port = self.listen(bind, port)
        self.serve()
        return port

    def listen(self, bind: str, port: int) -> int:
        """Take the port now (so a taken port fails early), serve later with serve()."""
        self.server = make_server(bind, port, self._app, ThreadingWSGIServer, handler_class=_QuietHandler)
        return int(self.server.server_port)

    def serve(self) -> None:
        assert self.server is not None
        threading.Thread(target=self.server.serve_forever, name="minicelery-metrics", daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
