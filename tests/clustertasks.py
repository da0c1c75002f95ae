"""The task of the cluster fault suite (tests/faults/test_cluster_faults.py), run by real
workers on a Redis Cluster. Its bookkeeping goes to a plain Redis off the cluster, the
ledger (MINICELERY_TEST_LEDGER_URL): a primary killed mid-test must not take the record of
runs with it, or a task that ran would count as lost.

It writes what worktasks' stamp_run writes (worktasks.executions() and test_failover's
resumed() read it), under the same name, so one producer code path serves both suites.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from minicelery import Client, JSONTransport, RedisBroker

EXECUTIONS_KEY = "test:executions"  # = worktasks.EXECUTIONS_KEY
STAMPS_KEY = "test:stamps"  # = worktasks.STAMPS_KEY
_ledger: redis.Redis | None = None


def ledger() -> redis.Redis:
    global _ledger
    if _ledger is None:
        _ledger = redis.Redis.from_url(
            os.environ["MINICELERY_TEST_LEDGER_URL"],
            retry=Retry(ExponentialBackoff(cap=1.0), 10),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
    return _ledger


def register(app: Client) -> None:
    @app.task
    def stamp_run(tag: str, *inputs: Any) -> str:
        """Counts its run (a fresh id per run: a retried SADD cannot count twice) and records
        which process ran it and when (pid|tag -> time)."""
        ledger().sadd(EXECUTIONS_KEY, f"{tag}|{uuid.uuid4().hex}")
        ledger().zadd(STAMPS_KEY, {f"{os.getpid()}|{tag}": time.time()})
        return tag


app = Client(RedisBroker(JSONTransport()))
register(app)
