"""A stateful property test of the broker scripts against a real Redis (hypothesis).

Random enqueues (with random parents and delays, some parents never started), claims,
finishes (succeeded, failed, retried), late finishes, lease expiries, the passing of time, of
result TTLs and of the orphan TTL (the orphan sweep), parents started after their children
were swept; after every step the data model must hold together:
- every task is in exactly the structure its state names (ready list, schedule, running set),
- a waiting task's pending count equals its unfinished parents, and the queue's waiting set
  holds exactly its waiting tasks,
- nothing is ready before it is due, a failed task is a dead letter,
- a late finish changes nothing, and nothing of a task is left once its result TTL has passed,
- a cancel stops exactly the unfinished tasks (dead letters included) and leaves a cancelled
  task in no waiting, ready, scheduled or running structure, its children's counts right,
- the orphan sweep takes exactly the waiting tasks none of whose unfinished parents was sent,
  and a never-started parent lists only children still waiting.
Time is moved by editing scores (Redis's clock cannot be wound), as a real wait would.
"""

from __future__ import annotations

import uuid

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from minicelery import JSONTransport, RedisBroker
from minicelery.keys import QueueKeys
from minicelery.records import Claim, RetryPlan

FINISHED = {b"succeeded", b"failed", b"cancelled"}
HOUR_MS = 3_600_000


