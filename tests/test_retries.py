"""Retries, backoff, app.Retry, dead letters and retry-dead, against a real Redis.

The worker runs in this process (tick by tick), so a test can look at Redis between attempts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import redis
from helpers import make_worker

from minicelery import Client
from minicelery.errors import BadArguments, SerializationError
from minicelery.keys import QueueKeys


def redis_now_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds * 1000 + micros // 1000)


def due_in_ms(r: redis.Redis, queue: str, task_id: str) -> int:
    score = r.zscore(QueueKeys(queue).scheduled, task_id)
    assert score is not None, "the retry is not in the schedule"
    return int(score) - redis_now_ms(r)


def make_due_now(r: redis.Redis, queue: str, task_id: str) -> None:
    """Stand in for the passing of a backoff delay: the scheduled retry becomes due."""
    r.zadd(QueueKeys(queue).scheduled, {task_id: 0})
    r.zadd(QueueKeys(queue).marker, {"m": 0})


def test_a_failing_task_is_retried_and_then_succeeds(app: Client) -> None:
    runs: list[int] = []

    @app.task(retries=3, retry_backoff=0)
    def flaky() -> str:
        runs.append(1)
        if len(runs) < 3:
            raise ConnectionError("upstream not ready")
        return "ok"

    handle = flaky().start()
    worker = make_worker(app)
    worker.run(burst=True, install_signals=False)
    assert handle.result(timeout=5) == "ok"
    assert len(runs) == 3
    assert (worker.counters.retried, worker.counters.done, worker.counters.failed) == (2, 1, 0)


def test_retries_wait_in_redis_with_capped_exponential_backoff_then_dead_letter(app: Client, r: redis.Redis) -> None:
    @app.task(retries=3, retry_backoff=10, retry_backoff_max=30, retry_jitter=False)
    def always_fails() -> None:
        raise ValueError("still broken")

    parent = always_fails()
    child = app.tasks["describe"](parent)
    child.start()
    parent_id = parent.id
    waits = []
    for _ in range(3):
        assert make_worker(app).tick(block=False)  # a fresh worker: it learns nothing of our clock edits
        assert app.handle(parent_id).state == "scheduled"  # not sleeping in a worker: waiting in Redis
        waits.append(due_in_ms(r, app.default_queue, parent_id))
        assert child.state == "waiting"  # children wait through retries
        make_due_now(r, app.default_queue, parent_id)
    # 10 s, 20 s, then 40 s capped at 30 s (a little less: Redis's clock moved on meanwhile)
    assert [round(w / 1000) for w in waits] == [10, 20, 30]
    worker = make_worker(app)
    assert worker.tick(block=False)  # the fourth run fails for good
    with pytest.raises(ValueError, match="still broken"):
        app.handle(parent_id).result(timeout=1)
    assert r.zscore(QueueKeys(app.default_queue).dead, parent_id) is not None
    worker.run(burst=True, install_signals=False)
    assert child.result(timeout=5) == "error:ValueError:still broken"  # the child got the final error


def test_jittered_backoff_stays_between_half_and_all_of_the_delay(app: Client, r: redis.Redis) -> None:
    @app.task(retries=1, retry_backoff=100)
    def fails() -> None:
        raise RuntimeError("x")

    waits = []
    for _ in range(8):
        handle = fails().start()
        make_worker(app).tick(block=False)
        waits.append(due_in_ms(r, app.default_queue, handle.id))
    assert all(49_000 <= w <= 100_000 for w in waits), waits
    assert len(set(waits)) > 1  # jittered: not all the same


def test_retry_on_limits_which_exceptions_are_retried(app: Client) -> None:
    @app.task(retries=5, retry_on=(ConnectionError,), retry_backoff=0)
    def picky(kind: str) -> None:
        raise (ConnectionError if kind == "conn" else KeyError)(kind)

    worker = make_worker(app)
    wrong = picky("key").start()
    worker.run(burst=True, install_signals=False)
    with pytest.raises(KeyError):
        wrong.result(timeout=5)
    assert worker.counters.retried == 0  # a KeyError is not in retry_on: failed at once
    right = picky("conn").start()
    worker = make_worker(app)
    worker.run(burst=True, install_signals=False)
    with pytest.raises(ConnectionError):
        right.result(timeout=5)
    assert worker.counters.retried == 5


def test_app_retry_reschedules_with_its_delay_and_fails_with_its_cause_when_spent(app: Client, r: redis.Redis) -> None:
    @app.task(retries=1)
    def poll_upstream() -> None:
        try:
            raise TimeoutError("upstream busy")
        except TimeoutError as exc:
            raise app.Retry(delay=7) from exc

    handle = poll_upstream().start()
    make_worker(app).tick(block=False)
    assert handle.state == "scheduled" and round(due_in_ms(r, app.default_queue, handle.id) / 1000) == 7
    make_due_now(r, app.default_queue, handle.id)
    make_worker(app).tick(block=False)
    with pytest.raises(TimeoutError, match="upstream busy"):  # the cause, not the Retry
        handle.result(timeout=1)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("bad_args", BadArguments),  # arguments that do not fit the signature
        ("unencodable", SerializationError),  # a result JSON cannot hold
    ],
)
def test_failures_a_retry_cannot_fix_are_not_retried(app: Client, body: str, error: type[Exception]) -> None:
    @app.task(retries=5, retry_backoff=0)
    def two_args(a: int, b: int) -> int:
        return a + b

    @app.task(retries=5, retry_backoff=0)
    def returns_a_set() -> Any:
        return {1, 2}

    handle = two_args(1).start() if body == "bad_args" else returns_a_set().start()
    worker = make_worker(app)
    worker.run(burst=True, install_signals=False)
    with pytest.raises(error) as caught:
        handle.result(timeout=5)
    assert worker.counters.retried == 0 and worker.counters.failed == 1
    message = str(caught.value)
    assert ("do not fit two_args(a: 'int', b: 'int')" in message and "'b'" in message) or "JSON" in message, message


def test_each_shape_of_call_is_judged_on_its_own(app: Client) -> None:
    """The signature check is cached per shape (how many positional arguments, which keyword
    names): a good call after a bad one of the same task still runs, and the reverse."""

    @app.task
    def scale(value: int, *, factor: int = 2) -> int:
        return value * factor

    calls = [scale(3), scale(3, wrong=1), scale(3, factor=5), scale(), scale(4)]
    for handle in calls:
        handle.start()
    make_worker(app).run(burst=True, install_signals=False)
    assert calls[0].result(timeout=5) == 6
    with pytest.raises(BadArguments, match="unexpected keyword argument 'wrong'"):
        calls[1].result(timeout=5)
    assert calls[2].result(timeout=5) == 15
    with pytest.raises(BadArguments, match="missing a required argument: 'value'"):
        calls[3].result(timeout=5)
    assert calls[4].result(timeout=5) == 8


def test_dead_letters_are_listed_and_put_back_by_the_cli(app: Client, redis_url: str, r: redis.Redis) -> None:
    state = {"fixed": False}

    @app.task
    def needs_fix() -> str:
        if not state["fixed"]:
            raise LookupError("config missing")
        return "fixed"

    parent = needs_fix()
    child = app.tasks["describe"](parent)
    child.start()
    make_worker(app).run(burst=True, install_signals=False)
    assert child.result(timeout=5) == "error:LookupError:config missing"

    env = {"MINICELERY_REDIS__URL": redis_url, "MINICELERY_WORKER__QUEUES": f'["{app.default_queue}"]', "PATH": ""}
    cli = [sys.executable, "-m", "minicelery"]
    report = json.loads(subprocess.run([*cli, "inspect", "--json"], env=env, capture_output=True, check=True).stdout)
    (dead,) = report[app.default_queue]["dead_letters"]
    assert dead["id"] == parent.id and dead["name"] == "needs_fix" and dead["attempts"] == 1
    assert dead["error"] == "LookupError: config missing"
    assert 'raise LookupError("config missing")' in dead["traceback"] and dead["failed_at"]

    state["fixed"] = True
    run = subprocess.run([*cli, "retry-dead", parent.id], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and f"{parent.id} put back" in run.stdout, run.stderr
    assert parent.state == "ready"
    make_worker(app).run(burst=True, install_signals=False)
    assert parent.result(timeout=5) == "fixed"
    assert child.result(timeout=1) == "error:LookupError:config missing"  # the child is not run again
    assert app.handle(child.id).state == "succeeded"
    assert r.hget(QueueKeys(app.default_queue).info, f"{child.id}:p") is None  # not released a second time
    again = subprocess.run([*cli, "retry-dead", parent.id], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "not a dead letter" in again.stderr


def test_an_idempotency_key_holds_while_the_task_is_pending_even_through_retries(app: Client, r: redis.Redis) -> None:
    @app.task(retries=1, retry_backoff=3600, retry_backoff_max=3600)
    def charge(order: str) -> str:
        raise ConnectionError("payment gateway down")

    first = charge("order-42").start(key="charge-order-42")
    again = charge("order-42").start(key="charge-order-42")
    assert again.id == first.id  # the second enqueue returned the pending task's handle
    make_worker(app).tick(block=False)  # fails; its retry waits an hour in the schedule
    assert first.state == "scheduled"
    assert charge("order-42").start(key="charge-order-42").id == first.id  # still pending: still held
    make_due_now(r, app.default_queue, first.id)
    make_worker(app).tick(block=False)  # the retry fails too: for good
    assert first.state == "failed"
    fresh = charge("order-42").start(key="charge-order-42")
    assert fresh.id != first.id  # the key is free once the task has ended
