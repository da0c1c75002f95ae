"""Huey: RedisHuey, one thread worker, results off; no bulk enqueue API, so one call per task.
Its scheduler checks for due tasks once a second (the shortest interval it accepts)."""

import os
import time

import redis
from huey import RedisHuey

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)
huey = RedisHuey("bench", url=URL, results=False)


@huey.task()
def bump() -> None:
    r.incr("bench:done")


@huey.task()
def stamp(sent: float) -> None:
    r.rpush("bench:out", time.time() - sent)


def enqueue(n: int) -> None:
    for _ in range(n):
        bump()


def send_stamp() -> None:
    stamp(time.time())


def schedule(due: float) -> None:
    stamp.schedule(args=(due,), delay=due - time.time())


WORKER = ["huey_consumer", "huey_peer.huey", "-w", "1", "-k", "thread", "-q"]
# Its multi-process mode: 2 worker processes.
POOL_WORKER = ["huey_consumer", "huey_peer.huey", "-w", "2", "-k", "process", "-q"]
