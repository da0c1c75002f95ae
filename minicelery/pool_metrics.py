"""/metrics, /healthz and /readyz of `minicelery worker -c N`, served by the supervisor.

/healthz is 200 while every child pings (a child stuck past its time limit stops pinging; a 503
names each silent child in its body);
/readyz while every slot has a ready child. /metrics has:

- the children's counters and histograms, summed: each child writes its own file in a private
  directory (prometheus-client's multiprocess mode; $RUNTIME_DIRECTORY/metrics under systemd,
  else a temporary directory; emptied at start, removed at exit). When a child exits its files
  are folded into one archive file per type and deleted, so nothing is lost or reset when a
  child is replaced, and the files (and the cost of a scrape) do not grow with every respawn;
- the pool's own series, per slot (a child's place, 0..N-1, kept by its replacements: a
  bounded label, unlike a PID): ready, busy, tasks run, restarts by reason;
- tasks in progress (the sum of the children's last pings, at most a second old), the
  supervisor's start time and info, and the queue depths and schedules, read once per scrape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from .errors import ConfigError
from .metrics import MetricsServer, QueueDepthCollector, ScheduleCollector
from .supervisor import Supervisor

log = logging.getLogger("minicelery.pool")


# Types whose values add up across processes: a gone child's are folded into an archive file.
ARCHIVED_TYPES = ("counter", "histogram")


class ChildMetricFiles(Collector):
    """The children's metric files, summed at scrape time; a gone child's folded into the archive."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Lock()  # a scrape never sees a child's values twice or not at all
        self._files = MultiProcessCollector(None, path=directory)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            metrics = list(self._files.collect())
        yield from metrics

    def child_exited(self, pid: int) -> None:
        with self._lock:
            mark_process_dead(pid, self.directory)  # live gauges (none today; harmless)
            for typ in ARCHIVED_TYPES:
                path = os.path.join(self.directory, f"{typ}_{pid}.db")
                if not os.path.exists(path):
                    continue
                archive = MmapedDict(os.path.join(self.directory, f"{typ}_archive.db"))
                try:
                    for key, value, *_ in MmapedDict.read_all_values_from_file(path):
                        archive.write_value(key, archive.read_value(key)[0] + value, 0.0)
                finally:
                    archive.close()
                os.remove(path)


def metrics_directory() -> str:
    """A private, empty directory for the children's metric files."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    try:
        if runtime:
            path = Path(runtime) / "metrics"
            shutil.rmtree(path, ignore_errors=True)  # a previous run's files would be summed in
            path.mkdir(mode=0o700)
            return str(path)
        return tempfile.mkdtemp(prefix="minicelery-metrics-")
    except OSError as exc:
        raise ConfigError(
            f"worker.concurrency > 1 with metrics needs a writable directory for the children's metrics "
            f"($RUNTIME_DIRECTORY, else {tempfile.gettempdir()}; in a container, a tmpfs on /tmp): {exc}"
        ) from exc


class PoolCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        from . import __version__

        sup = self.supervisor
        queues = ",".join(sup.settings.worker.queues)
        info = InfoMetricFamily("minicelery_worker", "This worker: version, queues, hostname")
        info.add_metric([], {"version": __version__, "queues": queues, "hostname": socket.gethostname()})
        yield info
        yield GaugeMetricFamily("minicelery_worker_start_time_seconds", "Unix time the worker started", self.started)
        busy_now = sum(c.busy for c in sup.children.by_pid.values())
        yield GaugeMetricFamily("minicelery_tasks_in_progress", "Tasks running in this worker now", busy_now)
        yield GaugeMetricFamily("minicelery_pool_concurrency", "Worker children this pool runs", value=sup.n)
        ready = GaugeMetricFamily("minicelery_pool_child_ready", "1 while the slot's child is ready", labels=["slot"])
        busy = GaugeMetricFamily("minicelery_pool_child_busy", "1 while the slot's child runs a task", labels=["slot"])
        tasks = CounterMetricFamily(
            "minicelery_pool_child_tasks", "Tasks run (done or failed) by the slot's children", labels=["slot"]
        )
        restarts = CounterMetricFamily(
            "minicelery_pool_child_restarts",
            "Children of the slot replaced: died, recycled (max tasks or memory), reloaded (SIGHUP)",
            labels=["slot", "reason"],
        )
        children = list(sup.children.by_pid.values())
        for slot, record in enumerate(sup.children.slots):
            mine = [c for c in children if c.slot == slot]
            label = str(slot)
            if slot < sup.n:  # (a slot above a concurrency lowered by a reload keeps only its counts)
                ready.add_metric([label], float(any(c.ready and c.retiring is None for c in mine)))
                busy.add_metric([label], float(sum(c.busy for c in mine)))
            tasks.add_metric([label], record.done + record.failed + sum(c.done + c.failed for c in mine))
            for reason, count in record.restarts.items():
                restarts.add_metric([label, reason], count)
        yield from (ready, busy, tasks, restarts)


def serve_pool_metrics(supervisor: Supervisor) -> Callable[[], None]:
    """Take the metrics port now (a taken port set in the config exits 78 before any fork); serve
    once the children are forked (the supervisor forks only while it has no thread). Returns
    what to call when the supervisor is done (removes the metric files)."""
    from .broker import RedisBroker

    settings = supervisor.settings
    config = settings.metrics
    if not config.enabled:
        return lambda: None
    directory = supervisor.children.metrics_dir = metrics_directory()
    files = ChildMetricFiles(directory)
    supervisor.children.on_exit.append(files.child_exited)
    registry = CollectorRegistry()
    registry.register(files)
    registry.register(PoolCollector(supervisor))
    server = MetricsServer(
        registry, supervisor.relay.healthy, supervisor.relay.all_ready, why_unhealthy=supervisor.relay.unhealthy
    )
    try:
        port = server.listen(config.bind, config.port)
    except OSError as exc:
        if "port" in config.model_fields_set:
            raise ConfigError(
                f"invalid setting metrics.port: cannot listen on {config.bind}:{config.port}: {exc}"
            ) from exc
        port = server.listen(config.bind, 0)
        log.warning("default metrics port %d is taken (%s); using %d", config.port, exc.strerror, port)
    assert server.server is not None
    supervisor.children.close_in_children.append(server.server.fileno())

    def start() -> None:
        from .periodic import schedule_rows

        broker = RedisBroker.from_settings(settings)  # connects at the first scrape, after the forks
        registry.register(QueueDepthCollector(broker.depths, settings.worker.queues))
        registry.register(ScheduleCollector(lambda queue: schedule_rows(broker, queue), settings.worker.queues))
        server.serve()
        log.info("metrics for %d worker children on http://%s:%d/metrics", supervisor.n, config.bind, port)

    supervisor.after_forks.append(start)

    def done() -> None:
        server.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(directory)

    return done
