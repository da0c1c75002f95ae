"""Huey: RedisHuey, one thread worker; no bulk enqueue API, so one call per task."""

import os

import redis
from huey import RedisHuey

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)
huey = RedisHuey("bench", url=URL, results=False)


@huey.task()
def bump() -> None:
    r.incr("bench:done")


def enqueue(n: int) -> None:
    for _ in range(n):
        bump()


WORKER = ["huey_consumer", "huey_peer.huey", "-w", "1", "-k", "thread", "-q"]
