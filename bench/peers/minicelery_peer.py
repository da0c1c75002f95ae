"""minicelery, run exactly like the peers: start_many to enqueue, one `minicelery worker` process."""

import os

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


def enqueue(n: int) -> None:
    app.start_many([bump() for _ in range(n)])


WORKER = ["minicelery", "worker", "--tasks", "minicelery_peer", "--queues", "default"]
