"""SAQ: one worker process, concurrency 10 (its default). Scheduled jobs take whole epoch seconds
(rounded up here, so none runs early) and are moved by a timer that runs every second. Bulk
enqueue: asyncio.gather per 1,000 jobs."""

import asyncio
import math
import os
import time

from redis.asyncio import Redis
from saq import Queue

URL = os.environ["BENCH_REDIS_URL"]
r = Redis.from_url(URL)


async def bump(ctx: dict) -> None:
    await r.incr("bench:done")


async def stamp(ctx: dict, *, sent: float) -> None:
    await r.rpush("bench:out", time.time() - sent)


settings = {"queue": Queue.from_url(URL), "functions": [bump, stamp], "concurrency": 10}


# The producer keeps one event loop and one queue, as a long-lived application would.
loop = asyncio.new_event_loop()
producer = Queue.from_url(URL)


async def _enqueue(n: int) -> None:
    for start in range(0, n, 1000):
        await asyncio.gather(*(producer.enqueue("bump") for _ in range(start, min(n, start + 1000))))


def enqueue(n: int) -> None:
    loop.run_until_complete(_enqueue(n))


def send_stamp() -> None:
    loop.run_until_complete(producer.enqueue("stamp", sent=time.time()))


def schedule(due: float) -> None:
    loop.run_until_complete(producer.enqueue("stamp", sent=due, scheduled=math.ceil(due)))


WORKER = ["saq", "saq_peer.settings", "--quiet"]
