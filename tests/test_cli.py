"""The `minicelery` command as a user meets it: exit codes, one-line messages, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import Workers, wait_until

from minicelery import JSONTransport
from minicelery.keys import ROOT, queue_keys
from minicelery.queue_reads import stored_payload
from minicelery.transport import TaskMessage


def run_cli(*args: str, env: dict[str, str], stdin: int = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minicelery", *args], capture_output=True, text=True, timeout=60, env=env, stdin=stdin
    )


@pytest.mark.parametrize(
    ("args", "blamed"),
    [
        (["add", "[1, 2]", "--delay", "-5"], "--delay"),
        (["add", "[1, 2]", "--delay", "nan"], "--delay"),
        (["add", "[1, 2]", "--delay", "inf"], "--delay"),
        (["add", "1, 2"], "args"),
        (["add", "[1]", "--kwargs", "[1]"], "--kwargs"),
        (["add", "[1]", "--at", "tomorrow"], "--at"),
        (["add", "[1]", "--wait-result", "--timeout", "-1"], "--timeout"),
    ],
)
def test_bad_enqueue_arguments_are_usage_errors_exit_2_without_traceback(
    args: list[str], blamed: str, workers: Workers
) -> None:
    result = run_cli("enqueue", *args, env=workers.env())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: argument {blamed}:" in result.stderr.splitlines()[-1]


def test_result_of_an_unfinished_task_exits_75_not_1(workers: Workers) -> None:
    env = workers.env()
    sent = run_cli("enqueue", "add", "[1, 2]", env=env)  # no worker: it stays ready
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    now = run_cli("result", task_id, env=env)
    assert now.returncode == 75 and "not finished" in now.stderr and now.stderr.count("\n") == 1
    waited = run_cli("result", task_id, "--timeout", "0.1", env=env)
    assert waited.returncode == 75 and "did not finish" in waited.stderr and "Traceback" not in waited.stderr


def test_wait_result_that_times_out_exits_75(workers: Workers) -> None:
    result = run_cli("enqueue", "add", "[1, 2]", "--wait-result", "--timeout", "0.1", env=workers.env())
    assert result.returncode == 75, result.stderr
    assert "did not finish" in result.stderr and "Traceback" not in result.stderr


def test_purge_with_stdin_at_end_of_file_deletes_nothing_and_says_so(workers: Workers) -> None:
    result = run_cli("purge", env=workers.env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "no answer on stdin" in result.stderr and "Traceback" not in result.stderr


def test_inspect_into_a_closed_pipe_exits_quietly(workers: Workers) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before inspect writes, as with `| head -0`
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "minicelery", "inspect"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=workers.env(),
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert proc.stderr == ""


MAIL_TASKS = """
from minicelery import Client, RedisBroker

app = Client(RedisBroker())


@app.task(queue={queue!r}, retries=2, time_limit=7)
def send_mail(to):
    return to
"""


@pytest.fixture
def other_queue(queue: str, r: redis.Redis) -> Iterator[str]:
    """A second queue for the test (the conftest cleans only `queue`)."""
    name = f"{queue}-other"
    yield name
    for key in r.scan_iter(match=f"{ROOT}:{{{name}}}:*", count=1000):
        r.delete(key)


def _payload(r: redis.Redis, queue: str, task_id: str) -> TaskMessage | None:
    data = stored_payload(r.hget(queue_keys(queue).payload, task_id))
    return JSONTransport().loads_message(data, task_id) if data is not None else None


def test_enqueue_by_name_sends_to_the_tasks_own_queue_with_its_options(
    workers: Workers, tmp_path: Path, queue: str, other_queue: str, r: redis.Redis
) -> None:
    (tmp_path / "mail_tasks.py").write_text(MAIL_TASKS.format(queue=queue))
    env = {
        **workers.env(),
        "MINICELERY_TASKS": '["mail_tasks"]',
        "MINICELERY_WORKER__QUEUES": f'["{other_queue}"]',  # what enqueue used for every task
        "PYTHONPATH": str(tmp_path),
    }
    sent = run_cli("enqueue", "send_mail", '["ann@example.com"]', env=env)
    assert sent.returncode == 0, sent.stderr
    payload = _payload(r, queue, sent.stdout.strip())
    assert payload is not None and payload.retries == 2 and payload.time_limit == 7
    assert sent.stderr == ""  # nothing was guessed
    chosen = run_cli("enqueue", "send_mail", '["bob@example.com"]', "-q", other_queue, env=env)
    assert chosen.returncode == 0, chosen.stderr
    payload = _payload(r, other_queue, chosen.stdout.strip())  # an explicit -q still wins
    assert payload is not None and payload.retries == 2


def test_enqueue_without_task_modules_says_which_queue_and_how_to_choose(workers: Workers, queue: str) -> None:
    env = workers.env()
    del env["MINICELERY_TASKS"]
    sent = run_cli("enqueue", "add", "[1, 2]", env=env)
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.splitlines() == [
        f"minicelery: sent to queue {queue!r}, the first of worker.queues (no task modules are configured "
        "to tell the task's own queue); -q QUEUE chooses the queue"
    ]


def test_enqueue_refuses_a_name_or_arguments_the_task_modules_reject_unless_forced(
    workers: Workers, queue: str, r: redis.Redis
) -> None:
    env = workers.env()  # the test task modules are configured: add and repeat(text, times) are registered
    typo = run_cli("enqueue", "ad", "[1, 2]", env=env)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "task 'ad' is not registered" in typo.stderr and "(did you mean 'add'?)" in typo.stderr
    misfit = run_cli("enqueue", "repeat", '["x"]', env=env)
    assert misfit.returncode == 2 and "arguments do not fit repeat(" in misfit.stderr
    assert "missing a required argument: 'times'" in misfit.stderr
    assert r.hlen(queue_keys(queue).payload) == 0  # neither was sent
    forced = run_cli("enqueue", "ad", "[1, 2]", "--force", env=env)  # workers with newer code may know it
    assert forced.returncode == 0, forced.stderr
    assert _payload(r, queue, forced.stdout.strip()) is not None


NO_SUCH_HOST = "redis://no-such-host.invalid:6379/0"  # .invalid never resolves (RFC 2606)


def test_a_redis_host_that_does_not_resolve_is_named_as_such_exit_69(workers: Workers) -> None:
    result = run_cli("inspect", env={**workers.env(), "MINICELERY_REDIS__URL": NO_SUCH_HOST})
    assert result.returncode == 69
    assert result.stderr.startswith("minicelery: Redis unavailable during ") and result.stderr.count("\n") == 1
    assert "cannot resolve host: " in result.stderr and "no-such-host.invalid" in result.stderr


def test_a_worker_keeps_retrying_a_redis_host_that_does_not_resolve(workers: Workers) -> None:
    proc = workers.start(MINICELERY_REDIS__URL=NO_SUCH_HOST)

    def waiting_lines() -> list[str]:
        return [line for line in workers.log(proc).splitlines() if "waiting for Redis" in line]

    wait_until(lambda: len(waiting_lines()) >= 2 or proc.poll() is not None, what="two attempts")
    assert proc.poll() is None, workers.log(proc)
    assert all("cannot resolve host: " in line for line in waiting_lines()), workers.log(proc)
