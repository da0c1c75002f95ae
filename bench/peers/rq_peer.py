"""RQ: SimpleWorker (no fork per job), results not kept, bulk enqueue with enqueue_many in one
pipeline. Scheduled jobs need `--with-scheduler` (it polls every second), used only there."""

import os
import time
from datetime import UTC, datetime

import redis
from rq import Queue
from rq.job import Dependency

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)
queue = Queue("bench", connection=r)


def bump() -> None:
    r.incr("bench:done")


def stamp(sent: float) -> None:
    r.rpush("bench:out", time.time() - sent)


def node() -> int:
    return 0


def last() -> None:
    r.rpush("bench:out", 1)


def enqueue(n: int) -> None:
    with r.pipeline() as pipe:
        queue.enqueue_many([Queue.prepare_data(bump, result_ttl=0) for _ in range(n)], pipeline=pipe)
        pipe.execute()


def send_stamp() -> None:
    queue.enqueue(stamp, time.time(), result_ttl=0)


def schedule(due: float) -> None:
    queue.enqueue_at(datetime.fromtimestamp(due, UTC), stamp, due, result_ttl=0)


def dag(groups: int) -> None:
    # Results must outlive their dependents' checks, so they are kept (RQ's default TTL).
    for _ in range(groups):
        a = queue.enqueue(node)
        c = queue.enqueue(node, depends_on=queue.enqueue(node, depends_on=a))
        queue.enqueue(last, depends_on=Dependency(jobs=[c, queue.enqueue(node, depends_on=a)]))


WORKER = ["rq", "worker", "--worker-class", "rq.worker.SimpleWorker", "--url", URL, "--quiet", "bench"]
SCHEDULER_WORKER = [*WORKER, "--with-scheduler"]
# Its multi-process mode: `rq worker-pool`, 2 workers, each a SimpleWorker as above (the
# default Worker forks once per job).
POOL_WORKER = ["rq", "worker-pool", "-n", "2", "-w", "rq.worker.SimpleWorker", "--url", URL, "-q", "bench"]
