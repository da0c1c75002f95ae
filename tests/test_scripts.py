"""The Lua scripts on their own: KEYS/ARGV in, status codes out, and every file registered."""

from __future__ import annotations

from importlib import resources

import pytest
import redis
from conftest import on_node_of

from minicelery import JSONTransport, RedisBroker
from minicelery.broker import EnqueueReply
from minicelery.errors import BrokerError, ParentNeverStarted
from minicelery.keys import QueueKeys
from minicelery.records import Claim, FinishItem, Idle, NextClaim
from minicelery.redis_wire import SCRIPT_NAMES


def test_every_lua_file_is_a_registered_script_and_loads(redis_url: str) -> None:
    files = {p.name[:-4] for p in (resources.files("minicelery") / "scripts").iterdir() if p.name.endswith(".lua")}
    assert {f for f in files if not f.startswith("_")} == set(SCRIPT_NAMES)  # _*.lua: shared steps
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broker.load_scripts()
    assert all(broker.redis.script_exists(s.sha)[0] for s in broker._scripts.values())


def test_claim_on_an_empty_queue_reports_nothing_pending(redis_url: str, queue: str) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    reply = broker.claim(queue, "tok", 1000, "w1")
    assert isinstance(reply, Idle) and reply.next_due_in_ms is None


def test_enqueue_claim_finish_cycle_and_fencing(redis_url: str, queue: str, r: redis.Redis) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    keys = QueueKeys(queue)
    assert broker.enqueue(queue, "t1", b"{}").status == "ok"
    assert broker.enqueue(queue, "t1", b"{}").status == "exists"
    assert r.zscore(keys.marker, "m") == 0  # one idle worker would wake
    (claim,) = broker.claim(queue, "tok", 1000, "w1")  # type: ignore[misc]
    assert isinstance(claim, Claim) and claim.id == "t1" and claim.attempts == 1 and claim.token == "tok/1"
    assert not r.exists(keys.marker)  # nothing else ready: no stale wake-up left behind
    assert broker.renew(queue, "t1", claim.token, 1000)
    assert not broker.renew(queue, "t1", "tok-b", 1000)
    status = broker.finish(queue, "t1", "tok-b", succeeded=True, envelope=b'{"ok":true}')
    assert status == "late"  # wrong token: nothing written
    assert r.hget(keys.result, "t1") is None
    status = broker.finish(queue, "t1", claim.token, succeeded=True, envelope=b'{"ok":true,"value":1}')
    assert status == "ok"
    assert broker.outcome(queue, "t1")[0] == "succeeded"
    assert r.zcard(keys.running) == 0
    status = broker.finish(queue, "t1", claim.token, succeeded=True, envelope=b'{"ok":true,"value":2}')
    assert status == "late"  # a second finish cannot overwrite the first
    assert r.hget(keys.result, "t1") == b'{"ok":true,"value":1}'


def test_expired_lease_is_reclaimed_by_the_next_claim(redis_url: str, queue: str) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broker.enqueue(queue, "t1", b"{}")
    (first,) = broker.claim(queue, "tok-a", 1, "w1")  # type: ignore[misc]  # a 1 ms lease
    import time

    time.sleep(0.01)
    (second,) = broker.claim(queue, "tok-b", 1000, "w2")  # type: ignore[misc]
    assert second.id == "t1"
    assert second.attempts == 2 and second.leases_lost == 1
    status = broker.finish(queue, "t1", first.token, succeeded=True, envelope=b"{}")
    assert status == "late"  # the first worker's late finish is rejected by token


def test_release_hands_back_without_counting_an_attempt(redis_url: str, queue: str) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broker.enqueue(queue, "t1", b"{}")
    (held,) = broker.claim(queue, "tok-a", 1000, "w1")  # type: ignore[misc]
    assert broker.release(queue, "t1", held.token)
    (again,) = broker.claim(queue, "tok-b", 1000, "w2")  # type: ignore[misc]
    assert again.attempts == 1


def test_scheduled_task_reports_its_due_delay(redis_url: str, queue: str) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broker.enqueue(queue, "t1", b"{}", delay_ms=60_000)
    reply = broker.claim(queue, "tok", 1000, "w1")
    assert isinstance(reply, Idle)
    assert reply.next_due_in_ms is not None and 59_000 < reply.next_due_in_ms <= 60_000


