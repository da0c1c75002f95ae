"""Tasks that misbehave against real worker processes: they exit, raise BaseExceptions, swallow
their time limit, hang, or are async. The task fails (or times out) and the worker goes on, or,
where nothing in the process can stop the task, the worker ends it by exiting."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import redis
from conftest import Workers, wait_until
from helpers import NotifySocket

from minicelery import Client, TaskTimeout
from minicelery.errors import TaskAborted
from minicelery.keys import QueueKeys
from minicelery.worker import EXIT_TASK_STUCK


def _with_limit(app: Client, name: str, time_limit: float):
    """The worker's task `name`, sent with a time limit (the producer's definition carries it)."""
    producer = Client(app.broker, default_queue=app.default_queue)
    Client.instances.remove(producer)
    return producer.task(name=name, time_limit=time_limit)(app.tasks[name].fn)


def test_a_task_that_calls_sys_exit_fails_and_its_worker_keeps_running(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    proc = workers.start()
    handle = app.tasks["exit_now"](3).start()
    with pytest.raises(TaskAborted, match=r"task raised SystemExit\(3\); the worker kept running"):
        handle.result(timeout=30)
    assert app.tasks["echo"]("next").start().result(timeout=30) == "next"
    assert proc.poll() is None
    assert r.zscore(QueueKeys(app.default_queue).dead, handle.id) is not None  # failed for good, once
    log = workers.log(proc)
    assert f"task {handle.id} name=exit_now" in log and "TaskAborted: task raised SystemExit(3)" in log


def test_keyboard_interrupt_generator_exit_and_other_base_exceptions_fail_only_their_task(
    app: Client, workers: Workers
) -> None:
    proc = workers.start()
    kinds = {"KeyboardInterrupt": "KeyboardInterrupt()", "GeneratorExit": "GeneratorExit()", "custom": "_CustomBase"}
    handles = {kind: app.tasks["raise_base"](kind).start() for kind in kinds}
    for kind, handle in handles.items():
        with pytest.raises(TaskAborted, match=f"task raised {kinds[kind].split('(')[0]}"):
            handle.result(timeout=30)
    assert app.tasks["echo"]("still here").start().result(timeout=30) == "still here"
    assert proc.poll() is None


def test_a_task_calling_os_exit_is_dead_lettered_after_max_lost_leases(app: Client, workers: Workers) -> None:
    """os._exit cannot be caught: the lease recovers the task, and after max_lost_leases the
    next claim dead-letters it (the test restarts each dead worker, as systemd's Restart=
    would). SIGKILL, as a segfault does it: test_lifecycle.py."""
    settings = {"MINICELERY_WORKER__LEASE_SECONDS": "1", "MINICELERY_WORKER__MAX_LOST_LEASES": "1"}
    poison = app.tasks["kill_my_worker"]("os_exit").start()
    worker = workers.start(**settings)
    deaths = 0
    while True:
        current = worker

        def died_or_dead_lettered(current: subprocess.Popen[bytes] = current) -> bool:
            return current.poll() is not None or poison.state == "failed"

        wait_until(died_or_dead_lettered, 30, "a death or the dead letter")
        if poison.state == "failed":
            break
        assert current.returncode == 3
        deaths += 1
        assert deaths <= 2, "run more than max_lost_leases + 1 times"
        worker = workers.start(**settings)
    assert deaths == 2
    assert worker.poll() is None


def test_the_time_limit_holds_against_except_exception_in_the_task(app: Client, workers: Workers) -> None:
    stubborn = _with_limit(app, "stubborn", 0.5)  # sleeps 30 s inside `try: ... except Exception`
    proc = workers.start()
    handle = stubborn(30).start()
    with pytest.raises(TaskTimeout, match=r"time limit of 0\.5 s"):
        handle.result(timeout=20)
    assert "outcome=succeeded" not in workers.log(proc)
    assert app.tasks["echo"]("next").start().result(timeout=30) == "next"
    assert proc.poll() is None


def test_a_task_that_catches_everything_is_recorded_timed_out_and_its_worker_exits_to_end_it(
    app: Client, workers: Workers
) -> None:
    swallow_all = _with_limit(app, "swallow_all", 0.5)  # catches BaseException, every second
    proc = workers.start(MINICELERY_WORKER__LEASE_SECONDS="2")
    handle = swallow_all(600).start()
    # Past its limit plus one lease, the heartbeat records it as timed out and ends the process.
    assert proc.wait(timeout=30) == EXIT_TASK_STUCK
    with pytest.raises(TaskTimeout, match=r"did not stop after its time limit of 0\.5 s; its worker exited"):
        handle.result(timeout=1)
    log = workers.log(proc)
    assert "did not stop within 2 s after its time limit" in log and "outcome=succeeded" not in log
    # Not retried or reclaimed: the next worker runs other work, not this task.
    proc = workers.start()
    assert app.tasks["echo"]("after").start().result(timeout=30) == "after"
    assert "swallow_all" not in workers.log(proc)


def test_watchdog_goes_hungry_while_a_task_holds_the_gil_in_c_code(
    app: Client, workers: Workers, notify_path: NotifySocket
) -> None:
    """Nothing in the process runs while a C call holds the GIL: the watchdog pings and lease
    renewals stop, so systemd kills the worker and another reclaims the task."""
    hold_gil = _with_limit(app, "hold_gil", 0.3)
    proc = workers.start(NOTIFY_SOCKET=notify_path.path, WATCHDOG_USEC="400000", MINICELERY_WORKER__LEASE_SECONDS="1")
    wait_until(lambda: notify_path.seen("READY=1"), 20, "READY=1")
    wait_until(lambda: len(notify_path.seen("WATCHDOG=1")) >= 2, 10, "watchdog while idle")
    tag = uuid.uuid4().hex
    handle = hold_gil(60, tag).start()
    wait_until(lambda: app.broker.redis.get(f"test:in_c:{tag}"), 10, "the task to enter its C call")
    before = len(notify_path.seen("WATCHDOG=1"))
    running = f"minicelery:{{{app.default_queue}}}:running"

    def lease_expired() -> bool:
        seconds, micros = app.broker.redis.time()
        deadline = app.broker.redis.zscore(running, handle.id)
        return deadline is not None and deadline < seconds * 1000 + micros / 1000

    wait_until(lease_expired, 10, "the stuck task's lease to lapse (no more renewals)")
    assert len(notify_path.seen("WATCHDOG=1")) <= before + 1  # (one may be in flight) pings every 0.2 s would have come
    proc.kill()


@pytest.fixture
def notify_path(tmp_path: Path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_async_tasks_run_and_feed_their_children(app: Client, workers: Workers) -> None:
    workers.start()
    parent = app.tasks["async_add"](2, 3)
    child = app.tasks["add"](parent, 10)
    parent.start()
    assert parent.result(timeout=30) == 5
    assert child.result(timeout=30) == 15
    many = [app.tasks["async_add"](i, i).start() for i in range(20)]  # one loop serves them all
    assert [h.result(timeout=30) for h in many] == [2 * i for i in range(20)]


def test_an_async_task_past_its_limit_is_cancelled_at_its_await_and_its_finally_runs(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    tag = uuid.uuid4().hex
    async_sleep = _with_limit(app, "async_sleep", 0.5)
    workers.start()
    handle = async_sleep(30, tag).start()
    with pytest.raises(TaskTimeout, match=r"time limit of 0\.5 s"):
        handle.result(timeout=20)
    assert r.get(f"test:async_finally:{tag}") == b"1"
    assert app.tasks["async_add"](1, 1).start().result(timeout=30) == 2  # the loop still serves


def test_an_async_task_that_never_awaits_is_still_stopped_at_its_limit(app: Client, workers: Workers) -> None:
    async_block = _with_limit(app, "async_block", 0.5)  # time.sleep(30) inside async def
    proc = workers.start()
    handle = async_block(30).start()
    with pytest.raises(TaskTimeout, match=r"time limit of 0\.5 s"):
        handle.result(timeout=20)
    assert app.tasks["async_add"](2, 2).start().result(timeout=30) == 4
    assert proc.poll() is None
