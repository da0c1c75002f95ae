"""minicelery, run exactly like the peers: start_many to enqueue, one `minicelery worker` process
with its defaults (batch 16), metrics off as no peer serves any."""

import os
import time

import redis

from minicelery import Client, JSONTransport, RedisBroker

URL = os.environ["BENCH_REDIS_URL"]
os.environ.update(
    {"MINICELERY_REDIS__URL": URL, "MINICELERY_METRICS__ENABLED": "false", "MINICELERY_LOGGING__LEVEL": "WARNING"}
)
r = redis.Redis.from_url(URL)
app = Client(RedisBroker(JSONTransport(), url=URL))


@app.task
def bump() -> None:
    r.incr("bench:done")


@app.task
def stamp(sent: float) -> None:
    r.rpush("bench:out", time.time() - sent)


@app.task
def node(*inputs: object) -> int:
    return len(inputs)


@app.task
def last(*inputs: object) -> None:
    r.rpush("bench:out", len(inputs))


def enqueue(n: int) -> None:
    app.start_many([bump() for _ in range(n)])


def send_stamp() -> None:
    stamp(time.time()).start()


def schedule(due: float) -> None:
    stamp(due).wait(due - time.time())


def dag(groups: int) -> None:
    for _ in range(groups):
        a = node()
        last(node(node(a)), node(a)).start()


WORKER = ["minicelery", "worker", "--tasks", "minicelery_peer", "--queues", "default"]
# Its multi-process mode: a supervisor and 2 worker children.
POOL_WORKER = [*WORKER, "--concurrency", "2"]
