"""Cancel: handle.cancel() and `minicelery cancel`, for waiting, scheduled, ready, retrying and
running tasks, against a real Redis (the script raw) and real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import redis
from conftest import CLI_ON, Workers, wait_until
from worktasks import executions

from minicelery import Cancelled, Client, JSONTransport, RedisBroker
from minicelery.keys import QueueKeys
from minicelery.records import Lease, ScriptStatus

# --- the script on its own --------------------------------------------------------------------


def _cancel(broker: RedisBroker, queue: str, *ids: str) -> list[ScriptStatus]:
    return broker.cancel(queue, list(ids), b'{"ok":false,"error":{"type":"Cancelled","message":"x"}}', "test")


def test_cancel_takes_a_task_out_of_wherever_it_waits_and_leaves_finished_ones_alone(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=60, max_block=1)
    keys = QueueKeys(queue)
    broker.enqueue(queue, "done", b"{}")
    (done,) = broker.claim(queue, "tok", 60_000, "w1")  # type: ignore[misc]
    broker.enqueue(queue, "running", b"{}")
    (running,) = broker.claim(queue, "tok2", 60_000, "w1")  # type: ignore[misc]
    broker.enqueue(queue, "ready", b"{}")
    broker.enqueue(queue, "later", b"{}", delay_ms=60_000)
    broker.enqueue(queue, "child", b"{}", parents=["never-sent"])
    assert broker.finish(queue, "done", done.token, succeeded=True, envelope=b'{"ok":true,"value":1}') == "ok"
    statuses = _cancel(broker, queue, "ready", "later", "child", "running", "done", "nope")
    assert statuses == ["cancelled"] * 4 + ["finished", "unknown"]
    assert r.llen(keys.ready) == 0 and r.zcard(keys.scheduled) == 0 and r.zcard(keys.running) == 0
    assert r.zcard(keys.waiting) == 0 and r.hget(keys.info, "never-sent:c") is None  # the parent forgot it
    assert {r.hget(keys.info, f"{i}:s") for i in ("ready", "later", "child", "running")} == {b"cancelled"}
    assert broker.outcome(queue, "done") == ("succeeded", b'{"ok":true,"value":1}')  # left as it is
    assert broker.depths(queue)["cancelled"] == 4
    # The running task's worker: its renewal learns of the cancel, its finish changes nothing.
    assert broker.renew_many([Lease(queue, "running", running.token)], 1000) == ["cancelled"]
    assert broker.finish(queue, "running", running.token, succeeded=True, envelope=b'{"ok":true}') == "cancelled"
    assert r.hget(keys.info, "running:s") == b"cancelled"


def test_cancel_racing_a_finish_exactly_one_wins(redis_url: str, queue: str, r: redis.Redis) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=60, max_block=1)
    for first in ("cancel", "finish"):
        task_id = f"t-{first}"
        broker.enqueue(queue, task_id, b"{}")
        (claim,) = broker.claim(queue, "tok" + first, 60_000, "w1")  # type: ignore[misc]
        if first == "cancel":
            assert _cancel(broker, queue, task_id) == ["cancelled"]
            assert broker.finish(queue, task_id, claim.token, succeeded=True, envelope=b'{"ok":true}') == "cancelled"
            assert r.hget(QueueKeys(queue).info, f"{task_id}:s") == b"cancelled"
        else:
            assert broker.finish(queue, task_id, claim.token, succeeded=True, envelope=b'{"ok":true}') == "ok"
            assert _cancel(broker, queue, task_id) == ["finished"]
            assert broker.outcome(queue, task_id)[0] == "succeeded"


def test_a_cancelled_task_is_not_requeued_when_its_lease_runs_out(redis_url: str, queue: str) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=60, max_block=1)
    broker.enqueue(queue, "t1", b"{}")
    broker.claim(queue, "tok", 1, "w1")  # a 1 ms lease: expired at the next claim
    assert _cancel(broker, queue, "t1") == ["cancelled"]
    assert broker.claim(queue, "tok2", 1000, "w2").__class__.__name__ == "Idle"  # nothing reclaimed


def test_cancel_frees_the_idempotency_key_and_takes_a_dead_letter_out(app: Client, r: redis.Redis) -> None:
    first = app.tasks["echo"]("a").start(key="order-1")
    assert first.cancel()
    again = app.tasks["echo"]("b").start(key="order-1")
    assert again.id != first.id  # the key was freed
    keys = QueueKeys(app.default_queue)
    r.zadd(keys.dead, {again.id: 1})  # as if it had failed for good
    r.hset(keys.info, f"{again.id}:s", "failed")
    assert again.cancel() and r.zscore(keys.dead, again.id) is None
    assert again.state == "cancelled"


def test_a_cancelled_task_is_swept_after_its_result_ttl(redis_url: str, queue: str, r: redis.Redis) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=0.001, max_block=1)
    broker.enqueue(queue, "t1", b"{}")
    assert _cancel(broker, queue, "t1") == ["cancelled"]
    keys = QueueKeys(queue)

    def swept() -> bool:
        broker.claim(queue, "tok", 1000, "w1")  # a claim sweeps what is past its TTL
        return r.hget(keys.info, "t1:s") is None

    wait_until(swept, 10, "the sweep")
    assert r.hget(keys.result, "t1") is None and r.zscore(keys.expiry, "t1") is None
    assert broker.depths(queue)["cancelled"] == 0


# --- against real workers ---------------------------------------------------------------------


def test_a_task_cancelled_while_no_worker_runs_never_runs_once_workers_start(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    tag = uuid.uuid4().hex
    ready = app.tasks["count_run"](f"{tag}-ready").start()
    later = app.tasks["count_run"](f"{tag}-later").wait(1)
    parent = app.tasks["count_run"](f"{tag}-parent")
    child = app.tasks["count_run"](f"{tag}-child", parent)
    assert ready.cancel() and later.cancel() and child.cancel()
    workers.start()
    parent.start()
    assert parent.result(timeout=30) == f"{tag}-parent"
    after = app.tasks["count_run"](f"{tag}-after").wait(2)  # due after the cancelled scheduled one
    assert after.result(timeout=30) == f"{tag}-after"
    ran = executions(r)
    assert not any(ran.get(f"{tag}-{name}") for name in ("ready", "later", "child"))
    for handle in (ready, later, child):
        assert handle.state == "cancelled"
        with pytest.raises(Cancelled, match=r"cancelled \(by api\)"):
            handle.result(timeout=1)


def test_a_retry_waiting_out_its_backoff_is_cancelled(app: Client, workers: Workers) -> None:
    producer = Client(app.broker, default_queue=app.default_queue)
    Client.instances.remove(producer)
    boom = producer.task(name="boom", retries=5, retry_backoff=30)(app.tasks["boom"].fn)
    workers.start()
    handle = boom("again").start()
    wait_until(lambda: handle.state == "scheduled", 30, "the first failure's retry to be scheduled")
    assert handle.cancel()
    with pytest.raises(Cancelled):
        handle.result(timeout=1)


def test_a_running_task_is_interrupted_its_finally_runs_and_its_children_get_cancelled(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    proc = workers.start()
    tag = uuid.uuid4().hex
    running = app.tasks["marked_sleep"](tag, 60)
    child = app.tasks["describe"](running)
    running.start()
    wait_until(lambda: r.hget("test:started", tag) == b"1", 20, "the task to start")
    assert running.cancel()
    with pytest.raises(Cancelled):
        running.result(timeout=1)  # its outcome at once, whatever the worker does next
    assert child.result(timeout=30).startswith("error:Cancelled:")
    wait_until(lambda: "was cancelled (by api) while it ran: interrupting it" in workers.log(proc), 10, "the interrupt")
    wait_until(lambda: "cancelled while it ran; this run's outcome is dropped" in workers.log(proc), 10, "its end")
    assert r.hget("test:finished", tag) is None  # interrupted in its sleep, before its last line
    assert app.tasks["echo"]("next").start().result(timeout=30) == "next"  # no retry: the worker goes on
    assert running.state == "cancelled"


def test_cascade_cancels_every_unfinished_descendant(app: Client, r: redis.Redis) -> None:
    root = app.tasks["echo"]("root")
    child = app.tasks["echo"](root)
    grandchild = app.tasks["echo"](child)
    other = app.tasks["describe"](root)
    assert root.cancel(cascade=True) is False  # never sent: nothing to cancel
    root.start()
    assert root.cancel(cascade=True)
    assert [h.state for h in (root, child, grandchild, other)] == ["cancelled"] * 4
    assert r.zcard(QueueKeys(app.default_queue).waiting) == 0


def test_the_cancel_command_says_what_it_did_for_each_id(app: Client, redis_url: str) -> None:
    waiting = app.tasks["echo"]("x").wait(3600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICELERY_")}
    env |= {"MINICELERY_REDIS__URL": redis_url, "MINICELERY_WORKER__QUEUES": f'["{app.default_queue}"]', **CLI_ON}
    run = subprocess.run(
        [sys.executable, "-m", "minicelery", "cancel", waiting.id], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0 and f"{waiting.id} cancelled (it was scheduled)" in run.stdout
    again = subprocess.run(
        [sys.executable, "-m", "minicelery", "cancel", waiting.id, "no-such-id"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert f"{waiting.id} had already finished (cancelled)" in again.stdout
    assert again.returncode == 1 and "no-such-id is not stored" in again.stderr
    assert app.handle(waiting.id).state == "cancelled"


def test_the_cancel_and_result_commands_find_a_task_on_any_configured_queue_and_report_a_cascade(
    app: Client, redis_url: str
) -> None:
    other = f"{app.default_queue}-other"
    elsewhere = Client(RedisBroker(JSONTransport(), url=redis_url), default_queue=other)
    Client.instances.remove(elsewhere)

    @elsewhere.task
    def echo(value: object) -> object:
        return value

    root = echo("root")
    child = echo(root)
    grandchild = echo(child)
    root.wait(3600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICELERY_")}
    env |= {"MINICELERY_REDIS__URL": redis_url, "MINICELERY_WORKER__QUEUES": f'["{app.default_queue}", "{other}"]'}
    env |= CLI_ON

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "minicelery", *args], capture_output=True, text=True, env=env)

    run = cli("cancel", "--cascade", root.id)  # no -q: the second configured queue has it
    assert run.returncode == 0, run.stderr
    assert f"{root.id} cancelled (it was scheduled)" in run.stdout
    assert f"and 2 of its 2 descendants: {child.id} {grandchild.id}" in run.stdout
    assert [h.state for h in (root, child, grandchild)] == ["cancelled"] * 3
    shown = cli("result", grandchild.id)
    assert shown.returncode == 1 and "Cancelled: task cancelled (by cli)" in shown.stderr
    missing = cli("result", "no-such-id")
    assert missing.returncode == 1
    assert f"not stored on queue '{app.default_queue}', '{other}' (a task of another queue: add -q QUEUE)" in (
        missing.stderr
    )


def test_a_task_claimed_in_a_batch_but_not_started_is_not_run_once_cancelled(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    tag = uuid.uuid4().hex
    proc = workers.start(MINICELERY_WORKER__BATCH_SIZE="16")
    first = app.tasks["gate"](f"{tag}-a").start()  # handed to the idle worker: it runs it
    wait_until(lambda: first.state == "running", 20, "the first gate to run")
    second, held, *rest = app.start_many(
        [
            app.tasks["gate"](f"{tag}-b"),
            app.tasks["count_run"](f"{tag}-held"),
            *[app.tasks["echo"](i) for i in range(2)],
        ]
    )
    r.rpush(f"test:gate:{tag}-a", "go")  # its finish claims the next batch: gate b and the held task
    wait_until(lambda: second.state == "running" and held.state == "running", 20, "the batch to be claimed")
    assert held.cancel()
    wait_until(
        lambda: f"task {held.id} was cancelled (by api) before it started" in workers.log(proc), 20, "the heartbeat"
    )
    r.rpush(f"test:gate:{tag}-b", "go")
    assert [h.result(timeout=30) for h in rest] == [0, 1]
    assert executions(r).get(f"{tag}-held") is None  # never ran
    with pytest.raises(Cancelled):
        held.result(timeout=1)


def test_an_async_task_is_cancelled_at_its_await(app: Client, workers: Workers, r: redis.Redis) -> None:
    workers.start()
    tag = uuid.uuid4().hex
    handle = app.tasks["async_sleep"](60, tag).start()
    wait_until(lambda: handle.state == "running", 20, "the task to start")
    assert handle.cancel()
    wait_until(lambda: r.get(f"test:async_finally:{tag}") == b"1", 20, "its finally block")
    assert app.tasks["async_add"](1, 2).start().result(timeout=30) == 3


def test_a_task_that_ignores_its_cancel_is_ended_like_one_past_its_time_limit(app: Client, workers: Workers) -> None:
    from minicelery.worker import EXIT_TASK_STUCK

    proc = workers.start(MINICELERY_WORKER__LEASE_SECONDS="2")
    handle = app.tasks["swallow_all"](600).start()  # catches everything, Cancelled included
    wait_until(lambda: handle.state == "running", 20, "the task to start")
    assert handle.cancel()
    assert proc.wait(timeout=30) == EXIT_TASK_STUCK  # a lease after the cancel, the worker ends it
    assert handle.state == "cancelled"
    log = workers.log(proc)
    assert "did not stop within 2 s after it was cancelled" in log
    assert "time limit" not in log and "timed out" not in log  # its limit (600 s) was far off
