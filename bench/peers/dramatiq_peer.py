"""Dramatiq with its Redis broker: one process, 8 threads (its default). Delayed messages are
held in the worker's memory until due."""

import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)
dramatiq.set_broker(RedisBroker(url=URL))


@dramatiq.actor
def bump() -> None:
    r.incr("bench:done")


@dramatiq.actor
def stamp(sent: float) -> None:
    r.rpush("bench:out", time.time() - sent)


def enqueue(n: int) -> None:
    for _ in range(n):
        bump.send()


def send_stamp() -> None:
    stamp.send(time.time())


def schedule(due: float) -> None:
    stamp.send_with_options(args=(due,), delay=int((due - time.time()) * 1000))


WORKER = ["dramatiq", "dramatiq_peer", "-p", "1", "-t", "8"]
# Its multi-process mode: 2 worker processes (8 threads each, as above).
POOL_WORKER = ["dramatiq", "dramatiq_peer", "-p", "2", "-t", "8"]
