"""A worker's estimate of the Redis clock (worker/clock.py), fed replies as Redis gives them."""

from __future__ import annotations

import time

from minicelery.records import Idle
from minicelery.worker.clock import QueueClock, RedisClock


def test_a_redis_clock_that_stepped_back_does_not_make_the_worker_claim_again_at_once() -> None:
    clock = QueueClock(RedisClock())
    redis_ms = 1_800_000_000_000
    clock.learn(Idle(next_due_in_ms=None, now_ms=redis_ms))  # the estimate: Redis at redis_ms now
    # Then Redis's clock steps back 300 ms (NTP, or a failover to a host behind), and it says
    # a task is due in 50 ms.
    stepped_back = redis_ms - 300
    clock.learn(Idle(next_due_in_ms=50, now_ms=stepped_back))
    assert clock.next_check > time.monotonic()  # not "due already": no claim loop until then
    assert clock.next_check <= time.monotonic() + 0.05
