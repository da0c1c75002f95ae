"""Children whose parents are never started: listed by inspect, dead-lettered after orphan_ttl.

Time passes on the Redis clock: a test waits until Redis's TIME is past a child's registration
plus the (tiny) orphan_ttl, a condition, not a sleep of a guessed length.
"""

from __future__ import annotations

import json

import pytest
import redis
from conftest import Workers, wait_until
from helpers import drain

from minicelery import Client, ParentNeverStarted
from minicelery.admin import Admin
from minicelery.keys import QueueKeys
from minicelery.settings import load_settings

TINY_TTL = 0.001  # seconds: one millisecond on the Redis clock


def redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds * 1000 + micros // 1000)


def wait_past_orphan_ttl(r: redis.Redis, queue: str, *task_ids: str) -> None:
    """Until Redis's clock is past each task's registration plus TINY_TTL."""
    keys = QueueKeys(queue)
    latest = max(float(r.zscore(keys.waiting, task_id) or 0) for task_id in task_ids)
    wait_until(lambda: redis_ms(r) > latest + TINY_TTL * 1000, 5, "the Redis clock to pass the orphan TTL")


def inspect(redis_url: str, queue: str, capsys: pytest.CaptureFixture[str], *, as_json: bool) -> str:
    settings = load_settings(redis={"url": redis_url}, worker={"queues": [queue], "orphan_ttl": 3600})
    admin = Admin(settings)
    try:
        assert admin.inspect([queue], as_json=as_json) == 0
    finally:
        admin.broker.close()
    return capsys.readouterr().out


def test_a_child_of_a_parent_never_started_shows_in_inspect_then_is_dead_lettered_after_orphan_ttl(
    app: Client, redis_url: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    echo, describe = app.tasks["echo"], app.tasks["describe"]
    never = echo(1)  # never started
    child = describe(never)
    grandchild = describe(child)  # waits for child, which is sent: not an orphan itself
    queue = app.default_queue

    (orphans,) = [json.loads(inspect(redis_url, queue, capsys, as_json=True))[queue]["orphans"]]
    assert orphans["count"] == 1 and orphans["waiting"] == 2 and orphans["orphan_ttl"] == 3600
    (listed,) = orphans["oldest"]
    assert listed["id"] == child.id and listed["name"] == "describe" and listed["never_started"] == [never.id]
    assert listed["waited_seconds"] >= 0 and listed["swept_in_seconds"] == 3600 - listed["waited_seconds"]
    text = inspect(redis_url, queue, capsys, as_json=False)
    assert "waiting for parents never started: 1 (dead-lettered after worker.orphan_ttl, 3600 s)" in text
    assert f"{child.id} describe waited" in text and f"never started: {never.id}" in text

    wait_past_orphan_ttl(r, queue, child.id)
    drain(app, orphan_ttl=TINY_TTL)  # a worker sweeps on start, then runs what the sweep released

    assert child.state == "failed" and child.id in app.broker.dead_letters(queue)
    with pytest.raises(ParentNeverStarted, match=f"parent task {never.id} was never started"):
        child.result(timeout=5)
    assert grandchild.result(timeout=5).startswith(f"error:ParentNeverStarted:parent task {never.id}")
    assert json.loads(inspect(redis_url, queue, capsys, as_json=True))[queue]["orphans"]["count"] == 0

    never.start()  # too late: it runs, and releases nothing a second time
    drain(app)
    assert never.result(timeout=5) == 1
    assert child.state == "failed" and app.broker.depths(queue)["waiting"] == 0

    assert app.broker.revive(queue, [child.id]) == [child.id]  # retry-dead: the error in the parent's place
    drain(app)
    assert child.result(timeout=5).startswith(f"error:ParentNeverStarted:parent task {never.id}")


def test_a_child_whose_parent_was_started_is_never_swept_even_if_the_parent_outlasts_the_ttl(
    app: Client, r: redis.Redis
) -> None:
    queue = app.default_queue
    keys = QueueKeys(queue)
    parent = app.tasks["echo"]("slow").start()
    child = app.tasks["describe"](parent)
    (running,) = app.broker.claim(queue, "tok", 600_000, "busy-worker")  # type: ignore[misc]
    assert running.id == parent.id  # the parent runs, and keeps running past the orphan TTL
    registered = r.zscore(keys.waiting, child.id)
    wait_past_orphan_ttl(r, queue, child.id)

    drain(app, orphan_ttl=TINY_TTL)  # sweeps; nothing is ready

    assert child.state == "waiting"
    assert r.zscore(keys.waiting, child.id) > registered  # type: ignore[operator]  # looked at, kept
    assert app.broker.orphans(queue)["count"] == 0
    status = app.broker.finish(queue, parent.id, running.token, succeeded=True, envelope=b'{"ok":true,"value":"slow"}')
    assert status == "ok"
    drain(app, orphan_ttl=TINY_TTL)
    assert child.result(timeout=5) == "value:'slow'"


def test_a_worker_process_sweeps_an_orphan_and_keeps_the_child_of_a_running_parent(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    """The real worker: it sweeps on start and once per lease period, busy or idle."""
    queue = app.default_queue
    gate = f"orphans-{queue}"
    orphan = app.tasks["describe"](app.tasks["echo"](1))
    parent = app.tasks["gate"](gate).start()
    child = app.tasks["describe"](parent)
    wait_past_orphan_ttl(r, queue, orphan.id, child.id)

    proc = workers.start(MINICELERY_WORKER__ORPHAN_TTL=str(TINY_TTL))

    wait_until(lambda: orphan.state == "failed", 20, "the orphan to be swept")
    wait_until(lambda: parent.state == "running", 20, "the parent to run")
    assert child.state == "waiting"
    assert "parents were never started" in workers.log(proc) and orphan.id in workers.log(proc)
    r.rpush(f"test:gate:{gate}", 1)
    assert child.result(timeout=20) == f"value:{gate!r}"
    with pytest.raises(ParentNeverStarted):
        orphan.result(timeout=1)
