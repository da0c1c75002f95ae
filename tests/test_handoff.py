"""Hand-off: a task that becomes ready while a worker waits idle goes straight to that worker,
already leased to it, so it starts without claiming (one wake-up, no second round trip).

The scripts on their own first (a worker here is only its calls to the broker), then real
worker processes stopped and killed while a task is handed to them.
"""

from __future__ import annotations

import os
import signal

import pytest
import redis
from conftest import Workers, wait_until

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.claim_wire import idle_registration
from minicelery.errors import BrokerError
from minicelery.keys import QueueKeys
from minicelery.records import Claim, RetryPlan

LEASE_MS = 5000


def seen(broker: RedisBroker, queue: str, worker: str, ago_ms: int = 0) -> None:
    """Record the worker as its claims do (a live idle worker claims once per lease)."""
    seconds, micros = broker.redis.time()
    broker.redis.zadd(QueueKeys(queue).workers, {worker: seconds * 1000 + micros // 1000 - ago_ms})


def go_idle(broker: RedisBroker, queue: str, worker: str, lease_ms: int = LEASE_MS) -> None:
    """What an idle worker does before it blocks: join the queue's idle set (here the block
    itself times out at once)."""
    seen(broker, queue, worker)
    assert broker.wait_for_work([queue], worker, 0.001, handoffs_lease_ms=lease_ms, register=[queue]) is None


def take_handed(broker: RedisBroker, queue: str, worker: str) -> Claim:
    """The idle worker's wait returns the task handed to it."""
    wake = broker.wait_for_work([queue], worker, 1, handoffs_lease_ms=LEASE_MS)
    assert wake is not None and wake.handed is not None, wake
    return wake.handed


def test_a_task_sent_while_a_worker_waits_is_handed_to_it_leased_and_runs_without_a_claim(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    go_idle(broker, queue, "w1")
    assert broker.enqueue(queue, "t1", b'{"payload": 1}').detail == "running"
    keys = QueueKeys(queue)
    assert r.llen(keys.ready) == 0 and not r.exists(keys.marker)  # no claim and no wake-up needed

    claim = take_handed(broker, queue, "w1")
    assert (claim.id, claim.payload, claim.attempts, claim.leases_lost) == ("t1", b'{"payload": 1}', 1, 0)
    assert broker.renew(queue, "t1", claim.token, 1000)  # the lease is the worker's
    assert broker.finish(queue, "t1", "someone-else", succeeded=True, envelope=b"{}") == "late"
    assert broker.finish(queue, "t1", claim.token, succeeded=True, envelope=b'{"ok":true,"value":1}') == "ok"
    assert r.hget(keys.result, "t1") == b'{"ok":true,"value":1}'


def test_each_idle_worker_gets_one_task_newest_first_and_the_rest_wait_in_the_queue(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    go_idle(broker, queue, "w1")
    go_idle(broker, queue, "w2")
    for task_id in ("t1", "t2", "t3"):
        broker.enqueue(queue, task_id, b"{}")
    assert take_handed(broker, queue, "w2").id == "t1"  # the worker idle for the shortest time
    assert take_handed(broker, queue, "w1").id == "t2"
    assert r.lrange(QueueKeys(queue).ready, 0, -1) == [b"t3"]  # no idle worker left: the usual way
    assert r.zscore(QueueKeys(queue).marker, "m") == 0


def test_a_claim_takes_what_was_handed_to_the_worker_and_takes_it_out_of_the_idle_set(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    """A worker that claims before it reads its inbox (it woke for a due time, or slept through
    the last milliseconds before one) gets the handed task from the claim, with the rest:
    none waits in the inbox of a busy worker."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    keys = QueueKeys(queue)
    seen(broker, queue, "w1")
    r.zadd(keys.idle, {idle_registration(queue, "w1", LEASE_MS): 1})  # joined; not reading yet
    broker.enqueue(queue, "t1", b"{}")
    broker.enqueue(queue, "t2", b"{}")  # no idle worker left: to the ready list
    claims = broker.claim(queue, "tok", LEASE_MS, "w1", batch=4, handoffs=True)
    assert isinstance(claims, list) and sorted(c.id for c in claims) == ["t1", "t2"]
    assert all(broker.renew(queue, c.id, c.token, 1000) for c in claims)
    assert not r.exists(keys.inbox("w1"))
    broker.enqueue(queue, "t3", b"{}")  # ready, as nobody is idle
    r.zadd(keys.idle, {idle_registration(queue, "w1", LEASE_MS): 2})
    claims = broker.claim(queue, "tok2", LEASE_MS, "w1", batch=4, handoffs=True)
    assert isinstance(claims, list) and [c.id for c in claims] == ["t3"]
    assert r.zcard(keys.idle) == 0  # busy: out of the idle set
    broker.enqueue(queue, "t4", b"{}")
    assert r.lrange(keys.ready, 0, -1) == [b"t4"]  # a busy worker is handed nothing


def test_a_task_handed_to_a_worker_that_died_idle_is_reclaimed_after_its_lease(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    go_idle(broker, queue, "dead", lease_ms=200)  # ... and it never reads its inbox
    broker.enqueue(queue, "t1", b"{}")

    def reclaimed() -> list[Claim]:
        reply = broker.claim(queue, "tok", LEASE_MS, "w2")
        return reply if isinstance(reply, list) else []

    (claim,) = wait_until(reclaimed, 10, "the lease to expire")  # type: ignore[misc]
    assert (claim.id, claim.attempts, claim.leases_lost) == ("t1", 2, 1)
    assert r.pttl(QueueKeys(queue).inbox("dead")) > 0  # the dead worker's inbox goes by itself


def test_nothing_is_handed_to_a_worker_whose_claims_stopped_two_leases_ago(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    """An idle worker claims once per lease; one silent for longer died idle (SIGKILL, a lost
    node). Its entry is dropped, so no task waits out a lease for it."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    go_idle(broker, queue, "alive")
    go_idle(broker, queue, "ghost")  # the newest ...
    seen(broker, queue, "ghost", ago_ms=2 * LEASE_MS + 11_000)  # ... but silent too long
    r.zadd(QueueKeys(queue).idle, {"junk": 9e15})  # not an entry a worker makes: dropped too
    broker.enqueue(queue, "t1", b"{}")
    assert take_handed(broker, queue, "alive").id == "t1"
    assert r.zcard(QueueKeys(queue).idle) == 0 and not r.exists(QueueKeys(queue).inbox("ghost"))


def test_a_stopping_worker_gives_back_what_was_handed_to_it(redis_url: str, queue: str, r: redis.Redis) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    go_idle(broker, queue, "w1")
    broker.enqueue(queue, "t1", b"{}")
    (handed,) = broker.leave([queue], "w1", LEASE_MS)
    assert broker.release(queue, handed.id, handed.token)
    broker.enqueue(queue, "t2", b"{}")  # w1 is out of the idle set: nothing more goes to it
    assert r.lrange(QueueKeys(queue).ready, 0, -1) == [b"t2", b"t1"]


def test_a_retry_due_at_once_is_handed_on_with_its_new_lease_intact(redis_url: str, queue: str, r: redis.Redis) -> None:
    """The finish that schedules the retry ends the old lease before the hand-off makes the
    new one (ending it afterwards would strip the new holder's lease)."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broker.enqueue(queue, "t1", b"{}")
    (first,) = broker.claim(queue, "tok", LEASE_MS, "w1")  # type: ignore[misc]
    go_idle(broker, queue, "w2")
    retry = RetryPlan(max_retries=1, base_ms=0, cap_ms=0, jitter=1.0, fixed_ms=0)
    assert broker.finish(queue, "t1", first.token, succeeded=False, envelope=b"{}", retry=retry) == "retry"
    second = take_handed(broker, queue, "w2")
    assert second.id == "t1" and second.attempts == 2
    assert r.zscore(QueueKeys(queue).running, "t1") is not None
    assert broker.finish(queue, "t1", second.token, succeeded=True, envelope=b'{"ok":true,"value":2}') == "ok"


def test_a_child_released_while_a_worker_waits_is_handed_to_it_with_its_parents_results(
    redis_url: str, queue: str
) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broker.enqueue(queue, "parent", b"{}")
    broker.enqueue(queue, "child", b'{"child": 1}', parents=["parent"])
    (parent,) = broker.claim(queue, "tok", LEASE_MS, "w1")  # type: ignore[misc]
    go_idle(broker, queue, "w2")
    broker.finish(queue, "parent", parent.token, succeeded=True, envelope=b'{"ok":true,"value":"p"}')
    child = take_handed(broker, queue, "w2")
    assert child.id == "child" and child.payload == b'{"child": 1}'
    assert child.inputs == {"parent": b'{"ok":true,"value":"p"}'}


# --- real worker processes --------------------------------------------------------------------


def idle_in(r: redis.Redis, queue: str, count: int) -> None:
    wait_until(lambda: r.zcard(QueueKeys(queue).idle) == count, 20, f"{count} workers idle")


def test_a_worker_stopped_with_a_task_handed_to_it_gives_it_back_and_another_worker_runs_it(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    first = workers.start()
    idle_in(r, app.default_queue, 1)
    os.kill(first.pid, signal.SIGSTOP)  # blocked in Redis: the task is handed to it all the same
    handle = app.tasks["echo"]("back").start()
    assert handle.state == "running"
    os.kill(first.pid, signal.SIGTERM)
    os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=20) == 0, workers.log(first)
    assert "handed back" in workers.log(first)
    workers.start()
    assert handle.result(timeout=20) == "back"


def test_a_task_handed_to_a_worker_killed_while_idle_runs_on_another_after_the_lease(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    victim = workers.start(MINICELERY_WORKER__LEASE_SECONDS="1")
    idle_in(r, app.default_queue, 1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    handle = app.tasks["echo"]("kept").start()  # handed to the dead worker's inbox
    assert handle.state == "running"
    workers.start()
    assert handle.result(timeout=30) == "kept"
    assert r.hget(QueueKeys(app.default_queue).info, f"{handle.id}:l") == b"1"  # run after a reclaim


def test_a_worker_on_two_queues_busy_on_one_is_handed_nothing_on_the_other(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    """Its task there would wait behind the one it runs, while a worker of that queue idles."""
    first, second = app.default_queue, f"{app.default_queue}.b"
    other_app = Client(app.broker, default_queue=second)
    Client.instances.remove(other_app)
    import worktasks

    worktasks.register(other_app)
    idle_one = workers.start(MINICELERY_WORKER__QUEUES=f'["{second}"]')
    idle_in(r, second, 1)
    both = workers.start(MINICELERY_WORKER__QUEUES=f'["{first}", "{second}"]')  # the newest on `second`
    idle_in(r, second, 2)
    idle_in(r, first, 1)
    busy = app.tasks["pid_after"](3).start()  # handed to `both`
    idle_in(r, second, 1)
    assert other_app.tasks["pid_after"](0).start().result(timeout=20) == idle_one.pid
    assert busy.result(timeout=20) == both.pid


def test_junk_in_an_inbox_is_a_clear_broker_error_and_the_next_wait_goes_on(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    r.zadd(QueueKeys(queue).inbox("w1"), {"not a task": 0})
    with pytest.raises(BrokerError, match="unreadable task handed to queue"):
        broker.wait_for_work([queue], "w1", 1, handoffs_lease_ms=LEASE_MS)
    broker.enqueue(queue, "t1", b"{}")
    wake = broker.wait_for_work([queue], "w1", 1, handoffs_lease_ms=LEASE_MS)
    assert wake is not None and wake.queue == queue and wake.handed is None  # the marker, as before
