"""Real worker processes against a real Redis: DAGs, schedules, cleanup, waking, bad payloads."""

from __future__ import annotations

import random
import re
import signal
import time

import pytest
import redis
from conftest import Workers, wait_until

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.errors import PayloadTooLarge
from minicelery.keys import QueueKeys
from minicelery.redis_server import RedisServer


def test_random_dag_of_1000_tasks_runs_each_exactly_once_across_three_workers(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    rng = random.Random(7)
    node = app.tasks["node"]
    handles, expected = [], []
    for i in range(1000):
        parents = rng.sample(range(i), k=min(i, rng.choice([0, 0, 1, 2, 3])))
        handles.append(node(f"n{i}", *[handles[p] for p in parents]))
        expected.append(1 + sum(expected[p] for p in parents))
    procs = [workers.start() for _ in range(3)]
    for handle in handles:
        handle.start()  # roots start; children are already registered and start no one twice
    for handle, value in zip(handles, expected, strict=True):
        assert handle.result(timeout=60) == value
    runs = r.hgetall(f'test:runs:["{app.default_queue}"]')
    assert len(runs) == 1000 and set(runs.values()) == {b"1"}
    for proc in procs:
        # (under load a worker can still be starting when the work is done: a SIGTERM before
        # its handlers are installed would kill it, which is not what this test is about)
        workers.wait_ready(proc)
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=20) for proc in procs] == [0, 0, 0]
    done = sum(int(m) for proc in procs for m in re.findall(r"stopped: (\d+) done", workers.log(proc)))
    assert done == 1000


def test_scheduled_tasks_run_no_earlier_than_due(app: Client, workers: Workers) -> None:
    workers.wait_ready(workers.start())
    server_now = app.broker.redis.time()
    sent_at = server_now[0] + server_now[1] / 1e6
    handles = [(delay, app.tasks["redis_time"]().wait(delay)) for delay in (0.2, 0.5, 1.0, 1.5)]
    for delay, handle in handles:
        assert handle.result(timeout=20) >= sent_at + delay


def test_nothing_of_a_task_remains_after_its_result_ttl(redis_url: str, queue: str, r: redis.Redis) -> None:
    import worktasks

    app = Client(RedisBroker(JSONTransport(), url=redis_url, result_ttl=0.3, max_block=1), default_queue=queue)
    worktasks.register(app)
    Client.instances.remove(app)
    parent = app.tasks["echo"](1).start()
    child = app.tasks["describe"](parent)
    from helpers import drain

    drain(app)
    assert child.result(timeout=5) == "value:1"
    keys = QueueKeys(queue)

    def traces() -> list[str]:
        found = []
        for key in r.scan_iter(match=keys.all_keys_pattern()):
            kind = r.type(key)
            members: list[bytes] = []
            if kind == b"hash":
                members = r.hkeys(key)
            elif kind == b"zset":
                members = r.zrange(key, 0, -1)
            elif kind == b"list":
                members = r.lrange(key, 0, -1)
            for task_id in (parent.id, child.id):
                if task_id in key.decode() or any(task_id in m.decode() for m in members):
                    found.append(key.decode())
        return found

    assert traces()
    # Any later claim sweeps what has expired; a worker's idle sweep makes one.
    wait_until(lambda: app.broker.claim(queue, "t", 1000, "sweeper") and not traces(), 10, "expired keys swept")
    assert not r.exists(keys.waiting)