class BrokerModel(RuleBasedStateMachine):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.broker = RedisBroker(JSONTransport(), url=url, result_ttl=3600, max_block=1)
        self.r: redis.Redis = self.broker.redis
        self.queue = f"prop-{uuid.uuid4().hex[:10]}"
        self.keys = QueueKeys(self.queue)
        self.parents: dict[str, list[str]] = {}  # every task enqueued -> its parents
        self.held: dict[str, str] = {}  # task -> the token of our live claim on it
        self.expiring: dict[str, str] = {}  # task -> our token, lease run out but not yet reclaimed
        self.stale: dict[str, str] = {}  # task -> a token whose lease a later claim took away
        self.expired: set[str] = set()  # finished tasks whose result TTL we let pass
        self.ghosts: list[str] = []  # parents given to children but never started (not enqueued)

    def state(self, task_id: str) -> bytes | None:
        return self.r.hget(self.keys.info, f"{task_id}:s")  # type: ignore[return-value]

    def now_ms(self) -> int:
        seconds, micros = self.r.time()
        return int(seconds * 1000 + micros // 1000)

    # --- rules ---------------------------------------------------------------------------------

    @rule(
        delay=st.sampled_from([None, 0, HOUR_MS]),
        picks=st.lists(st.integers(0, 10**6), max_size=3, unique=True),
        ghost=st.sampled_from([None, None, "new", "old"]),
    )
    def enqueue(self, delay: int | None, picks: list[int], ghost: str | None) -> None:
        candidates = [t for t in self.parents if t not in self.expired]
        parents = sorted({candidates[p % len(candidates)] for p in picks}) if candidates else []
        if ghost == "new" or (ghost == "old" and self.ghosts):
            if ghost == "new":
                self.ghosts.append(f"g{len(self.parents):04d}")  # (t and g ids: len grows with each)
            parents.append(
                self.ghosts[-1] if ghost == "new" else self.ghosts[picks[0] % len(self.ghosts) if picks else 0]
            )
        task_id = f"t{len(self.parents):04d}"  # deterministic, so hypothesis can replay a run
        reply = self.broker.enqueue(self.queue, task_id, b"{}", delay_ms=delay, parents=parents)
        assert reply.status == "ok", reply
        self.parents[task_id] = parents

    @rule(batch=st.sampled_from([1, 1, 3]))
    def claim(self, batch: int) -> None:
        claimed = self.broker.claim(self.queue, uuid.uuid4().hex, HOUR_MS, "worker", batch=batch)
        self.stale.update(self.expiring)  # every claim first reclaims the leases that ran out
        self.expiring.clear()
        if isinstance(claimed, list):
            assert len({c.token for c in claimed}) == len(claimed), "two tasks under one token"
            if batch == 1:
                assert len(claimed) == 1
            for claim in claimed:
                assert isinstance(claim, Claim)
                assert claim.id not in self.held, "a task we hold under a live lease was handed out again"
                self.held[claim.id] = claim.token

    @precondition(lambda self: self.held)
    @rule(data=st.data(), succeeded=st.booleans(), retries=st.integers(0, 2), backoff=st.sampled_from([0, HOUR_MS]))
    def finish(self, data: st.DataObject, succeeded: bool, retries: int, backoff: int) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.held)))
        token = self.held.pop(task_id)
        plan = RetryPlan(max_retries=retries, base_ms=backoff, cap_ms=backoff, jitter=1.0)
        status = self.broker.finish(self.queue, task_id, token, succeeded=succeeded, envelope=b'{"ok":true}',
                                       retry=plan)  # fmt: skip
        assert status in ("ok", "retry"), status
        if succeeded:
            assert status == "ok"

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def lease_expires(self, data: st.DataObject) -> None:
        """Our worker stalls past its lease: the next claim reclaims the task."""
        task_id = data.draw(st.sampled_from(sorted(self.held)))
        self.expiring[task_id] = self.held.pop(task_id)
        self.r.zadd(self.keys.running, {task_id: 0})

    @precondition(lambda self: self.expiring)
    @rule(data=st.data())
    def finish_after_lease_ran_out_but_before_a_reclaim(self, data: st.DataObject) -> None:
        """Nobody took the task over yet: the token still holds, and the finish counts."""
        task_id = data.draw(st.sampled_from(sorted(self.expiring)))
        status = self.broker.finish(self.queue, task_id, self.expiring.pop(task_id), succeeded=True, envelope=b"{}")
        assert status == "ok"

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def late_finish(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.stale)))
        token = self.stale.pop(task_id)
        before = (self.r.hget(self.keys.result, task_id), self.state(task_id), self.r.zscore(self.keys.dead, task_id))
        status = self.broker.finish(self.queue, task_id, token, succeeded=False, envelope=b'{"late":1}')
        # gone: swept since (result TTL); cancelled: cancel.lua took the lease away
        assert status == ("gone" if before[1] is None else "cancelled" if before[1] == b"cancelled" else "late")
        after = (self.r.hget(self.keys.result, task_id), self.state(task_id), self.r.zscore(self.keys.dead, task_id))
        assert before == after, "a late finish changed the task"

    @precondition(lambda self: self.parents)
    @rule(data=st.data(), cascade=st.booleans())
    def cancel(self, data: st.DataObject, cascade: bool) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.parents)))
        state = self.state(task_id)
        ids = [task_id, *(self.broker.descendants(self.queue, task_id) if cascade else [])]
        unfinished = {i for i in ids if self.state(i) not in FINISHED or self.r.zscore(self.keys.dead, i) is not None}
        unfinished = {i for i in unfinished if self.state(i) is not None}
        statuses = self.broker.cancel(self.queue, ids, b'{"ok":false,"error":{"type":"Cancelled"}}', "prop")
        expected = "unknown" if state is None else "cancelled" if task_id in unfinished else "finished"
        assert statuses[0] == expected, (task_id, state, statuses)
        assert {i for i, s in zip(ids, statuses, strict=True) if s == "cancelled"} == unfinished
        for cancelled in unfinished:
            assert self.state(cancelled) == b"cancelled"
            for tokens in (self.held, self.expiring):  # our lease on it is gone: a finish is refused
                if cancelled in tokens:
                    self.stale[cancelled] = tokens.pop(cancelled)

    @rule()
    def time_passes(self) -> None:
        """Every scheduled task falls due (as if the hour had passed)."""
        due = self.r.zrange(self.keys.scheduled, 0, -1)
        if due:
            self.r.zadd(self.keys.scheduled, {task_id: 0 for task_id in due})

    @rule()
    def orphan_ttl_passes(self) -> None:
        """Every waiting task has waited the orphan TTL; the sweep takes exactly those none of
        whose unfinished parents was ever sent (the others' clocks restart)."""
        waiting = [t.decode() for t in self.r.zrange(self.keys.waiting, 0, -1)]
        if waiting:
            self.r.zadd(self.keys.waiting, dict.fromkeys(waiting, 0))

        expected: set[str] = set()
        for task_id in sorted(waiting):  # the sweep's order (equal scores): parents before children
            unfinished = [
                p
                for p in self.parents[task_id]
                if self.state(p) not in FINISHED and p not in self.expired and p not in expected
            ]  # (a parent swept just before has given this task its error, maybe released it)
            if unfinished and all(p in self.ghosts for p in unfinished):
                expected.add(task_id)
        swept = self.broker.sweep_orphans(self.queue, 3600)
        assert set(swept) == expected and len(swept) == len(expected)
        for task_id in swept:
            assert self.state(task_id) == b"failed"

    @precondition(lambda self: self.ghosts)
    @rule(data=st.data())
    def a_parent_is_started_late(self, data: st.DataObject) -> None:
        """A parent nobody started is sent after all: its children still waiting run after it;
        those the sweep took are not released again."""
        ghost = data.draw(st.sampled_from(self.ghosts))
        self.ghosts.remove(ghost)
        assert self.broker.enqueue(self.queue, ghost, b"{}").status == "ok"
        self.parents[ghost] = []

    @rule()
    def results_expire(self) -> None:
        finished = self.r.zrange(self.keys.expiry, 0, -1)
        if finished:
            self.r.zadd(self.keys.expiry, {task_id: 0 for task_id in finished})
            self.expired |= {t.decode() for t in finished}

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def every_task_is_where_its_state_says(self) -> None:
        ready = [t.decode() for t in self.r.lrange(self.keys.ready, 0, -1)]
        scheduled = {t.decode() for t in self.r.zrange(self.keys.scheduled, 0, -1)}
        running = {t.decode() for t in self.r.zrange(self.keys.running, 0, -1)}
        dead = {t.decode() for t in self.r.zrange(self.keys.dead, 0, -1)}
        assert len(ready) == len(set(ready)), "a task is in the ready list twice"
        now = self.now_ms()
        waiting = 0
        for task_id, parents in self.parents.items():
            state = self.state(task_id)
            places = (task_id in ready, task_id in scheduled, task_id in running)
            if state is None:  # swept: only after its TTL, and then without a trace
                assert task_id in self.expired, f"{task_id} vanished before its result TTL"
                assert not self.r.hexists(self.keys.payload, task_id)
                assert not self.r.hexists(self.keys.result, task_id)
                assert not any(places) and task_id not in dead
                continue
            expected = {b"ready": (True, False, False), b"scheduled": (False, True, False),
                        b"running": (False, False, True)}.get(state, (False, False, False))  # fmt: skip
            assert places == expected, (task_id, state, places)
            if state == b"ready":
                assert int(self.r.hget(self.keys.info, f"{task_id}:d") or 0) <= now, "ready before due"
            if state in FINISHED:
                assert self.r.hexists(self.keys.result, task_id)
                assert (task_id in dead) == (state == b"failed")
            if state == b"waiting":
                waiting += 1
                unfinished = sum(1 for p in parents if self.state(p) not in FINISHED and p not in self.expired)
                assert unfinished > 0
                assert int(self.r.hget(self.keys.info, f"{task_id}:p") or 0) == unfinished, task_id
        members = self.r.zrange(self.keys.waiting, 0, -1)
        assert len(members) == waiting and all(self.state(m.decode()) == b"waiting" for m in members)
        for ghost in self.ghosts:
            children = (self.r.hget(self.keys.info, f"{ghost}:c") or b"").decode().split(",")
            assert all(self.state(child) == b"waiting" for child in children if child), ghost

    def teardown(self) -> None:
        for key in self.r.scan_iter(match=self.keys.all_keys_pattern(), count=1000):
            self.r.delete(key)
        self.broker.close()


def test_broker_scripts_keep_the_data_model_consistent(redis_url: str) -> None:
    run_state_machine_as_test(
        lambda: BrokerModel(redis_url),
        settings=settings(
            max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
