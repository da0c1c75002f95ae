"""Fire-and-forget tasks (`store_result=False`, `[worker] store_results`), run by real worker
processes: no result value is kept, yet state, children and dead letters work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
from conftest import CLI_ON, Workers

from minicelery import Client, ResultNotKept
from minicelery.keys import QueueKeys


def test_a_fire_and_forget_parent_feeds_its_child_and_keeps_only_its_state(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    workers.wait_ready(workers.start())
    parent = app.tasks["forget_echo"](41)
    child = app.tasks["add"](parent, 1)
    parent.start()
    assert child.result(timeout=20) == 42
    assert parent.state == "succeeded"
    with pytest.raises(ResultNotKept, match="succeeded, but its result was not kept"):
        parent.result(timeout=5)  # at once, not a hang
    keys = QueueKeys(app.default_queue)
    assert r.hget(keys.result, parent.id) is None and r.hget(keys.payload, parent.id) is None
    assert r.hget(keys.result, child.id) is not None  # an ordinary task still keeps its result

    late = app.tasks["describe"](parent)  # registered after the parent finished: its value is gone
    assert late.result(timeout=20).startswith("error:ResultNotKept:the parent finished before this task")


def test_a_failing_fire_and_forget_task_is_dead_lettered_with_its_traceback(app: Client, workers: Workers) -> None:
    workers.wait_ready(workers.start())
    failed = app.tasks["forget_boom"]("no mail server").start()
    child = app.tasks["describe"](failed)
    with pytest.raises(LookupError, match="no mail server"):
        failed.result(timeout=20)
    assert child.result(timeout=20) == "error:LookupError:no mail server"
    (dead,) = app.broker.queue_report(app.default_queue, 5)["dead_letters"]
    assert dead["id"] == failed.id and dead["name"] == "forget_boom"
    assert dead["error"] == "LookupError: no mail server" and "raise LookupError(message)" in dead["traceback"]


def test_a_worker_that_keeps_no_results_still_keeps_those_of_tasks_that_ask(
    app: Client, workers: Workers, redis_url: str
) -> None:
    workers.wait_ready(workers.start(MINICELERY_WORKER__STORE_RESULTS="false"))
    plain, kept = app.tasks["echo"](1).start(), app.tasks["keep_echo"](2).start()
    with pytest.raises(ResultNotKept):
        plain.result(timeout=20)  # waits for it to finish, then says so
    assert plain.state == "succeeded"
    assert kept.result(timeout=20) == 2
    env = {"MINICELERY_REDIS__URL": redis_url, "MINICELERY_WORKER__QUEUES": f'["{app.default_queue}"]', "PATH": ""}
    env |= CLI_ON
    cli = subprocess.run(
        [sys.executable, "-m", "minicelery", "result", plain.id], env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0 and "succeeded, but its result was not kept" in cli.stderr and not cli.stdout
