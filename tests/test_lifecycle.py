"""The worker process under signals, systemd notifications and Redis restarts (all real)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from conftest import Workers, wait_until
from helpers import NotifySocket, make_worker

from minicelery import Client, JSONTransport, RedisBroker, TaskTimeout
from minicelery.errors import WorkerLost
from minicelery.keys import QueueKeys
from minicelery.redis_server import RedisServer, free_port
from minicelery.worker import PER_TASK_STATUS_EVERY


@pytest.fixture
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_ready_only_after_redis_answers_then_watchdog_status_and_stopping(
    tmp_path: Path, queue: str, notify: NotifySocket
) -> None:
    port = free_port()
    pool = Workers(f"redis://127.0.0.1:{port}/0", queue, tmp_path)
    try:
        proc = pool.start(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
        wait_until(lambda: "waiting for Redis" in pool.log(proc), 20, "worker to wait for Redis")
        wait_until(lambda: notify.seen("STATUS="), 10, "a status while waiting")
        assert not notify.seen("READY=1")
        with RedisServer(port=port):
            wait_until(lambda: notify.seen("READY=1"), 20, "READY=1")
            assert set(notify.seen("READY=1")) == {proc.pid}  # NotifyAccess=main holds
            assert f"MAINPID={proc.pid}" in [line for _, line in notify.messages]
            wait_until(lambda: len(notify.seen("WATCHDOG=1")) >= 3, 10, "watchdog pings")
            assert any("idle" in line for _, line in notify.messages if line.startswith("STATUS="))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert notify.seen("STOPPING=1") == [proc.pid]
    finally:
        pool.stop_all()


def test_a_busy_worker_names_its_running_task_at_most_once_a_second(
    app: Client, workers: Workers, notify: NotifySocket
) -> None:
    """`systemctl status` says which task runs, but a busy worker does not send systemd a
    datagram per task; once idle, its status says so with the count at once."""
    proc = workers.start(NOTIFY_SOCKET=notify.path)
    wait_until(lambda: notify.seen("READY=1"), 20, "READY=1")
    started = time.monotonic()  # (before the first task can be handed to the worker)
    handles = app.start_many([app.tasks["echo"](i) for i in range(400)])
    wait_until(lambda: all(h.state == "succeeded" for h in handles), 60, "every task to run")
    busy_seconds = time.monotonic() - started
    wait_until(lambda: any("idle, 400 done" in line for _, line in notify.drain()), 10, "the idle status")
    per_task = [line for _, line in notify.messages if line.startswith("STATUS=running task")]
    assert 1 <= len(per_task) <= 1 + busy_seconds / PER_TASK_STATUS_EVERY
    proc.terminate()
    assert proc.wait(timeout=10) == 0


def test_results_held_for_a_batch_are_stored_while_a_usually_brief_task_runs_long(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    """A busy worker holds a result back a few ms, to store it with the next ones, only while
    the next task usually runs briefly. When that task runs long this time, the held result
    does not wait for it to end."""
    gate, echo = app.tasks["gate"], app.tasks["echo"]
    workers.start()
    # The worker learns that the gate runs briefly: enough runs that its smoothed run time
    # falls under the 5 ms hold even if the first (which connects to Redis) was slow.
    r.rpush("test:gate:open", *["go"] * 8)
    for _ in range(8):
        assert gate("open").start().result(timeout=20) == "open"
    # One batch claim takes "first", the gate and more (a claim takes half the ready backlog;
    # "a" may be handed to the idle worker on its own first).
    a, first, shut, *rest = app.start_many([echo("a"), echo("first"), gate("shut"), *[echo(i) for i in range(4)]])
    assert first.result(timeout=10) == "first"
    assert shut.state == "running"  # the gate is still shut: the result did not wait for it
    r.rpush("test:gate:shut", "go")
    assert shut.result(timeout=10) == "shut"
    assert [h.result(timeout=10) for h in (a, *rest)] == ["a", *range(4)]


def test_sigterm_while_idle_exits_at_once_without_waiting_out_the_block(workers: Workers) -> None:
    proc = workers.start(MINICELERY_WORKER__IDLE_BLOCK_MAX="60", MINICELERY_WORKER__LEASE_SECONDS="60")
    workers.wait_ready(proc)
    client = redis.Redis.from_url(workers.redis_url)
    wait_until(lambda: any(c["cmd"] == "bzpopmin" for c in client.client_list()), 10, "idle wait")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # a 60 s block would outlast this wait
    print(f"idle SIGTERM drain: {time.monotonic() - started:.3f} s")


def test_sigterm_during_a_task_lets_it_finish_then_exits_0(app: Client, workers: Workers, r: redis.Redis) -> None:
    proc = workers.start()
    handle = app.tasks["marked_sleep"]("t1", 2).start()
    wait_until(lambda: r.hget("test:started", "t1"), 20, "task to start")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    print(f"SIGTERM during a 2 s task: exited after {time.monotonic() - started:.3f} s")
    assert handle.result(timeout=1) == "t1"
    assert r.hget("test:finished", "t1") == b"1"


def test_second_sigterm_hands_the_task_back_and_another_worker_completes_it(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    first = workers.start()
    handle = app.tasks["marked_sleep"]("t2", 3).start()
    wait_until(lambda: r.hget("test:started", "t2"), 20, "task to start")
    first.send_signal(signal.SIGTERM)
    wait_until(lambda: "stop requested" in workers.log(first), 10, "the first signal to be handled")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 75
    assert "handed back" in workers.log(first)
    assert handle.state in ("ready", "running")
    workers.start()
    assert handle.result(timeout=30) == "t2"
    assert r.hget("test:started", "t2") == b"2" and r.hget("test:finished", "t2") == b"1"


def test_shutdown_grace_running_out_hands_the_task_back(app: Client, workers: Workers, r: redis.Redis) -> None:
    proc = workers.start(MINICELERY_WORKER__SHUTDOWN_GRACE="0.5")
    handle = app.tasks["marked_sleep"]("t3", 30).start()
    wait_until(lambda: r.hget("test:started", "t3"), 20, "task to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 75
    assert handle.state == "ready"


def test_sigkill_mid_task_loses_nothing_the_task_runs_on_another_worker_after_the_lease(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    doomed = workers.start(MINICELERY_WORKER__LEASE_SECONDS="2")
    handle = app.tasks["marked_sleep"]("t4", 0.5).start()
    wait_until(lambda: r.hget("test:started", "t4"), 20, "task to start")
    doomed.kill()
    doomed.wait()
    workers.start(MINICELERY_WORKER__LEASE_SECONDS="2")
    assert handle.result(timeout=30) == "t4"
    assert r.hget("test:started", "t4") == b"2"


def test_cpu_bound_task_longer_than_the_lease_keeps_it(app: Client, workers: Workers) -> None:
    workers.start(MINICELERY_WORKER__LEASE_SECONDS="1")
    spinner = app.tasks["spin"](3).start()
    workers.start(MINICELERY_WORKER__LEASE_SECONDS="1")  # would steal it if the lease lapsed
    assert spinner.result(timeout=30) > 0
    line = f"task {spinner.id} name=spin"
    wait_until(lambda: line in "".join(workers.log(p) for p in workers.procs), 10, "the outcome log line")
    logs = "".join(workers.log(p) for p in workers.procs)
    assert "lost its lease" not in logs and "late finish" not in logs
    assert logs.count(f"task {spinner.id} name=spin") == 1


def test_task_over_its_time_limit_fails_with_a_timeout_error(app: Client, workers: Workers) -> None:
    producer = Client(app.broker, default_queue=app.default_queue)
    Client.instances.remove(producer)

    @producer.task(name="sleep_for", time_limit=0.5)
    def limited(seconds: float) -> float:  # the worker's task, sent with a limit
        return seconds

    workers.start()
    handle = limited(5).start()
    with pytest.raises(TaskTimeout, match=r"time limit of 0\.5 s"):
        handle.result(timeout=30)
    after = app.tasks["echo"]("next").start()
    assert after.result(timeout=30) == "next"  # the worker carried on


def test_redis_killed_and_restarted_under_a_worker_loses_no_task(tmp_path: Path, queue: str) -> None:
    import worktasks

    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    persist = ("--appendonly", "yes", "--appendfsync", "always")
    server = RedisServer(port=port, directory=data, extra_args=persist).start()
    pool = Workers(server.url, queue, tmp_path)
    app = Client(RedisBroker(JSONTransport(), url=server.url, result_ttl=600, max_block=1), default_queue=queue)
    worktasks.register(app)
    Client.instances.remove(app)
    try:
        proc = pool.start()
        pool.wait_ready(proc)
        handles = [app.tasks["sleep_for"](0.05).start() for _ in range(40)]
        wait_until(lambda: "task" in pool.log(proc) and "succeeded" in pool.log(proc), 20, "first results")
        server.stop(kill=True)
        outage = ("lost Redis", "cannot store the result yet")
        wait_until(lambda: any(text in pool.log(proc) for text in outage), 60, "the worker to notice")
        server = RedisServer(port=port, directory=data, extra_args=persist).start()
        restarted = time.monotonic()
        assert [h.result(timeout=60) for h in handles] == [0.05] * 40
        print(f"all tasks done {time.monotonic() - restarted:.2f} s after Redis restarted")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        pool.stop_all()
        app.broker.close()
        server.cleanup()


def test_cli_enqueue_wait_inspect_result_and_purge(app: Client, workers: Workers) -> None:
    env = workers.env()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        import sys

        return subprocess.run(
            [sys.executable, "-m", "minicelery", *args], capture_output=True, text=True, timeout=60, env=env
        )

    workers.start()
    sent = cli("enqueue", "add", "[1, 2, 3]", "--wait-result", "--timeout", "30")
    assert sent.returncode == 0, sent.stderr
    task_id, value = sent.stdout.split()
    assert value == "6"
    assert cli("result", task_id).stdout.strip() == "6"
    failed = cli("enqueue", "boom", '["cli"]', "--wait-result", "--timeout", "30")
    assert failed.returncode == 1 and "ValueError: cli" in failed.stderr
    later = cli("enqueue", "echo", '["later"]', "--delay", "3600")
    assert later.returncode == 0
    inspect = cli("inspect")
    assert "scheduled 1" in inspect.stdout and "live workers: 1" in inspect.stdout, inspect.stdout
    assert cli("result", "nosuchid").returncode == 1
    assert cli("purge").returncode == 1  # asks; no answer on stdin means no
    purged = cli("purge", "--yes")
    assert purged.returncode == 0 and "keys deleted" in purged.stdout
    assert "scheduled 0" in cli("inspect").stdout


def test_a_task_that_keeps_killing_its_worker_is_dead_lettered_not_looped(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    """Like systemd's Restart=, the test restarts each killed worker; after max_lost_leases
    lost leases the next claim dead-letters the task instead of running it again."""
    settings = {"MINICELERY_WORKER__LEASE_SECONDS": "1", "MINICELERY_WORKER__MAX_LOST_LEASES": "2"}
    poison = app.tasks["kill_my_worker"]().start()
    child = app.tasks["describe"](poison)
    child.start()
    worker = workers.start(**settings)
    deaths = 0
    while poison.state not in ("failed", "succeeded"):
        if worker.poll() is not None:  # SIGKILLed by the task: restart it
            assert worker.returncode == -9
            deaths += 1
            assert deaths <= 3, "the poison task was run more than max_lost_leases + 1 times"
            worker = workers.start(**settings)
        time.sleep(0.05)  # the supervisor's pace, not a synchronisation
    assert deaths == 3  # the first run and two reclaims, then no more
    with pytest.raises(WorkerLost, match="died or hung 3 times"):
        poison.result(timeout=1)
    assert r.zscore(QueueKeys(app.default_queue).dead, poison.id) is not None
    assert child.result(timeout=30).startswith("error:WorkerLost:")  # its child got the error
    assert worker.poll() is None  # the last worker lives on


def test_a_cleanly_stopped_worker_is_no_longer_listed_as_live(app: Client, workers: Workers) -> None:
    proc = workers.start()
    workers.wait_ready(proc)
    live = wait_until(lambda: app.broker.queue_report(app.default_queue, 5)["workers"], 20, "the worker listed")
    assert len(live) == 1  # type: ignore[arg-type]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert app.broker.queue_report(app.default_queue, 5)["workers"] == []


def test_a_finish_after_redis_lost_its_data_says_so_instead_of_blaming_a_lease(tmp_path: Path, queue: str) -> None:
    import worktasks

    server = RedisServer().start()  # a private server: the test flushes it
    pool = Workers(server.url, queue, tmp_path)
    app = Client(RedisBroker(JSONTransport(), url=server.url, max_block=1), default_queue=queue)
    worktasks.register(app)
    Client.instances.remove(app)
    port = free_port()
    try:
        proc = pool.start(MINICELERY_METRICS__ENABLED="true", MINICELERY_METRICS__PORT=str(port))
        handle = app.tasks["gate"]("lost").start()
        wait_until(lambda: handle.state == "running", 20, "the task to start")
        app.broker.redis.flushall()  # what a Redis restart without persistence leaves
        app.broker.redis.rpush("test:gate:lost", "go")
        wait_until(lambda: "Redis no longer has the task" in pool.log(proc), 20, "the finish to be refused")
        assert "late finish" not in pool.log(proc)
        assert app.tasks["echo"]("on").start().result(timeout=20) == "on"  # and the worker goes on
        # The refused run is counted as what it was, not as a task done.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert 'minicelery_task_outcomes_total{outcome="gone",task="gate"} 1.0' in text
        assert 'minicelery_task_outcomes_total{outcome="succeeded",task="gate"} 0.0' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "stopped: 1 done, 0 failed" in pool.log(proc)
        assert "1 finishes of tasks Redis no longer had" in pool.log(proc)
    finally:
        pool.stop_all()
        app.broker.close()
        server.cleanup()


def test_a_result_waiter_rides_out_a_redis_restart_within_its_timeout(tmp_path: Path, queue: str) -> None:
    import worktasks

    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    persist = ("--appendonly", "yes", "--appendfsync", "always")
    server = RedisServer(port=port, directory=data, extra_args=persist).start()
    app = Client(RedisBroker(JSONTransport(), url=server.url, max_block=1), default_queue=queue)
    worktasks.register(app)
    Client.instances.remove(app)
    pool = Workers(server.url, queue, tmp_path)
    outcome: list[object] = []
    try:
        handle = app.tasks["echo"]("survived").start()  # no worker yet: it waits in Redis
        waiter = threading.Thread(target=lambda: outcome.append(_result_or_error(handle, 60)))
        waiter.start()
        wait_until(lambda: app.broker.redis.hget(QueueKeys(queue).info, f"{handle.id}:w"), 10, "the waiter to watch")
        server.stop(kill=True)
        server = RedisServer(port=port, directory=data, extra_args=persist).start()
        pool.start()
        waiter.join(timeout=60)
        assert outcome == ["survived"]
    finally:
        pool.stop_all()
        app.broker.close()
        server.cleanup()


def _result_or_error(handle: object, timeout: float) -> object:
    try:
        return handle.result(timeout=timeout)  # type: ignore[attr-defined]
    except Exception as exc:
        return exc


def test_a_worker_run_in_process_puts_back_the_signal_handlers_it_found(app: Client) -> None:
    """app.start() in a user's process must leave that process's signal handling as it was."""

    def users_handler(signum: int, frame: object) -> None:
        pass

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGALRM)}
    previous = signal.signal(signal.SIGTERM, users_handler)
    try:
        app.tasks["echo"]("one").start()
        assert make_worker(app).run(burst=True) == 0  # with its own handlers, then without
        assert signal.getsignal(signal.SIGTERM) is users_handler
        assert {sig: signal.getsignal(sig) for sig in before} == before
    finally:
        signal.signal(signal.SIGTERM, previous)
