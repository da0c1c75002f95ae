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
from minicelery.schedules import ScheduleSpec, parse_occurrence

FINISHED = {b"succeeded", b"failed", b"cancelled"}
HOUR_MS = 3_600_000


class QueueMachine(RuleBasedStateMachine):
    """What both state machines stand on: a broker on a fresh queue of the test Redis, a task's
    state as the scripts store it, and the queue's keys deleted after each example."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.broker = RedisBroker(JSONTransport(), url=url, result_ttl=3600, max_block=1)
        self.r: redis.Redis = self.broker.redis
        self.queue = f"prop-{uuid.uuid4().hex[:10]}"
        self.keys = QueueKeys(self.queue)

    def state(self, task_id: str) -> bytes | None:
        state, _envelope = self.broker.outcome(self.queue, task_id)  # stored, or where it sits
        return None if state is None else state.encode()

    def teardown(self) -> None:
        for key in self.r.scan_iter(match=self.keys.all_keys_pattern(), count=1000):
            self.r.delete(key)
        self.broker.close()


def check(machine: type[QueueMachine], redis_url: str, steps: int) -> None:
    run_state_machine_as_test(
        lambda: machine(redis_url),
        settings=settings(
            max_examples=100, stateful_step_count=steps, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )


class BrokerModel(QueueMachine):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.parents: dict[str, list[str]] = {}  # every task enqueued -> its parents
        self.held: dict[str, str] = {}  # task -> the token of our live claim on it
        self.expiring: dict[str, str] = {}  # task -> our token, lease run out but not yet reclaimed
        self.stale: dict[str, str] = {}  # task -> a token whose lease a later claim took away
        self.expired: set[str] = set()  # finished tasks whose result TTL we let pass
        self.unkept: set[str] = set()  # succeeded without keeping a result (store_result=False)
        self.ghosts: list[str] = []  # parents given to children but never started (not enqueued)

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
    @rule(
        data=st.data(),
        succeeded=st.booleans(),
        retries=st.integers(0, 2),
        backoff=st.sampled_from([0, HOUR_MS]),
        keep=st.booleans(),
    )
    def finish(self, data: st.DataObject, succeeded: bool, retries: int, backoff: int, keep: bool) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.held)))
        token = self.held.pop(task_id)
        plan = RetryPlan(max_retries=retries, base_ms=backoff, cap_ms=backoff, jitter=1.0)
        status = self.broker.finish(self.queue, task_id, token, succeeded=succeeded, envelope=b'{"ok":true}',
                                       retry=plan, keep=keep)  # fmt: skip
        assert status in ("ok", "retry"), status
        if succeeded:
            assert status == "ok"
            if not keep:  # (a failure is always kept: its dead letter)
                self.unkept.add(task_id)
                assert not self.r.hexists(self.keys.payload, task_id), "a success not kept left its payload"

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
                kept = self.r.hexists(self.keys.result, task_id)
                assert kept != (state == b"succeeded" and task_id in self.unkept), (task_id, state, kept)
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


def test_broker_scripts_keep_the_data_model_consistent(redis_url: str) -> None:
    check(BrokerModel, redis_url, steps=50)


class ScheduleModel(QueueMachine):
    """The schedule scripts under random declarations (changing definitions: last writer wins),
    pauses, resumes, removals, claims and starts of occurrences, finishes, lease expiries and
    the passing of time. After every step:
    - a declared, unpaused schedule has exactly one pending occurrence (field n), never run, and
      every other unfinished occurrence of it was started before (a re-run), never a second new one;
    - a paused or removed schedule has no occurrence waiting for its slot;
    - without overlap, no run starts while another run of its schedule holds a live lease;
    - a slot runs again only after the lease of its earlier run was lost."""

    NAMES = ("s0", "s1")
    EVERY = (1, HOUR_MS)  # a slot every millisecond (always late: catch-up decides) or hour

    def __init__(self, url: str) -> None:
        super().__init__(url)
        from minicelery.periodic import Schedules
        from minicelery.settings import load_settings

        host = type("Host", (), {"broker": self.broker, "tasks": {}})()
        self.schedules = Schedules(host, load_settings(worker={"queues": [self.queue]}))  # type: ignore[arg-type]
        self.specs: dict[str, ScheduleSpec] = {}  # declared, as last written
        self.paused: set[str] = set()
        # occurrence -> (schedule, token, whether its schedule allowed overlap then): runs we hold
        self.live: dict[str, tuple[str, str, bool]] = {}
        self.lost: set[str] = set()  # occurrences whose run lost its lease (may run again)
        self.started: set[str] = set()  # occurrences begun (run) at least once
        self.last_started: dict[str, str] = {}  # schedule -> the occurrence that started last
        self.ever_overlap: set[str] = set()  # schedules declared with overlap=True at some point

    def field(self, name: str, f: str) -> str | None:
        value = self.r.hget(self.keys.schedule_state, f"{name}:{f}")
        return None if value is None else value.decode()  # type: ignore[union-attr]

    @rule(
        name=st.sampled_from(NAMES),
        every=st.sampled_from(EVERY),
        overlap=st.booleans(),
        catch_up=st.sampled_from(["one", "all", "skip"]),
        own=st.booleans(),
    )
    def declare(self, name: str, every: int, overlap: bool, catch_up: str, own: bool) -> None:
        from minicelery.periodic import upsert

        if every == 1 and catch_up == "skip":
            catch_up = "one"  # (whether a 1 ms slot is late depends on timing: skip would make runs random)
        spec = ScheduleSpec(name, "job", self.queue, every_ms=every, overlap=overlap, catch_up=catch_up)
        status, _ = upsert(self.broker, spec)
        assert status in ("created", "kept", "replaced", "paused"), status
        assert (status == "paused") == (name in self.paused)
        self.specs[name] = spec
        if overlap:
            self.ever_overlap.add(name)
        if own:  # this worker declares it too (begin plans from its own copy first)
            self.schedules.specs[name] = spec

    @rule(name=st.sampled_from(NAMES), pause=st.booleans())
    def pause_or_resume(self, name: str, pause: bool) -> None:
        from minicelery.periodic import upsert

        if name not in self.specs:
            return
        status, _ = upsert(self.broker, self.specs[name], paused="1" if pause else "0", keep_spec=True)
        assert (status == "paused") == pause
        (self.paused.add if pause else self.paused.discard)(name)

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name: str) -> None:
        assert self.broker.schedule_remove(self.queue, name) == (name in self.specs)
        self.specs.pop(name, None)
        self.schedules.specs.pop(name, None)
        self.paused.discard(name)
        self.last_started.pop(name, None)
        # Removed means forgotten: declared again, it starts afresh even while an old run runs on.
        self.live = {i: (n if n != name else f"{n}#removed", t, o) for i, (n, t, o) in self.live.items()}
        assert not any(k.decode().startswith(f"{name}:") for k in self.r.hkeys(self.keys.schedule_state))

    @rule()
    def claim_and_start(self) -> None:
        self.time_passes()  # what can be claimed must not depend on timing (hypothesis replays runs)
        claimed = self.broker.claim(self.queue, uuid.uuid4().hex, HOUR_MS, "worker")
        if not isinstance(claimed, list):
            return
        for claim in claimed:
            parsed = parse_occurrence(claim.id)
            assert parsed is not None, claim.id
            assert claim.id not in self.live, "an occurrence we hold under a live lease was handed out again"
            was_pending = self.field(parsed[0], "n") == claim.id
            overlap = self.specs[parsed[0]].overlap if parsed[0] in self.specs else True
            if self.schedules.begin(claim):
                # Without overlap no run starts while the last one started still runs; and a
                # schedule that never allowed overlap never has two runs. (Runs started while it
                # was allowed may run on after the spec changed: the script tracks the last one.)
                others = [i for i, (n, _, _) in self.live.items() if n == parsed[0]]
                last = self.last_started.get(parsed[0])
                assert overlap or last not in self.live or last == claim.id, f"{claim.id} started while {last} runs"
                if parsed[0] not in self.ever_overlap:
                    assert not others, f"{claim.id} started while {others} still run"
                self.last_started[parsed[0]] = claim.id
                assert claim.id not in self.started or claim.id in self.lost, f"{claim.id} ran twice"
                assert was_pending or claim.id in self.lost, f"{claim.id} ran, neither pending nor a re-run"
                self.lost.discard(claim.id)
                self.started.add(claim.id)
                self.live[claim.id] = (parsed[0], claim.token, overlap)

    @rule(pick=st.integers(0, 1000))
    def finish(self, pick: int) -> None:
        # (A rule argument, not data.draw over the runs held: how many there are depends on
        # the Redis clock, and hypothesis must draw the same way when it replays a run.)
        if not self.live:
            return
        task_id = sorted(self.live)[pick % len(self.live)]
        _, token, _ = self.live.pop(task_id)
        status = self.broker.finish(self.queue, task_id, token, succeeded=True, envelope=b'{"ok":true}')
        assert status == "ok", status

    @rule(pick=st.integers(0, 1000))
    def lease_expires(self, pick: int) -> None:
        """The run's worker dies: the next claim reclaims the occurrence, to run again."""
        if not self.live:
            return
        task_id = sorted(self.live)[pick % len(self.live)]
        self.live.pop(task_id)
        self.lost.add(task_id)
        self.r.zadd(self.keys.running, {task_id: 0})

    @rule()
    def time_passes(self) -> None:
        due = self.r.zrange(self.keys.scheduled, 0, -1)
        if due:
            self.r.zadd(self.keys.scheduled, {task_id: 0 for task_id in due})

    def occurrences(self, name: str) -> set[str]:
        """Unfinished occurrences of a schedule: in the ready list, the schedule or running."""
        ids = [t.decode() for t in self.r.lrange(self.keys.ready, 0, -1)]
        ids += [t.decode() for t in self.r.zrange(self.keys.scheduled, 0, -1)]
        ids += [t.decode() for t in self.r.zrange(self.keys.running, 0, -1)]
        return {i for i in ids if (parse_occurrence(i) or ("", 0))[0] == name}

    @invariant()
    def one_pending_occurrence_per_schedule(self) -> None:
        for name in self.NAMES:
            unfinished = self.occurrences(name)
            never_started = unfinished - self.started
            pending = self.field(name, "n")
            if name in self.specs and name not in self.paused:
                assert pending is not None and self.state(pending) in (b"scheduled", b"ready", b"running"), name
                strays = {i for i in never_started - {pending} if self.state(i) != b"ready"}
                assert not strays, (name, strays, pending)  # (a ready stray is dropped when it starts)
            else:  # none waits for its slot (one already due is dropped when it starts)
                waiting = {i for i in never_started if self.state(i) == b"scheduled"}
                assert not waiting, (name, waiting)


def test_schedule_scripts_keep_one_pending_occurrence_and_start_no_overlapping_run(redis_url: str) -> None:
    check(ScheduleModel, redis_url, steps=40)
