"""/metrics, /healthz and /readyz of `minicelery worker -c N`, served by the supervisor.

/healthz is 200 while every child pings (a child stuck past its time limit stops pinging);
/readyz while every slot has a ready child. /metrics has the pool's own series, per slot (a
child's place, 0..N-1, kept by its replacements: a bounded label, unlike a PID), and the queue
depths, read once per scrape by the supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import ConfigError
from .metrics import MetricsServer, QueueDepthCollector
from .supervisor import Supervisor

log = logging.getLogger("minicelery.pool")


class PoolCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sup = self.supervisor
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
        children = list(sup.children.values())
        for slot, record in enumerate(sup.slots):
            mine = [c for c in children if c.slot == slot]
            label = str(slot)
            ready.add_metric([label], float(any(c.ready and c.retiring is None for c in mine)))
            busy.add_metric([label], float(sum(c.busy for c in mine)))
            tasks.add_metric([label], record.done + record.failed + sum(c.done + c.failed for c in mine))
            for reason, count in record.restarts.items():
                restarts.add_metric([label, reason], count)
        yield from (ready, busy, tasks, restarts)


def serve_pool_metrics(supervisor: Supervisor) -> MetricsServer | None:
    """Take the metrics port now (a taken port set in the config exits 78 before any fork); serve
    once the children are forked (the supervisor forks only while it has no thread)."""
    from .broker import RedisBroker

    settings = supervisor.settings
    config = settings.metrics
    if not config.enabled:
        return None
    registry = CollectorRegistry()
    registry.register(PoolCollector(supervisor))
    server = MetricsServer(registry, supervisor.healthy, supervisor.all_ready)
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
    supervisor.close_in_children.append(server.server.fileno())

    def start() -> None:
        broker = RedisBroker.from_settings(settings)  # connects at the first scrape, after the forks
        registry.register(QueueDepthCollector(broker.depths, settings.worker.queues))
        server.serve()
        log.info("metrics for %d worker children on http://%s:%d/metrics", supervisor.n, config.bind, port)

    supervisor.after_forks.append(start)
    return server
