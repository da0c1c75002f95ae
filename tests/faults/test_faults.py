"""Fault injection against real worker processes and a real Redis with AOF on.

Each scenario records its figures in the scorecard printed at the end of the run, and fails on
any loss: a task accepted (its enqueue acknowledged) must end succeeded or in the dead-letter
set. Extra executions are allowed (at-least-once) only where a lost lease explains them.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import worktasks
from conftest import Workers, wait_until
from faultkit import DurableRedis, Outage, record, rss_kb
from helpers import succeeded

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.errors import BrokerError
from minicelery.keys import QueueKeys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FAST_RECOVERY = {  # short leases and backoff so that each scenario takes seconds
    "MINICELERY_WORKER__LEASE_SECONDS": "1",
    "MINICELERY_WORKER__IDLE_BLOCK_MAX": "0.5",
    "MINICELERY_WORKER__RECONNECT_MAX_DELAY": "1",
    "MINICELERY_WORKER__SHUTDOWN_GRACE": "2",
    "MINICELERY_LOGGING__LEVEL": "INFO",  # wait_ready looks for the "ready" line
}


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def producer(url: str, queue: str) -> Client:
    options = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    app = Client(RedisBroker(JSONTransport(), url=url, max_block=1, connection_options=options), default_queue=queue)
    Client.instances.remove(app)
    worktasks.register(app)
    return app


def audit(r: redis.Redis, queue: str, tags: dict[str, str]) -> dict[str, Any]:
    """Where every accepted task ended. `tags`: task id -> the tag its count_run body counts."""
    keys = QueueKeys(queue)
    ids = list(tags)
    pipe = r.pipeline(transaction=False)
    for task_id in ids:
        pipe.hmget(keys.info, f"{task_id}:s", f"{task_id}:a", f"{task_id}:l", f"{task_id}:p")
    rows = pipe.execute()
    done = succeeded(r, queue, ids)
    runs = worktasks.executions(r)
    dead = {i.decode() for i in r.zrange(keys.dead, 0, -1)}
    out = {"tasks": len(ids), "lost": 0, "duplicated": 0, "dead_lettered": 0, "unexplained": 0, "released_twice": 0}
    for task_id, (_state, _attempts, lost_leases, pending), ok in zip(ids, rows, done, strict=True):
        ran = runs.get(tags[task_id], 0)
        if task_id in dead:
            out["dead_lettered"] += 1
        elif not ok or ran == 0:
            out["lost"] += 1
        out["duplicated"] += max(0, ran - 1)
        if ran - 1 > int(lost_leases or 0):  # an extra run that no lost lease explains
            out["unexplained"] += 1
        if pending is not None and int(pending) < 0:
            out["released_twice"] += 1
    return out


def test_churn_sigkill_a_random_worker_every_half_second(durable: DurableRedis, tmp_path: Path) -> None:
    queue = f"churn-{uuid.uuid4().hex[:6]}"
    pool = Workers(durable.url, queue, tmp_path)
    env = pool.env(**FAST_RECOVERY)
    app = producer(durable.url, queue)
    tags: dict[str, str] = {}
    count_run = app.tasks["count_run"]

    def node(tag: str, *parents: Any) -> Any:
        handle = count_run(tag, *parents)
        tags[handle.id] = tag
        return handle

    # 1,000 groups of five: a chain a -> b -> c, d after a, and e after both c and d (fan-in).
    for g in range(1000):
        a = node(f"a{g}")
        c = node(f"c{g}", node(f"b{g}", a))
        node(f"e{g}", c, node(f"d{g}", a)).start()
    live = [pool.start(env=env) for _ in range(3)]
    kills, began = 0, time.monotonic()
    r = redis.Redis.from_url(durable.url)
    try:
        while len(worktasks.executions(r)) < len(tags) and time.monotonic() - began < 200:
            time.sleep(0.5)  # the chaos loop's own pace, not a synchronisation
            victim = random.choice(live)
            victim.kill()
            victim.wait()
            kills += 1
            live.remove(victim)
            live.append(pool.start(env=env))
        wait_until(lambda: audit(r, queue, tags)["lost"] == 0, 60, "every task to finish after the chaos")
        elapsed = time.monotonic() - began
        result = audit(r, queue, tags)
        record("churn: SIGKILL every 0.5 s", kills=kills, seconds=round(elapsed, 1), **result)
        assert result["lost"] == 0 and result["unexplained"] == 0 and result["released_twice"] == 0, result
    finally:
        pool.stop_all()
        r.close()


def enqueue_through_restarts(
    durable: DurableRedis, app: Client, total: int, kill_after: tuple[int, ...]
) -> dict[str, str]:
    """Enqueue `total` tasks one at a time; SIGKILL Redis and restart it from its AOF right after
    the acks named in `kill_after`. Returns the acknowledged tasks (id -> tag)."""
    acked: dict[str, str] = {}
    i = 0
    while len(acked) < total:
        tag = f"r{i}"
        i += 1
        try:
            handle = app.tasks["count_run"](tag).start()
        except BrokerError:
            time.sleep(0.05)  # Redis is restarting: this one was never acknowledged
            continue
        acked[handle.id] = tag
        if len(acked) in kill_after:
            durable.restart()
    return acked


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_redis_killed_twice_mid_run_loses_nothing_it_acknowledged(tmp_path: Path, fsync: str) -> None:
    durable = DurableRedis(tmp_path / "redis", fsync=fsync).start()
    queue = f"restart-{uuid.uuid4().hex[:6]}"
    pool = Workers(durable.url, queue, tmp_path)
    r = redis.Redis.from_url(durable.url, socket_timeout=5)
    try:
        for _ in range(2):
            pool.start(env=pool.env(**FAST_RECOVERY))
        app = producer(durable.url, queue)
        acked = enqueue_through_restarts(durable, app, 1500, kill_after=(500, 1000))
        if fsync == "always":
            wait_until(lambda: audit(r, queue, acked)["lost"] == 0, 90, "every acknowledged task to finish")
        else:  # some acknowledged writes are gone for good: wait until the rest have run
            wait_until(lambda: r.llen(QueueKeys(queue).ready) == 0 and r.zcard(QueueKeys(queue).running) == 0, 90,
                       "the queue to drain")  # fmt: skip
        result = audit(r, queue, acked)
        record(f"Redis SIGKILL x2, appendfsync {fsync}", **result)
        if fsync == "always":
            assert result["lost"] == 0 and result["unexplained"] == 0, result
        assert all(p.poll() is None for p in pool.procs)  # the workers rode it out
    finally:
        pool.stop_all()
        r.close()
        durable.stop()


def test_a_worker_stopped_past_its_lease_has_its_late_finish_rejected(durable: DurableRedis, tmp_path: Path) -> None:
    queue = f"stop-{uuid.uuid4().hex[:6]}"
    pool = Workers(durable.url, queue, tmp_path)
    app = producer(durable.url, queue)
    try:
        first = pool.start(env=pool.env(**FAST_RECOVERY))
        pool.wait_ready(first)
        handle = app.tasks["pid_after"](1.0).start()
        wait_until(lambda: handle.state == "running", 10, "the task to start")
        first.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        second = pool.start(env=pool.env(**FAST_RECOVERY))
        assert handle.result(timeout=30) == second.pid  # reclaimed after the lease, run again
        recovery = time.monotonic() - stopped_at
        first.send_signal(signal.SIGCONT)
        wait_until(lambda: "late finish rejected" in Workers.log(first), 20, "the late finish to be rejected")
        assert handle.result(timeout=1) == second.pid  # not overwritten by the late run
        record("SIGSTOP past the lease, SIGCONT", recovery_seconds=round(recovery, 2), late_finishes_rejected=1)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0 and "1 late finishes" in Workers.log(first)
    finally:
        pool.stop_all()


def test_redis_unreachable_and_paused_loses_nothing_and_workers_resume(durable: DurableRedis, tmp_path: Path) -> None:
    queue = f"net-{uuid.uuid4().hex[:6]}"
    pool = Workers(durable.url, queue, tmp_path)
    app = producer(durable.url, queue)
    r = redis.Redis.from_url(durable.url)
    tags: dict[str, str] = {}
    resumed = {}
    try:
        for _ in range(2):
            pool.start(env=pool.env(**FAST_RECOVERY))
        for phase, fault in (("drop-1s", ("DROP", 1.0)), ("reject-5s", ("REJECT", 5.0)), ("pause-2s", ("PAUSE", 2.0))):
            # Some tasks run quickly now, some are due in the middle of the fault, and two are
            # still running when it starts: their renewals and finishes hit the fault.
            for i in range(100):
                tags[app.tasks["count_run"](f"{phase}-{i}").start().id] = f"{phase}-{i}"
            for i in range(50):
                tags[app.tasks["count_run"](f"{phase}-due-{i}").wait(0.5).id] = f"{phase}-due-{i}"
            for i in range(2):
                tags[app.tasks["slow_count"](f"{phase}-slow-{i}", 0.8).start().id] = f"{phase}-slow-{i}"
            wait_until(lambda: r.zcard(QueueKeys(queue).running) > 0, 10, "tasks in flight")
            how, seconds = fault
            if how == "PAUSE":
                r.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
                time.sleep(seconds)  # the fault's length, not a synchronisation
            else:
                with Outage(durable.port, how):
                    time.sleep(seconds)  # the fault's length, not a synchronisation
            ended = time.monotonic()
            marker = app.tasks["count_run"](f"{phase}-after").start()
            tags[marker.id] = f"{phase}-after"
            marker.result(timeout=60)
            resumed[phase] = round(time.monotonic() - ended, 2)
        wait_until(lambda: audit(r, queue, tags)["lost"] == 0, 60, "every task to finish")
        result = audit(r, queue, tags)
        record("Redis DROP 1 s, REJECT 5 s, PAUSE 2 s", **result, resume_seconds=resumed)
        assert result["lost"] == 0 and result["unexplained"] == 0, result
        assert all(p.poll() is None for p in pool.procs)
    finally:
        pool.stop_all()
        r.close()


def test_ten_thousand_malformed_payloads_fail_visibly_with_flat_memory(durable: DurableRedis, tmp_path: Path) -> None:
    queue = f"junk-{uuid.uuid4().hex[:6]}"
    keys = QueueKeys(queue)
    r = redis.Redis.from_url(durable.url)
    kinds = [b"{not json", b"[1,2]", b'{"v":1,"id":"x","name":"os.system","args":[],"kwargs":{}}', b"\xff\xfe"]
    pipe = r.pipeline(transaction=False)
    for i in range(10_000):
        task_id = f"junk{i}"
        pipe.hset(keys.payload, task_id, kinds[i % len(kinds)])
        pipe.hset(keys.info, f"{task_id}:s", "ready")
        pipe.lpush(keys.ready, task_id)
    pipe.execute()
    pool = Workers(durable.url, queue, tmp_path)
    try:
        worker = pool.start(env=pool.env(**FAST_RECOVERY))
        wait_until(lambda: r.zcard(keys.dead) >= 2_000, 120, "2,000 failures")
        early = rss_kb(worker.pid)
        wait_until(lambda: r.zcard(keys.dead) == 10_000, 120, "all 10,000 failures")
        late = rss_kb(worker.pid)
        app = producer(durable.url, queue)
        assert app.tasks["echo"]("alive").start().result(timeout=30) == "alive"
        failed = sum(1 for s in r.hvals(keys.info) if s == b"failed")
        record("10,000 malformed payloads", failed=failed, rss_kb_at_2000=early, rss_kb_at_10000=late)
        assert failed == 10_000
        assert late - early < 4096, (early, late)  # flat: no per-payload growth (<0.5 KB per failure)
        assert worker.poll() is None
    finally:
        pool.stop_all()
        r.close()
