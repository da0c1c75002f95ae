"""Workers whose clocks are wrong (run under faketime): only Redis's clock decides due times
and lease expiry, so a skewed worker neither runs a task early nor loses or steals a lease.
"""

from __future__ import annotations

import time

import pytest
from conftest import Workers, require_tool, wait_until

from minicelery import Client


@pytest.mark.parametrize("skew", ["+1d", "-1d"])
def test_a_skewed_worker_runs_scheduled_tasks_at_their_redis_time(app: Client, workers: Workers, skew: str) -> None:
    faketime = require_tool("faketime", "apt-get install faketime")
    proc = workers.start(wrapper=[faketime, "-f", skew])
    workers.wait_ready(proc)
    assert "ready on queues" in workers.log(proc)
    seconds, micros = app.broker.redis.time()
    due = seconds + micros / 1e6 + 1.5
    handles = [app.tasks["redis_time"]().wait(1.5) for _ in range(5)]
    started = [h.result(timeout=30) for h in handles]
    assert all(t >= due - 0.01 for t in started), [round(t - due, 3) for t in started]  # never early
    assert max(started) - due < 5  # and not a day late either


def test_a_worker_whose_clock_runs_a_day_ahead_steals_no_lease(app: Client, workers: Workers) -> None:
    """Were lease expiry judged by the worker's clock, every lease would look a day old to it."""
    faketime = require_tool("faketime", "apt-get install faketime")
    holder = workers.start(MINICELERY_WORKER__LEASE_SECONDS="1")
    workers.wait_ready(holder)
    handle = app.tasks["marked_sleep"](f"skew-{time.monotonic_ns()}", 3).start()  # three leases long
    wait_until(lambda: handle.state == "running", 10, "the task to start")
    ahead = workers.start(wrapper=[faketime, "-f", "+1d"], MINICELERY_WORKER__LEASE_SECONDS="1")
    workers.wait_ready(ahead)
    assert handle.result(timeout=30).startswith("skew-")
    assert workers.log(ahead)[:10] != workers.log(holder)[:10]  # the skew is real: its log is a day ahead
    info = f"minicelery:{{{app.default_queue}}}:info"
    assert app.broker.redis.hget(info, f"{handle.id}:a") is None  # claimed once (else kept): never stolen
    assert app.broker.redis.hget(info, f"{handle.id}:l") is None  # its lease never lapsed
    assert "late finish" not in workers.log(holder) + workers.log(ahead)