def test_idempotency_key_returns_the_pending_holder(redis_url: str, queue: str) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    assert broker.enqueue(queue, "t1", b"{}", dedup_key="k").status == "ok"
    reply = broker.enqueue(queue, "t2", b"{}", dedup_key="k")
    assert (reply.status, reply.detail) == ("duplicate", "t1")


def test_a_batch_claim_leases_each_task_and_leaves_half_the_backlog(redis_url: str, queue: str, r: redis.Redis) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    keys = QueueKeys(queue)
    for i in range(10):
        broker.enqueue(queue, f"t{i}", b"{}")
    claims = broker.claim(queue, "tok", 1000, "w1", batch=8)
    assert isinstance(claims, list) and [c.id for c in claims] == ["t0", "t1", "t2", "t3", "t4"]  # half of 10
    assert [c.token for c in claims] == [f"tok/{i}" for i in range(1, 6)]  # a fencing token each
    assert r.zcard(keys.running) == 5 and r.llen(keys.ready) == 5
    assert r.zscore(keys.marker, "m") == 0  # work is left: another idle worker is woken for it
    statuses, following = broker.finish_many(
        [FinishItem(queue, c.id, c.token, True, b'{"ok":true}') for c in claims]
        + [FinishItem(queue, "t0", "tok/1", True, b"{}")],
        next_claim=NextClaim(queue, "tok2", 1000, "w1", batch=1, held_due_ms=0),
    )
    assert statuses == ["ok"] * 5 + ["late"]  # each finish fenced on its own; a repeat is late
    assert isinstance(following, list) and len(following) == 1 and following[0].id == "t5"
    assert len(broker.claim(queue, "tok3", 1000, "w2", batch=100)) == 2  # type: ignore[arg-type]  # half of 4
    assert broker.claim(queue, "tok4", 1000, "w2", batch=1)[0].id == "t8"  # type: ignore[index]


def test_pipelined_scripts_survive_a_script_cache_flush(redis_url: str, queue: str, r: redis.Redis) -> None:
    """A restarted Redis forgets loaded scripts: pipelines (sent by SHA) load them and resend."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broker.load_scripts()
    r.script_flush()
    replies = broker.enqueue_many(queue, [("a", b"{}"), ("b", b"{}")])
    assert [reply.status for reply in replies] == ["ok", "ok"]
    claims = broker.claim(queue, "tok", 1000, "w", batch=2)
    assert isinstance(claims, list)
    r.script_flush()
    statuses, _ = broker.finish_many([FinishItem(queue, c.id, c.token, True, b"{}") for c in claims])
    assert statuses == ["ok"]  # one claimed (half of two): its finish went through after reloading


def test_a_script_error_in_a_pipeline_leaves_the_connection_in_step(redis_url: str, queue: str, r: redis.Redis) -> None:
    """One queue's finish fails (its info key is not a hash) while another's runs in the same
    round trip: the error is raised, and every reply was read, so the next call gets its own."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broken = f"{queue}-broken"
    r.set(QueueKeys(broken).info, "not a hash")
    try:
        broker.enqueue(queue, "t1", b"{}")
        (claim,) = broker.claim(queue, "tok", 1000, "w1")  # type: ignore[misc]
        with pytest.raises(BrokerError, match="WRONGTYPE"):
            broker.finish_many(
                [FinishItem(broken, "x", "tok/1", True, b"{}"), FinishItem(queue, "t1", claim.token, True, b"{}")]
            )
        assert r.hget(QueueKeys(queue).result, "t1") == b"{}"  # the other queue's finish ran
        assert broker.enqueue(queue, "t2", b"{}").status == "ok"  # not a reply left over from before
        assert isinstance(broker.claim(queue, "tok2", 1000, "w1"), list)
    finally:
        r.delete(QueueKeys(broken).info)


