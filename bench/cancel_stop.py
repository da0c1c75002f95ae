"""How long a running task takes to stop after `handle.cancel()`: one worker process, a task
that sleeps until interrupted, cancelled N times; the time from the cancel() call to the
task's `finally` block (both on this machine's clock). See bench/README.md.

    .venv/bin/python bench/cancel_stop.py [--tries 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from run import Bench, wait_for

from minicelery.redis_server import RedisServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tries", type=int, default=20)
    args = parser.parse_args()
    with RedisServer() as server:
        bench = Bench(server)
        queue = bench.queue("cancel")
        app = bench.app(queue)
        stops = []
        with bench.workers(queue, 1):
            bench.wait_ready(queue, 1)
            for _ in range(args.tries):
                key = f"cancel:{uuid.uuid4().hex}"
                handle = app.tasks["sleep_until_cancelled"](key).start()
                wait_for(lambda: bench.r.exists(f"{key}:started"), 30)  # noqa: B023
                cancelled_at = time.time()
                assert handle.cancel()
                wait_for(lambda: bench.r.exists(f"{key}:stopped"), 30)  # noqa: B023
                stops.append(float(bench.r.get(f"{key}:stopped")) - cancelled_at)  # type: ignore[arg-type]
    print(f"cancel -> task stopped, {len(stops)} tries: median {statistics.median(stops):.3f} s, "
          f"max {max(stops):.3f} s, min {min(stops):.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
