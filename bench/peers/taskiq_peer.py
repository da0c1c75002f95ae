"""taskiq with taskiq-redis's ListQueueBroker (BRPOP, no acknowledgement), one worker process,
its default 100 concurrent tasks. Bulk enqueue: asyncio.gather per 1,000 kicks. Per-task
schedules need a separate `taskiq scheduler` process and a schedule source: not compared."""

import asyncio
import functools
import os
import time

from redis.asyncio import Redis
from taskiq_redis import ListQueueBroker

URL = os.environ["BENCH_REDIS_URL"]
r = Redis.from_url(URL)
broker = ListQueueBroker(URL)


@broker.task
async def bump() -> None:
    await r.incr("bench:done")


@broker.task
async def stamp(sent: float) -> None:
    await r.rpush("bench:out", time.time() - sent)


# The producer keeps one event loop and one started broker, as a long-lived application would.
loop = asyncio.new_event_loop()


async def _enqueue(n: int) -> None:
    for start in range(0, n, 1000):
        await asyncio.gather(*(bump.kiq() for _ in range(start, min(n, start + 1000))))


@functools.cache
def started() -> None:
    loop.run_until_complete(broker.startup())


def enqueue(n: int) -> None:
    started()
    loop.run_until_complete(_enqueue(n))


def send_stamp() -> None:
    started()
    loop.run_until_complete(stamp.kiq(time.time()))


WORKER = ["taskiq", "worker", "taskiq_peer:broker", "--workers", "1", "--no-configure-logging"]