def test_an_idle_worker_sweeps_thousands_of_expired_results_with_no_traffic(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    """Memory returns to its baseline after the result TTL even on a quiet queue: the idle
    worker wakes for the expiries (coalesced) and sweeps 500 per call."""
    keys = QueueKeys(app.default_queue)
    proc = workers.start(MINICELERY_WORKER__RESULT_TTL="1")
    handles = app.start_many([app.tasks["echo"](i) for i in range(2000)])
    assert handles[-1].result(timeout=60) == 1999
    wait_until(lambda: r.zcard(keys.expiry) == 0 and r.hlen(keys.payload) == 0, 30, "every result swept")
    assert r.hlen(keys.result) == 0
    assert all(field.startswith(b"#") for field in r.hkeys(keys.info))  # only queue-wide counters left
    assert proc.poll() is None


def test_idle_worker_makes_about_one_redis_command_per_block_period(tmp_path, queue: str) -> None:
    # A server of its own, so command counts are this worker's alone.
    with RedisServer() as server:
        pool = Workers(server.url, queue, tmp_path)
        try:
            proc = pool.start(MINICELERY_WORKER__IDLE_BLOCK_MAX="0.5", MINICELERY_WORKER__LEASE_SECONDS="30")
            pool.wait_ready(proc)
            client = redis.Redis.from_url(server.url)
            time.sleep(0.2)  # let start-up settle: the first claim happens at start
            client.config_resetstat()
            started = time.monotonic()
            wait_until(lambda: time.monotonic() - started > 3, 10, "3 idle seconds")  # observing, not syncing
            stats = client.info("commandstats")
            elapsed = time.monotonic() - started
            calls = {
                name: v["calls"] for name, v in stats.items() if not name.startswith(("cmdstat_config", "cmdstat_info"))
            }
            periods = elapsed / 0.5
            assert set(calls) <= {"cmdstat_bzpopmin"}, calls
            assert calls["cmdstat_bzpopmin"] <= periods + 1
        finally:
            pool.stop_all()


def test_one_thousand_tasks_across_four_idle_workers_waste_almost_no_wake_ups(app: Client, workers: Workers) -> None:
    procs = [workers.start() for _ in range(4)]
    for proc in procs:
        workers.wait_ready(proc)
    handles = app.start_many([app.tasks["echo"](i) for i in range(1000)])
    assert [h.result(timeout=60) for h in handles] == list(range(1000))
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    wasted = sum(int(m) for p in procs for m in re.findall(r"(\d+) wasted wake-ups", workers.log(p)))
    done = sum(int(m) for p in procs for m in re.findall(r"stopped: (\d+) done", workers.log(p)))
    assert done == 1000
    print(f"wasted wake-ups for 1000 tasks across 4 workers: {wasted}")
    assert wasted <= 10  # ~1%: a wake that finds the last task already taken


def test_a_lone_worker_wakes_for_delayed_tasks_without_wasted_wake_ups(app: Client, workers: Workers) -> None:
    """The wake-up a worker held for a due time is passed on when it goes busy; once that time
    has come, passing it on would wake the worker itself for nothing, once per delayed task."""
    proc = workers.start()
    workers.wait_ready(proc)
    handles = [app.tasks["echo"](i).wait(0.3 * (i + 1)) for i in range(4)]
    assert [h.result(timeout=30) for h in handles] == list(range(4))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "stopped: 4 done, 0 failed, 0 wasted wake-ups" in workers.log(proc)


def test_malformed_payloads_planted_in_redis_fail_visibly_and_the_worker_keeps_going(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    keys = QueueKeys(app.default_queue)
    planted = {
        "notjson": b"{this is not json",
        "wrongshape": b"[1, 2, 3]",
        "unknown": b'{"v":1,"id":"unknown","name":"os.system","args":["echo pwned"],"kwargs":{},'
        b'"arg_deps":{},"kwarg_deps":{},"time_limit":null,"retries":0}',
        "binary": b"\xff\xfe\x00garbage",
        "huge": b'{"v":1,"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}',
        "nested": b'{"v":1,"args":' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deeper than any parser stack
        "badargs": b'{"v":1,"id":"badargs","name":"echo","args":[1,2,3,4],"kwargs":{},'
        b'"arg_deps":{},"kwarg_deps":{},"time_limit":null,"retries":3}',
    }
    for task_id, payload in planted.items():
        r.hset(keys.payload, task_id, payload)
        r.hset(keys.info, f"{task_id}:s", "ready")
        r.lpush(keys.ready, task_id)
    r.lpush(keys.ready, "nopayload")
    r.hset(keys.info, "nopayload:s", "ready")
    proc = workers.start(MINICELERY_WORKER__UNKNOWN_TASK_GRACE="0")  # "os.system" is dead-lettered at once
    good = app.tasks["echo"]("still alive").start()
    assert good.result(timeout=30) == "still alive"
    for task_id in [*planted, "nopayload"]:
        assert r.hget(keys.info, f"{task_id}:s") == b"failed", task_id
    errors = {task_id: app.handle(task_id).result for task_id in [*planted, "nopayload"]}
    messages = {}
    for task_id, get in errors.items():
        try:
            get(timeout=1)
        except Exception as exc:
            messages[task_id] = f"{type(exc).__name__}: {exc}"
    assert "not valid JSON" in messages["notjson"]
    assert "an array must be [3, name, args, fields], not [1, 2, 3]" in messages["wrongshape"]
    assert "no task named 'os.system'" in messages["unknown"]
    assert "over the limit" in messages["huge"]
    assert "missing" in messages["nopayload"]
    assert "not valid JSON" in messages["nested"] and "recursion" in messages["nested"]
    assert messages["badargs"].startswith("BadArguments: arguments do not fit echo(")  # and not retried 3 times
    assert r.hget(keys.info, "badargs:a") == b"1"
    huge_result = app.tasks["echo"]("y" * (2 * 1024 * 1024))  # an argument over the limit: refused at enqueue
    with pytest.raises(PayloadTooLarge):
        huge_result.start()
    big = app.tasks["repeat"]("z", 2 * 1024 * 1024).start()  # a small payload whose result is too big
    with pytest.raises(PayloadTooLarge, match="task result"):
        big.result(timeout=30)
    assert proc.poll() is None
