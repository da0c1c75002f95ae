"""Celery with the Redis broker: solo pool, results ignored, gossip/mingle/heartbeat off."""

import os

import redis
from celery import Celery

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)
app = Celery("bench", broker=URL)
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=16, broker_connection_retry_on_startup=True)


@app.task
def bump() -> None:
    r.incr("bench:done")


def enqueue(n: int) -> None:
    with app.producer_pool.acquire(block=True) as producer:
        for _ in range(n):
            bump.apply_async(producer=producer)


WORKER = ["celery", "-A", "celery_peer", "worker", "-P", "solo", "-c", "1", "--without-gossip",
          "--without-mingle", "--without-heartbeat", "-l", "WARNING"]  # fmt: skip
