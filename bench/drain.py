"""Drain throughput of one worker process by claim batch size, side by side in one run.

    .venv/bin/python bench/drain.py [--tasks 20000] [--runs 3] [--batch 1 16]

A private Redis; 20,000 tasks whose body is one Redis INCR (the body the issue's peer
comparison used), sent with start_many; then one in-process worker drains them. The batch
sizes alternate so drift hits all; prints each run, then medians and ratios to batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from collections.abc import Iterator

import redis

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.redis_server import RedisServer
from minicelery.settings import load_settings
from minicelery.worker import Worker


@contextlib.contextmanager
def incr_app() -> Iterator[Client]:
    """A private Redis and a Client whose one task, `bump`, INCRs a counter: the drain's body
    (also bench/calls_per_task.py's)."""
    with RedisServer() as server:
        counter = redis.Redis.from_url(server.url)
        app = Client(RedisBroker(JSONTransport(), url=server.url), default_queue="bench")

        @app.task
        def bump() -> int:
            return int(counter.incr("bench:counter"))

        yield app


def loaded_worker(app: Client, tasks: int, batch: int) -> Worker:
    """`tasks` bump tasks sent, and an in-process worker (claim batch `batch`) to drain them."""
    bump = app.tasks["bump"]
    app.start_many([bump() for _ in range(tasks)])
    settings = load_settings(
        worker={"queues": [app.default_queue], "idle_block_max": 1, "batch_size": batch},
        metrics={"enabled": False},
        logging={"level": "WARNING"},
    )
    return Worker(app, settings)


def drain(app: Client, tasks: int, batch: int) -> tuple[float, float]:
    """(tasks/s, the worker's Redis round trips per task) of one burst drain."""
    worker = loaded_worker(app, tasks, batch)
    trips = _count_round_trips(app.broker)
    started = time.perf_counter()
    try:
        worker.run(burst=True, install_signals=False)
    finally:
        for name in _COUNTED:
            delattr(app.broker, name)  # back to the class's own methods
    elapsed = time.perf_counter() - started
    assert worker.counters.done == tasks, worker.counters
    return tasks / elapsed, trips[0] / tasks


_COUNTED = ("claim", "finish", "finish_many", "renew_many", "wait_for_work")


def _count_round_trips(broker: RedisBroker) -> list[int]:
    """Count the broker calls that each cost one round trip (a script, or one pipeline)."""
    count = [0]
    for name in _COUNTED:
        original = getattr(broker, name)

        def counted(*args: object, _original: object = original, **kwargs: object) -> object:
            count[0] += 1
            return _original(*args, **kwargs)  # type: ignore[operator]

        setattr(broker, name, counted)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with incr_app() as app:
        rates: dict[int, list[float]] = {b: [] for b in args.batch}
        for run in range(args.runs):
            for batch in args.batch:
                rate, calls = drain(app, args.tasks, batch)
                rates[batch].append(rate)
                print(f"run {run + 1}: batch {batch:4d}: {rate:7.0f} tasks/s, {calls:.2f} round trips per task")
        base = statistics.median(rates[args.batch[0]])
        for batch in args.batch:
            median = statistics.median(rates[batch])
            print(f"median batch {batch:4d}: {median:7.0f} tasks/s ({median / base:.2f}x batch {args.batch[0]})")


if __name__ == "__main__":
    main()
