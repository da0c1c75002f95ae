"""The `minicelery` command as a user meets it: exit codes, one-line messages, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import Workers


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
