"""RQ's `rq cron` for bench/periodic.py: this file is both the cron config (`rq cron
periodic_rq.py`: `stamp` every BENCH_EVERY seconds) and the module SimpleWorkers import.
RQ gives a cron run no due time, so CronJob.enqueue is wrapped (in the cron process) to pass
the time the job was due (its latest enqueue + the interval: RQ's intervals count from when
the last one was enqueued; the first run is due at once), and a run's lateness is its start
minus that."""

import os
import time
from datetime import UTC, datetime

import redis
import rq.cron
from rq import cron

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)


def stamp(due: float) -> None:
    r.rpush("bench:late", (time.time() - due) * 1000)


_enqueue = rq.cron.CronJob.enqueue


def _enqueue_with_due(self, connection):  # type: ignore[no-untyped-def]
    due = self.next_enqueue_time if self.latest_enqueue_time else datetime.now(UTC)
    self.kwargs = {"due": due.timestamp()}
    return _enqueue(self, connection)


rq.cron.CronJob.enqueue = _enqueue_with_due  # type: ignore[method-assign]
cron.register(stamp, "bench", interval=float(os.environ["BENCH_EVERY"]), result_ttl=0)  # type: ignore[arg-type]

WORKER = ["rq", "worker", "--worker-class", "rq.worker.SimpleWorker", "--url", URL, "--quiet", "bench"]
SCHEDULER = ["rq", "cron", "--url", URL, "--logging-level", "warning", "periodic_rq.py"]
