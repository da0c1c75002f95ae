"""RQ: SimpleWorker (no fork per job), bulk enqueue with enqueue_many in one pipeline."""

import os

import redis
from rq import Queue

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)


def bump() -> None:
    r.incr("bench:done")


def enqueue(n: int) -> None:
    queue = Queue("bench", connection=r)
    with r.pipeline() as pipe:
        queue.enqueue_many([Queue.prepare_data(bump, result_ttl=0) for _ in range(n)], pipeline=pipe)
        pipe.execute()


WORKER = ["rq", "worker", "--worker-class", "rq.worker.SimpleWorker", "--url", URL, "--quiet", "bench"]
