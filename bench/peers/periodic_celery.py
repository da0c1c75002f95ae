"""Celery beat for bench/periodic.py: one `celery beat` process sends `stamp` every BENCH_EVERY
seconds (an interval entry in beat_schedule); solo-pool workers run it. DueScheduler is beat's
default in-memory Scheduler that also passes each run the time beat had it due (the previous
run's time + the interval: beat's intervals count from when the last one was sent), so a run's
lateness is its start minus that."""

import os
import time

import redis
from celery import Celery
from celery.beat import Scheduler

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)
app = Celery("periodic_celery", broker=URL)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    beat_schedule={"stamp": {"task": "periodic_celery.stamp", "schedule": float(os.environ["BENCH_EVERY"])}},
)


@app.task
def stamp(due: float) -> None:
    r.rpush("bench:late", (time.time() - due) * 1000)


class DueScheduler(Scheduler):
    def apply_async(self, entry, producer=None, advance=True, **kwargs):  # type: ignore[no-untyped-def]
        due = entry.schedule.maybe_make_aware(entry.last_run_at) + entry.schedule.run_every
        entry.args = (due.timestamp(),)
        return super().apply_async(entry, producer, advance, **kwargs)


WORKER = ["celery", "-A", "periodic_celery", "worker", "-P", "solo", "-c", "1", "--without-gossip",
          "--without-mingle", "--without-heartbeat", "-l", "WARNING"]  # fmt: skip
SCHEDULER = ["celery", "-A", "periodic_celery", "beat", "-S", "periodic_celery:DueScheduler", "-l", "WARNING"]
