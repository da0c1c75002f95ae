"""One worker's cost per task with metrics on (recorded, served, scraped every second) vs off.

    .venv/bin/python bench/metrics_overhead.py [--tasks 20000] [--runs 3]

A private Redis; the same no-op task; the two modes alternate so drift hits both. Prints, per
run, throughput and this process's CPU time per task (all its threads: worker, heartbeat,
metrics server and the scraper; Redis excluded), then the ratios of the medians. CPU time is
the steadier figure on a shared VM.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request
from typing import Any

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.redis_server import RedisServer, free_port
from minicelery.settings import load_settings
from minicelery.worker import Worker


class TimedWorker(Worker):
    """Notes when the last result is stored: the drain ends there, not at the worker's exit
    (stopping the metrics server waits up to its 0.5 s poll, which is no per-task cost)."""

    def __init__(self, *args: Any, tasks: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = tasks
        self.drained = threading.Event()
        self.drained_at = (0.0, 0.0)  # (wall clock, CPU time)
        count = self.observer.count

        def counted(*args: Any) -> None:  # notes the moment the last result is counted
            count(*args)
            if self.counters.done == self.tasks:
                self.drained_at = (time.perf_counter(), time.process_time())
                self.drained.set()

        self.observer.count = counted  # type: ignore[method-assign]


def drain(app: Client, tasks: int, metrics_on: bool) -> tuple[float, float]:
    """(tasks/s, CPU µs per task) of one burst drain."""
    noop = app.tasks["noop"]
    app.start_many([noop(i) for i in range(tasks)])
    port = free_port()
    settings = load_settings(
        worker={"queues": [app.default_queue], "idle_block_max": 1},
        metrics={"enabled": metrics_on, "port": port},
        logging={"level": "WARNING"},
    )
    worker = TimedWorker(app, settings, tasks=tasks)

    def scrape() -> None:  # a Prometheus with scrape_interval 1s, until the drain ends
        while not worker.drained.wait(1.0):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                response.read()

    scraper = threading.Thread(target=scrape, daemon=True)
    if metrics_on:
        scraper.start()
    started, cpu = time.perf_counter(), time.process_time()
    worker.run(burst=True, install_signals=False)
    assert worker.counters.done == tasks, worker.counters
    elapsed, cpu = worker.drained_at[0] - started, worker.drained_at[1] - cpu
    return tasks / elapsed, cpu / tasks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with RedisServer() as server:
        app = Client(RedisBroker(JSONTransport(), url=server.url), default_queue="bench")

        @app.task
        def noop(i: int) -> int:
            return i

        rates: dict[bool, list[float]] = {True: [], False: []}
        cpus: dict[bool, list[float]] = {True: [], False: []}
        for run in range(args.runs):
            for metrics_on in (False, True):
                rate, cpu = drain(app, args.tasks, metrics_on)
                rates[metrics_on].append(rate)
                cpus[metrics_on].append(cpu)
                mode = "on " if metrics_on else "off"
                print(f"run {run + 1}: metrics {mode} {rate:6.0f} tasks/s {cpu:6.1f} µs CPU/task")
        rate_off, rate_on = statistics.median(rates[False]), statistics.median(rates[True])
        cpu_off, cpu_on = statistics.median(cpus[False]), statistics.median(cpus[True])
        print(f"median tasks/s: off {rate_off:.0f}, on {rate_on:.0f}; on/off = {rate_on / rate_off:.3f}")
        print(f"median CPU µs/task: off {cpu_off:.1f}, on {cpu_on:.1f}; on/off = {cpu_on / cpu_off:.3f}")


if __name__ == "__main__":
    main()