def test_a_connection_redis_closed_is_replaced_without_an_error(redis_url: str, queue: str, r: redis.Redis) -> None:
    """Redis closing an idle client's connection (its `timeout`, a restart) costs the next
    call a reconnect, not an error."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    assert broker.enqueue(queue, "t1", b"{}").status == "ok"  # the pool now holds a connection
    killed = r.client_kill_filter(_type="normal", skipme=True, **on_node_of(r, queue))
    assert killed >= 1
    assert [reply.status for reply in broker.enqueue_many(queue, [("t2", b"{}")])] == ["ok"]
    assert broker.enqueue(queue, "t3", b"{}").status == "ok"


def test_a_task_promised_to_a_woken_worker_is_left_for_it(redis_url: str, queue: str, r: redis.Redis) -> None:
    """A busy worker's claim does not take the task an idle worker was just woken for (the
    cause of wasted wake-ups), unless that promise is too old to trust (the woken worker died)."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    keys = QueueKeys(queue)
    broker.enqueue(queue, "t1", b"{}")
    assert r.bzpopmin(keys.marker, timeout=1) is not None  # an idle worker wakes for t1
    assert isinstance(broker.claim(queue, "busy", 1000, "w-busy"), Idle)  # not woken: leaves t1
    (claim,) = broker.claim(queue, "woken", 1000, "w-idle", woken=True)  # type: ignore[misc]
    assert claim.id == "t1"

    broker.enqueue(queue, "t2", b"{}")
    assert r.bzpopmin(keys.marker, timeout=1) is not None  # woken ... and then it dies
    r.hset(keys.info, "#promised_at", 0)  # its promise is older than any claim would take
    (taken,) = broker.claim(queue, "busy", 1000, "w-busy")  # type: ignore[misc]
    assert taken.id == "t2"

    broker.enqueue(queue, "t3", b"{}")  # a wake-up nobody has popped yet: a busy claim takes it over
    (over,) = broker.claim(queue, "busy", 1000, "w-busy")  # type: ignore[misc]
    assert over.id == "t3" and not r.exists(keys.marker)  # and nobody wakes for nothing


