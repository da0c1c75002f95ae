"""Tasks whose name a worker does not know (a rolling deploy, a typo, a hostile client), against
real worker processes: given back for a worker that knows them, dead-lettered after the grace,
and never a metrics series of their own."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import TESTS, Workers, wait_until
from test_metrics import _get, _sample

from minicelery import Client, UnknownTask
from minicelery.redis_server import free_port

NEW_CODE = """
from minicelery import Client, JSONTransport, RedisBroker

app = Client(RedisBroker(JSONTransport()))


@app.task
def added_in_v2(x):
    return x + 1
"""


def test_a_task_sent_by_new_code_waits_for_a_worker_with_that_code_instead_of_dying(
    app: Client, workers: Workers, tmp_path: Path
) -> None:
    (tmp_path / "newtasks.py").write_text(NEW_CODE)
    old = workers.start()
    handle = app.send_task("added_in_v2", [20])
    wait_until(lambda: "is not registered in this worker; given back" in workers.log(old), 20, "the give-back")
    assert handle.state in ("scheduled", "ready", "running")  # back in the queue, not in the dead letters
    old.send_signal(signal.SIGTERM)  # the rolling deploy replaces the old worker...
    assert old.wait(timeout=20) == 0
    new = workers.start(  # ...with one that has the new task
        MINICELERY_TASKS='["worktasks", "newtasks"]', PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS)])
    )
    assert handle.result(timeout=30) == 21
    wait_until(lambda: "name=added_in_v2" in workers.log(new), 10, "the new worker's outcome line")


def test_an_unknown_task_is_dead_lettered_once_its_grace_has_passed(app: Client, workers: Workers) -> None:
    proc = workers.start(MINICELERY_WORKER__UNKNOWN_TASK_GRACE="1")
    handle = app.send_task("no_such_task", [1])
    with pytest.raises(UnknownTask, match="no task named 'no_such_task'"):
        handle.result(timeout=30)
    log = workers.log(proc)
    assert "given back for a worker that has it" in log  # once, within the grace...
    assert "no worker ran task 'no_such_task' within unknown_task_grace (1 s): dead-lettered" in log  # ...then not


def test_unknown_task_names_share_one_metrics_label_and_dead_letters_are_counted(app: Client, workers: Workers) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    workers.start(
        MINICELERY_METRICS__ENABLED="true",
        MINICELERY_METRICS__PORT=str(port),
        MINICELERY_WORKER__UNKNOWN_TASK_GRACE="0",  # dead-letter at once
    )
    names = [f"made_up_{i}" for i in range(5)]
    handles = [app.send_task(name) for name in names] + [app.tasks["boom"]("m").start() for _ in range(2)]
    for handle in handles:
        with pytest.raises((UnknownTask, ValueError)):
            handle.result(timeout=30)

    expected = {
        ("minicelery_task_outcomes_total", "(unknown)", "failed"): 5,
        ("minicelery_task_outcomes_total", "(unknown)", "dead_lettered"): 5,
        ("minicelery_task_outcomes_total", "boom", "failed"): 2,
        ("minicelery_task_outcomes_total", "boom", "dead_lettered"): 2,
    }

    def scraped() -> str | None:
        # A scrape reads one series after another while the worker counts: wait for them all.
        status, text = _get(base + "/metrics")
        counted = status == 200 and all(
            _sample(text, name, task=task, outcome=outcome) == count
            for (name, task, outcome), count in expected.items()
        )
        return text if counted and _sample(text, "minicelery_task_failures_total", task="(unknown)") == 5 else None

    text = str(wait_until(scraped, 20, "every run recorded"))
    assert not any(name in text for name in names)
    assert _sample(text, "minicelery_task_outcomes_total", task="(unknown)", outcome="dead_lettered") == 5
    assert _sample(text, "minicelery_task_outcomes_total", task="boom", outcome="dead_lettered") == 2
    assert _sample(text, "minicelery_task_failures_total", task="(unknown)", exception="UnknownTask") == 5
