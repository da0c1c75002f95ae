"""Dramatiq with its Redis broker: one process, 8 threads (its default)."""

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)
dramatiq.set_broker(RedisBroker(url=URL))


@dramatiq.actor
def bump() -> None:
    r.incr("bench:done")


def enqueue(n: int) -> None:
    for _ in range(n):
        bump.send()


WORKER = ["dramatiq", "dramatiq_peer", "-p", "1", "-t", "8"]