def test_only_a_watched_task_gets_a_done_list_and_its_waiter_wakes(redis_url: str, queue: str, r: redis.Redis) -> None:
    """Most tasks have nobody waiting on their result: their finish writes no done list. A
    waiter that watches a pending task is woken by its finish (result() does this)."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    keys = QueueKeys(queue)
    broker.enqueue(queue, "unwatched", b"{}")
    broker.enqueue(queue, "watched", b"{}")
    assert broker.watch(queue, "watched") == ("ready", None)
    assert broker.watch(queue, "never-sent") == (None, None)
    assert not r.hexists(keys.info, "never-sent:w")  # watching nothing leaves nothing behind
    claims = broker.claim(queue, "tok", 1000, "w", batch=2)
    assert isinstance(claims, list) and len(claims) == 1  # half of two
    claims += broker.claim(queue, "tok2", 1000, "w", batch=2)  # type: ignore[operator]
    assert not broker.wait_done(queue, "watched", 0.05)  # not finished yet: the wait times out
    statuses, _ = broker.finish_many([FinishItem(queue, c.id, c.token, True, b'{"ok": 1}') for c in claims])
    assert statuses == ["ok", "ok"]
    assert not r.exists(keys.done("unwatched"))
    assert broker.wait_done(queue, "watched", 1)
    assert broker.watch(queue, "watched") == ("succeeded", b'{"ok": 1}')


def test_the_orphan_sweep_dead_letters_only_a_child_whose_unfinished_parents_were_never_sent(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    """orphans.lua on its own: the waiting tasks in ARGV, the ids it dead-lettered out. A child
    that waited orphan_ttl for a parent nobody sent fails with ParentNeverStarted, its result
    waiter wakes, its own child gets the error, and the parent forgets it; a child with a
    parent in flight is kept (its clock restarts), and one not waiting that long is left."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    broker.load_scripts()
    keys = QueueKeys(queue)
    broker.enqueue(queue, "sent", b"{}")  # started: ready, in flight
    broker.enqueue(queue, "orphan", b"{}", parents=["ghost"])  # "ghost" is never sent
    broker.enqueue(queue, "kept", b"{}", parents=["ghost", "sent"])
    broker.enqueue(queue, "grandchild", b"{}", parents=["orphan"])
    broker.enqueue(queue, "young", b"{}", parents=["ghost"])
    r.zadd(keys.waiting, {"orphan": 1, "kept": 1, "grandchild": 1})  # registered long ago
    assert broker.watch(queue, "orphan") == ("waiting", None)
    ids = ["orphan", "kept", "grandchild", "young", "sent"]
    sweep = broker._scripts["orphans"]

    swept = sweep(keys=[*keys.as_list(), *(keys.done(i) for i in ids)], args=[60_000, 600_000, "60", *ids])

    assert swept == [b"orphan"]
    assert r.hget(keys.info, "orphan:s") == b"failed" and r.zscore(keys.dead, "orphan") is not None
    ok, error = broker.transport.loads_outcome(r.hget(keys.result, "orphan"))  # type: ignore[arg-type]
    assert not ok and isinstance(error, ParentNeverStarted)
    assert "parent task ghost was never started within orphan_ttl (60 s)" in str(error)
    assert r.llen(keys.done("orphan")) == 1  # the waiter on its result wakes
    assert r.hget(keys.info, "ghost:c") == b"kept,young"  # starting ghost later cannot release it
    assert r.hget(keys.info, "grandchild:s") == b"ready"  # released with the error, as by any failed parent
    assert r.hget(keys.inputs, "grandchild|orphan") == r.hget(keys.result, "orphan")
    assert r.hget(keys.info, "kept:s") == b"waiting" and r.zscore(keys.waiting, "kept") > 1  # type: ignore[operator]
    assert r.hget(keys.info, "young:s") == b"waiting"
    assert {m.decode() for m in r.zrange(keys.waiting, 0, -1)} == {"kept", "young"}
    again = sweep(keys=[*keys.as_list(), *(keys.done(i) for i in ids)], args=[60_000, 600_000, "60", *ids])
    assert again == []


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    """A subpackage missing from pyproject's packages works in a checkout (and an editable
    install) but is left out of the wheel, so the installed worker fails to import."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(p.relative_to(root).parts)
        for p in (root / "minicelery").rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py")) | any(p.glob("*.lua"))
    }
    assert folders | {"minicelery"} == listed


def test_a_task_sent_straight_to_ready_stores_no_state_and_its_state_is_where_it_sits(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    keys = QueueKeys(queue)
    assert broker.enqueue(queue, "now", b'{"v":2,"name":"t"}').status == "ok"
    assert broker.enqueue(queue, "later", b'{"v":2,"name":"t"}', delay_ms=3_600_000).status == "ok"
    assert r.hlen(keys.info) == 2 and r.hexists(keys.info, "#promised")  # nothing per task
    assert [broker.outcome(queue, i)[0] for i in ("now", "later", "never")] == ["ready", "scheduled", None]
    assert broker.enqueue(queue, "now", b"{}").status == "exists"  # still idempotent by id
    assert broker.enqueue(queue, "later", b"{}").status == "exists"
    assert broker.enqueue(queue, "keyed", b"{}", dedup_key="k").status == "ok"
    assert broker.enqueue(queue, "keyed", b"{}", dedup_key="k").status == "exists"  # its own key: a resend
    assert broker.enqueue(queue, "other", b"{}", dedup_key="k") == EnqueueReply("duplicate", "keyed")
    (claim,) = broker.claim(queue, "tok", 1000, "w1")  # type: ignore[misc]
    assert claim.id == "now" and claim.payload == b'{"v":2,"name":"t"}'  # the stored time is not passed on
    assert 0 <= claim.now_ms - claim.due_ms < 60_000  # due when stored: the queue latency is real
    assert broker.outcome(queue, "now")[0] == "running"


def test_tasks_stored_by_the_previous_version_run_and_report_their_state(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    """The previous version stored every task's state and due time as fields, and its payload
    without the time stored: a new worker runs such tasks, reads their state, cancels them."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=10, max_block=1)
    keys = QueueKeys(queue)
    old = "0123456789abcdef01234567"  # 24 hex digits, as the previous version made ids
    payload = b'{"v":2,"name":"t","args":[1]}'
    r.hset(keys.payload, mapping={old: payload, "oldlater": payload, "oldgone": payload})
    r.hset(keys.info, mapping={f"{old}:s": "ready", f"{old}:d": 1000, "oldlater:s": "scheduled",
                               "oldgone:s": "ready", "oldgone:d": 1000})  # fmt: skip
    r.lpush(keys.ready, "oldgone", old)
    r.zadd(keys.scheduled, {"oldlater": 10**13})
    assert [broker.outcome(queue, i)[0] for i in (old, "oldlater")] == ["ready", "scheduled"]
    assert broker.enqueue(queue, old, b"{}").status == "exists"
    envelope = broker.transport.dumps_error(ValueError("x"))
    assert broker.cancel(queue, ["oldgone", "oldlater"], envelope, "test") == ["cancelled", "cancelled"]
    (claim,) = broker.claim(queue, "tok", 1000, "w1")  # type: ignore[misc]
    assert claim.id == old and claim.payload == payload and claim.due_ms == 1000
    assert broker.transport.loads_message(claim.payload, claim.id).args == [1]
    assert broker.finish(queue, old, claim.token, succeeded=True, envelope=b'{"ok":true,"value":1}') == "ok"
    assert broker.outcome(queue, old)[0] == "succeeded" and r.llen(keys.ready) == 0
