"""Celery with the Redis broker: solo pool, results ignored, prefetch 16, gossip/mingle/heartbeat
off. ETAs are held in the worker's memory. The DAG uses chains and a chord, which need a result
backend (Redis, only for those tasks)."""

import os
import time

import redis
from celery import Celery, chain, chord

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)
app = Celery("bench", broker=URL, backend=URL)
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=16, broker_connection_retry_on_startup=True)


@app.task
def bump() -> None:
    r.incr("bench:done")


@app.task
def stamp(sent: float) -> None:
    r.rpush("bench:out", time.time() - sent)


@app.task(ignore_result=False)
def node(*inputs: object) -> int:
    return len(inputs)


@app.task
def last(inputs: object) -> None:
    r.rpush("bench:out", 1)


def enqueue(n: int) -> None:
    with app.producer_pool.acquire(block=True) as producer:
        for _ in range(n):
            bump.apply_async(producer=producer)


def send_stamp() -> None:
    stamp.delay(time.time())


def schedule(due: float) -> None:
    stamp.apply_async((due,), countdown=due - time.time())


def dag(groups: int) -> None:
    # a runs first; then c = b(a) chained and d(a) in a chord whose callback is e.
    for _ in range(groups):
        chain(node.s(), chord([chain(node.s(), node.s()), node.s()], last.s())).delay()


WORKER = ["celery", "-A", "celery_peer", "worker", "-P", "solo", "-c", "1", "--without-gossip",
          "--without-mingle", "--without-heartbeat", "-l", "WARNING"]  # fmt: skip

# Its multi-process mode: the prefork pool, 2 children (otherwise as above).
POOL_WORKER = ["celery", "-A", "celery_peer", "worker", "-P", "prefork", "-c", "2", "--without-gossip",
               "--without-mingle", "--without-heartbeat", "-l", "WARNING"]  # fmt: skip
