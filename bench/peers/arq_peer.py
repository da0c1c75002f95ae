"""arq: one worker, results not kept, max_jobs 100 (tuned up from 10); it polls its queue every
poll_delay (0.5 s, its default) when idle. Bulk enqueue: one asyncio.gather per 1,000 jobs."""

import asyncio
import functools
import os
import time
from datetime import UTC, datetime
from typing import ClassVar

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from redis.asyncio import Redis

URL = os.environ["BENCH_REDIS_URL"]
SETTINGS = RedisSettings.from_dsn(URL)
r = Redis.from_url(URL)


async def bump(ctx: dict) -> None:
    await r.incr("bench:done")


async def stamp(ctx: dict, sent: float) -> None:
    await r.rpush("bench:out", time.time() - sent)


class WorkerSettings:
    functions: ClassVar = [bump, stamp]
    redis_settings = SETTINGS
    keep_result = 0
    max_jobs = 100


# The producer keeps one event loop and one pool, as a long-lived application would.
# Made on first use, so the worker (which imports this module too) does not open it.
loop = asyncio.new_event_loop()


@functools.cache
def producer() -> ArqRedis:
    return loop.run_until_complete(create_pool(SETTINGS))


async def _enqueue(pool: ArqRedis, n: int) -> None:
    for start in range(0, n, 1000):
        await asyncio.gather(*(pool.enqueue_job("bump") for _ in range(start, min(n, start + 1000))))


def enqueue(n: int) -> None:
    loop.run_until_complete(_enqueue(producer(), n))


def send_stamp() -> None:
    loop.run_until_complete(producer().enqueue_job("stamp", time.time()))


def schedule(due: float) -> None:
    when = datetime.fromtimestamp(due, UTC)
    loop.run_until_complete(producer().enqueue_job("stamp", due, _defer_until=when))


WORKER = ["arq", "arq_peer.WorkerSettings"]
