"""Periodic tasks: slot arithmetic (DST with fixed dates), the schedule scripts on their own,
and real worker processes running a schedule exactly once per slot."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import subprocess
from zoneinfo import ZoneInfo

import pytest
import redis
from conftest import Workers, require_tool, wait_until

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.periodic import Schedules, declared_specs, upsert
from minicelery.queue_reads import stored_payload
from minicelery.records import Claim
from minicelery.schedules import ScheduleSpec, occurrence_id, parse_occurrence
from minicelery.settings import load_settings

BERLIN = ZoneInfo("Europe/Berlin")


def _ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def _local(ms: int, zone: ZoneInfo = BERLIN) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, zone).strftime("%m-%d %H:%M%z")


def _slots(spec: ScheduleSpec, start: dt.datetime, count: int) -> list[str]:
    out, at = [], _ms(start)
    for _ in range(count):
        at = spec.after(at)
        out.append(_local(at))
    return out


# --- slots, without Redis ------------------------------------------------------------------------


def test_interval_slots_are_multiples_of_the_interval_counted_from_the_epoch() -> None:
    spec = ScheduleSpec("s", "t", "q", every_ms=30_000)
    assert spec.after(0) == 30_000
    assert spec.after(29_999) == 30_000
    assert spec.after(30_000) == 60_000
    assert spec.count_between(30_000, 90_000) == 3


def test_a_0230_daily_job_runs_at_0300_on_the_spring_forward_day() -> None:
    spec = ScheduleSpec("s", "t", "q", cron="30 2 * * *", tz="Europe/Berlin")
    assert _slots(spec, dt.datetime(2026, 3, 28, 12, tzinfo=BERLIN), 3) == [
        "03-29 03:00+0200",  # 02:30 does not exist that night: the first instant after the gap
        "03-30 02:30+0200",
        "03-31 02:30+0200",
    ]


def test_a_0230_daily_job_runs_once_on_the_fall_back_day() -> None:
    spec = ScheduleSpec("s", "t", "q", cron="30 2 * * *", tz="Europe/Berlin")
    assert _slots(spec, dt.datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3) == [
        "10-25 02:30+0200",  # the first 02:30 only: the wall clock's second 02:30 is not run again
        "10-26 02:30+0100",
        "10-27 02:30+0100",
    ]


def test_a_half_hourly_job_does_not_repeat_the_fall_back_hour() -> None:
    spec = ScheduleSpec("s", "t", "q", cron="*/30 * * * *", tz="Europe/Berlin")
    assert _slots(spec, dt.datetime(2026, 10, 25, 1, 45, tzinfo=BERLIN), 4) == [
        "10-25 02:00+0200",
        "10-25 02:30+0200",
        "10-25 03:00+0100",  # an hour and a half later in real time: the wall clock rules
        "10-25 03:30+0100",
    ]


def test_a_utc_cron_schedule_knows_no_daylight_saving() -> None:
    spec = ScheduleSpec("s", "t", "q", cron="30 2 * * *")
    start = dt.datetime(2026, 3, 28, 12, tzinfo=dt.UTC)
    assert [spec.after(_ms(start)) - _ms(start), spec.interval_ms(_ms(start))] == [
        (14 * 3600 + 30 * 60) * 1000,
        86_400_000,
    ]


def test_catch_up_one_runs_a_late_slot_once_and_counts_the_slots_it_stands_for() -> None:
    spec = ScheduleSpec("s", "t", "q", every_ms=1000)
    plan = spec.plan(slot=10_000, now=15_500)
    assert (plan.run, plan.next_slot, plan.missed) == (True, 16_000, 5)  # 11..15 s given up


def test_catch_up_skip_runs_none_of_the_missed_slots() -> None:
    spec = ScheduleSpec("s", "t", "q", every_ms=1000, catch_up="skip")
    plan = spec.plan(slot=10_000, now=15_500)
    assert (plan.run, plan.next_slot, plan.missed) == (False, 16_000, 6)


def test_catch_up_all_replays_every_missed_slot_one_after_another() -> None:
    spec = ScheduleSpec("s", "t", "q", every_ms=1000, catch_up="all")
    plan = spec.plan(slot=10_000, now=15_500)
    assert (plan.run, plan.next_slot, plan.missed) == (True, 11_000, 0)


def test_a_slot_on_time_runs_and_the_next_one_follows_it() -> None:
    spec = ScheduleSpec("s", "t", "q", every_ms=1000, catch_up="skip")
    plan = spec.plan(slot=10_000, now=10_700)
    assert (plan.run, plan.next_slot, plan.missed) == (True, 11_000, 0)


def test_an_occurrence_id_names_its_schedule_and_slot() -> None:
    assert parse_occurrence(occurrence_id("nightly.report", 1_700_000_000_000)) == ("nightly.report", 1_700_000_000_000)
    assert parse_occurrence("0123abcd") is None


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"cron": "61 * * * *"}, "not a valid cron expression"),
        ({"cron": "0 0 31 2 *"}, "never matches a date"),
        ({"cron": "0 3 * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "0 3 * * *", "tz": "europe/berlin"}, "did you mean 'Europe/Berlin'"),
        ({"cron": "0 3 * * *", "every": 5}, "exactly one of"),
        ({}, "exactly one of"),
        ({"every": 0}, "positive"),
        ({"every": 86400, "tz": "Europe/Berlin"}, "applies to cron schedules only"),
    ],
)
def test_periodic_rejects_a_bad_schedule_at_import_time(
    app: Client, options: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):

        @app.periodic(**options)  # type: ignore[arg-type]
        def nightly() -> None: ...

    assert "nightly" not in app.tasks


def test_periodic_refuses_arguments_that_do_not_fit_its_function(app: Client) -> None:
    with pytest.raises(ValueError, match=r"@app\.periodic: arguments do not fit report\(day"):

        @app.periodic(every=60, args=[1, 2])
        def report(day: int) -> None: ...

    assert "report" not in app.tasks  # not registered half-way


def test_a_periodic_task_is_a_task_like_any_other(app: Client) -> None:
    @app.periodic(every=dt.timedelta(minutes=5), args=[1], queue=app.default_queue)
    def every_five(x: int) -> int:
        return x

    assert every_five.schedule is not None and every_five.schedule.every_ms == 300_000
    assert every_five(2).message.args == [2]  # calling it makes an ordinary handle
    assert every_five.run_locally(3) == 3


# --- the scripts, on a real Redis -------------------------------------------------------------


def _claim_occurrence(broker: RedisBroker, queue: str, token: str) -> Claim:
    """Claim the next occurrence, once it is due (slots a millisecond apart: at once)."""

    def claimed() -> list[Claim] | None:
        reply = broker.claim(queue, token, 10_000, "w-test")
        return reply if isinstance(reply, list) else None

    claims = wait_until(claimed, 5, "an occurrence due")
    assert isinstance(claims, list)
    return claims[0]


def _spec(queue: str, **options: object) -> ScheduleSpec:
    fields: dict[str, object] = {"every_ms": 3_600_000, "args": ["t"], **options}
    return ScheduleSpec("hourly", "slot_run", queue, **fields)  # type: ignore[arg-type]


def _state(r: redis.Redis, queue: str) -> dict[str, str]:
    raw = r.hgetall(f"minicelery:{{{queue}}}:schedule_state")
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_workers_racing_to_declare_a_schedule_create_one_occurrence(app: Client, queue: str, r: redis.Redis) -> None:
    spec = _spec(queue)
    replies = [upsert(app.broker, spec) for _ in range(5)]
    assert [status for status, _ in replies] == ["created"] + ["kept"] * 4
    assert len({pending for _, pending in replies}) == 1
    assert r.zcard(f"minicelery:{{{queue}}}:scheduled") == 1


def test_the_first_start_of_a_slot_creates_the_next_one_and_a_rerun_creates_nothing(
    app: Client, queue: str, r: redis.Redis
) -> None:
    spec = _spec(queue, every_ms=1)  # a slot every millisecond: the first one is due at once
    schedules = Schedules(app, load_settings(worker={"queues": [queue]}))
    schedules.specs = {spec.name: spec}
    schedules.upsert()
    first = _claim_occurrence(app.broker, queue, "a")
    assert parse_occurrence(first.id) is not None
    assert schedules.begin(first)
    pending = _state(r, queue)["hourly:n"]
    assert pending != first.id and _state(r, queue)["hourly:c"] == first.id
    rerun = dataclasses.replace(first, token="b")  # the same slot claimed again after a reclaim
    r.hset(f"minicelery:{{{queue}}}:info", f"{first.id}:t", "b")
    assert schedules.begin(rerun)  # it runs again (at least once), and creates nothing more
    assert _state(r, queue)["hourly:n"] == pending
    assert _state(r, queue)["hourly:r"] == "2"


def test_a_changed_spec_replaces_the_pending_occurrence_last_writer_wins(
    app: Client, queue: str, r: redis.Redis
) -> None:
    old = _spec(queue, every_ms=3_600_000)
    new = _spec(queue, every_ms=7_200_000)
    _, first = upsert(app.broker, old)
    status, second = upsert(app.broker, new)
    assert status in ("replaced", "kept")  # kept when both land on the same slot id
    assert r.zrange(f"minicelery:{{{queue}}}:scheduled", 0, -1) == [second.encode()]  # type: ignore[union-attr]
    stored = r.hget(f"minicelery:{{{queue}}}:schedules", "hourly")
    assert json.loads(stored)["every_ms"] == 7_200_000  # type: ignore[arg-type]
    status, third = upsert(app.broker, old)  # the old version restarts: it wins, still one pending
    assert r.zcard(f"minicelery:{{{queue}}}:scheduled") == 1
    assert first == third


def test_pausing_drops_the_pending_occurrence_and_resuming_creates_it(app: Client, queue: str, r: redis.Redis) -> None:
    spec = _spec(queue)
    upsert(app.broker, spec)
    assert upsert(app.broker, spec, paused="1", keep_spec=True) == ("paused", None)
    assert r.zcard(f"minicelery:{{{queue}}}:scheduled") == 0
    assert upsert(app.broker, spec) == ("paused", None)  # a worker restarting does not resume it
    status, pending = upsert(app.broker, spec, paused="0", keep_spec=True)
    assert status == "created" and r.zrange(f"minicelery:{{{queue}}}:scheduled", 0, -1) == [pending.encode()]  # type: ignore[union-attr]


def test_removing_a_schedule_deletes_its_spec_state_and_pending_occurrence(
    app: Client, queue: str, r: redis.Redis
) -> None:
    spec = _spec(queue)
    upsert(app.broker, spec)
    assert app.broker.schedule_remove(queue, "hourly")
    assert not app.broker.schedule_remove(queue, "hourly")
    assert r.zcard(f"minicelery:{{{queue}}}:scheduled") == 0
    assert _state(r, queue) == {} and r.hlen(f"minicelery:{{{queue}}}:schedules") == 0
    assert r.hlen(f"minicelery:{{{queue}}}:payload") == 0


def test_cancelling_the_pending_occurrence_skips_that_run_only_the_next_slot_is_pending_at_once(
    app: Client, queue: str, r: redis.Redis
) -> None:
    _, pending = upsert(app.broker, _spec(queue))
    assert pending is not None
    assert app.handle(pending).cancel()
    assert app.handle(pending).state == "cancelled"
    parsed = parse_occurrence(pending)
    assert parsed is not None
    following = occurrence_id("hourly", parsed[1] + 3_600_000)
    assert _state(r, queue)["hourly:n"] == following
    assert r.zrange(f"minicelery:{{{queue}}}:scheduled", 0, -1) == [following.encode()]
    assert not app.handle(pending).cancel()  # cancelled already: nothing more happens
    assert _state(r, queue)["hourly:n"] == following


def test_a_cancel_planned_from_a_spec_replaced_meanwhile_writes_nothing_and_plans_again(
    app: Client, queue: str, r: redis.Redis
) -> None:
    from minicelery.occurrences import skip_plans
    from minicelery.records import ScriptStatus

    _, pending = upsert(app.broker, _spec(queue))
    assert pending is not None
    stale = skip_plans(app.broker, queue, [pending])
    assert upsert(app.broker, _spec(queue, args=["new"])) == ("kept", pending)  # same slot, new spec
    envelope = app.broker.transport.dumps_error(ValueError("x"))
    assert app.broker.cancel(queue, [pending], envelope, "test", stale) == [ScriptStatus.CHANGED]
    assert app.handle(pending).state == "scheduled"  # nothing written
    assert app.handle(pending).cancel()  # task.cancel plans again from the stored spec
    following = _state(r, queue)["hourly:n"]
    payload = stored_payload(r.hget(f"minicelery:{{{queue}}}:payload", following))
    assert following != pending and JSONTransport().loads_message(payload).args == ["new"]  # type: ignore[arg-type]


def _early_begin(app: Client, queue: str, r: redis.Redis, spec: ScheduleSpec) -> tuple[Schedules, Claim, int]:
    """A worker's claim at the slot it waited for, with the begin sent along (as the intake
    does); the occurrence is made due now whatever its slot."""
    schedules = Schedules(app, load_settings(worker={"queues": [queue]}))
    schedules.specs = {spec.name: spec}
    schedules.upsert()
    pending = _state(r, queue)["hourly:n"]
    r.zadd(f"minicelery:{{{queue}}}:scheduled", {pending: 0})
    slot = int(_state(r, queue)["hourly:d"])
    begin = schedules.begin_with_claim(queue, slot, "tok")
    assert begin is not None
    claimed, begun = app.broker.claim_and_begin(queue, "tok", 10_000, "w-test", slot, 1, begin)
    schedules.begun_with_claim(begun)
    assert isinstance(claimed, list) and claimed[0].id == pending
    return schedules, claimed[0], slot


def test_a_begin_sent_with_the_claim_starts_the_slot_in_that_round_trip(
    app: Client, queue: str, r: redis.Redis
) -> None:
    schedules, claim, slot = _early_begin(app, queue, r, _spec(queue))  # hourly: the slot is ahead
    state = _state(r, queue)
    assert state["hourly:c"] == claim.id and state["hourly:r"] == "1"  # started with the claim
    assert state["hourly:n"] == occurrence_id("hourly", slot + 3_600_000)
    assert schedules.begin(claim)  # it runs, and is not begun a second time
    assert _state(r, queue)["hourly:r"] == "1"


def test_a_begin_sent_with_a_claim_a_slot_late_writes_nothing_and_catch_up_decides(
    app: Client, queue: str, r: redis.Redis
) -> None:
    spec = _spec(queue, every_ms=1, catch_up="skip")  # its next slot has passed when the claim runs
    schedules, claim, slot = _early_begin(app, queue, r, spec)
    assert "hourly:c" not in _state(r, queue) and _state(r, queue)["hourly:n"] == claim.id  # nothing written
    assert not schedules.begin(claim)  # planned again at the claim's time: catch-up "skip"
    assert int(_state(r, queue)["hourly:m"]) >= 1 and int(_state(r, queue)["hourly:d"]) > slot


def test_a_slot_due_while_the_previous_run_still_runs_waits_for_it(app: Client, queue: str, r: redis.Redis) -> None:
    spec = _spec(queue, every_ms=1)
    schedules = Schedules(app, load_settings(worker={"queues": [queue]}))
    schedules.specs = {spec.name: spec}
    schedules.upsert()
    first = _claim_occurrence(app.broker, queue, "a")
    assert schedules.begin(first)  # runs, and creates the next slot, due at once
    second = _claim_occurrence(app.broker, queue, "b")
    assert not schedules.begin(second)  # the first still runs: given back, not run
    info = f"minicelery:{{{queue}}}:info"
    assert r.hget(info, f"{second.id}:s") == b"scheduled" and r.hget(info, f"{second.id}:a") == b"0"
    app.broker.finish(queue, first.id, first.token, succeeded=True, envelope=b'{"ok":true,"value":null}')
    r.zadd(f"minicelery:{{{queue}}}:scheduled", {second.id: 0})  # (its recheck time, now)
    third = _claim_occurrence(app.broker, queue, "c")
    assert third.id == second.id and schedules.begin(third)


def test_overlap_allowed_lets_a_slot_start_while_the_previous_run_runs(app: Client, queue: str) -> None:
    spec = _spec(queue, every_ms=1, overlap=True)
    schedules = Schedules(app, load_settings(worker={"queues": [queue]}))
    schedules.specs = {spec.name: spec}
    schedules.upsert()
    assert schedules.begin(_claim_occurrence(app.broker, queue, "a"))
    assert schedules.begin(_claim_occurrence(app.broker, queue, "b"))


def test_an_occurrence_of_a_removed_schedule_is_dropped_not_run(app: Client, queue: str, r: redis.Redis) -> None:
    spec = _spec(queue, every_ms=1)
    upsert(app.broker, spec)
    claim = _claim_occurrence(app.broker, queue, "a")  # claimed, then the schedule is removed
    app.broker.schedule_remove(queue, "hourly")
    schedules = Schedules(app, load_settings(worker={"queues": [queue]}))
    assert not schedules.begin(claim)
    assert r.zcard(f"minicelery:{{{queue}}}:running") == 0 and r.hlen(f"minicelery:{{{queue}}}:payload") == 0


def test_a_schedules_table_naming_an_unregistered_task_is_a_config_error(app: Client) -> None:
    from minicelery.errors import ConfigError

    settings = load_settings(schedules=[{"task": "no_such_task", "every": 5}])
    with pytest.raises(ConfigError, match=r"schedules\.0: task 'no_such_task' is not registered"):
        declared_specs(app.tasks, settings)


def test_a_schedules_table_overrides_the_code_schedule_of_the_same_name(app: Client, queue: str) -> None:
    @app.periodic(cron="0 3 * * *", queue=queue)
    def nightly() -> None: ...

    settings = load_settings(schedules=[{"task": "nightly", "cron": "0 4 * * *", "tz": "Europe/Berlin"}])
    (spec,) = declared_specs({"nightly": nightly}, settings).values()
    assert (spec.cron, spec.tz, spec.queue) == ("0 4 * * *", "Europe/Berlin", queue)


# --- real worker processes ----------------------------------------------------------------------


def _schedule_env(queue: str, tag: str, seconds: float = 0.0, **options: object) -> str:
    """The 1 s schedule of slot_run(tag) on the test's queue (the test task modules' Client
    sends to "default", which the test workers do not consume)."""
    return json.dumps([{"task": "slot_run", "every": 1, "args": [tag, seconds], "queue": queue, **options}])


def _runs(r: redis.Redis, kind: str, tag: str) -> dict[int, int]:
    """slot ms -> how many runs of it started (kind "starts") or ended ("ends")."""
    runs = {}
    for task_id, count in r.hgetall(f"test:slot_{kind}:{tag}").items():
        parsed = parse_occurrence(task_id.decode())
        assert parsed is not None, task_id
        runs[parsed[1]] = int(count)
    return runs


def _running(workers: Workers, r: redis.Redis, tag: str, **options: object) -> subprocess.Popen[bytes]:
    """A worker declaring the 1 s schedule of slot_run(tag), once a run of it has ended."""
    proc = workers.start(MINICELERY_SCHEDULES=_schedule_env(workers.queue, tag, **options))
    workers.wait_ready(proc)
    wait_until(lambda: _runs(r, "ends", tag), 20, "a run")
    return proc


def _redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _settled(r: redis.Redis, queue: str) -> bool:
    """Nothing of the queue runs or waits to run (the schedule is paused)."""
    prefix = f"minicelery:{{{queue}}}:"
    return r.zcard(prefix + "running") == 0 and r.llen(prefix + "ready") == 0 and r.zcard(prefix + "scheduled") == 0


def test_three_workers_run_each_slot_of_a_one_second_schedule_once_though_one_is_killed_mid_run(
    app: Client, workers: Workers, queue: str, r: redis.Redis
) -> None:
    """The exactly-once test: every slot from the first to the last completed once, none
    twice, none missed. The run the kill interrupted is run again for its slot once its lease
    expires (delivery is at least once, as for every task): it started twice, ended once. Catch
    up "all" replays the slots that fell due while that lease held the schedule back (without
    overlap, a slot waits for the run before it)."""
    tag = f"exact-{queue}"
    env = workers.env(MINICELERY_SCHEDULES=_schedule_env(workers.queue, tag, 0.4, catch_up="all"))
    procs = [workers.start(env=env) for _ in range(3)]
    for proc in procs:
        workers.wait_ready(proc)
    wait_until(lambda: len(_runs(r, "ends", tag)) >= 5, 30, "five slots run")

    def victim() -> tuple[int, int] | None:  # a worker in the middle of a run, and that run's slot
        held = r.get(f"test:slot_pid:{tag}")
        if not held:
            return None
        pid, task_id = held.decode().split()
        parsed = parse_occurrence(task_id)
        return (int(pid), parsed[1]) if parsed and parsed[1] not in _runs(r, "ends", tag) else None

    pid, killed_slot = wait_until(victim, 20, "a run in progress")  # type: ignore[misc]
    (killed,) = [p for p in procs if p.pid == pid]
    killed.send_signal(9)
    killed.wait()
    wait_until(lambda: len(_runs(r, "ends", tag)) >= 25, 90, "twenty-five slots run")
    assert upsert(app.broker, _spec_named(app, "slot_run"), paused="1", keep_spec=True)[0] == "paused"
    wait_until(lambda: _settled(r, queue), 30, "the paused schedule to settle")

    starts, ends = _runs(r, "starts", tag), _runs(r, "ends", tag)
    slots = sorted(ends)
    expected = list(range(slots[0], slots[-1] + 1000, 1000))
    twice = [slot for slot, count in ends.items() if count > 1]
    missed = sorted(set(expected) - set(ends))
    restarted = sorted(slot for slot, count in starts.items() if count > 1)
    print(
        f"\nexactly-once: slots {len(expected)}, runs completed {sum(ends.values())}, runs started "
        f"{sum(starts.values())}, duplicates {len(twice)}, misses {len(missed)}, kills 1 (slot {killed_slot}, "
        f"started {starts.get(killed_slot)}x, completed {ends.get(killed_slot)}x)"
    )
    assert twice == [] and missed == []
    assert set(starts) == set(ends)  # every run started was completed (the killed one by its re-run)
    assert restarted in ([killed_slot], [])  # only the killed run was started again
    assert ends[killed_slot] == 1


def test_a_cancelled_occurrence_does_not_run_and_the_schedule_goes_on(
    app: Client, workers: Workers, queue: str, r: redis.Redis
) -> None:
    """Cancelling one run skips it, as in Celery or Sidekiq; `schedules pause` stops a schedule."""
    tag = f"cancel-{queue}"
    proc = _running(workers, r, tag)
    state = f"minicelery:{{{queue}}}:schedule_state"
    pending = r.hget(state, "slot_run:n").decode()  # type: ignore[union-attr]
    assert app.handle(pending).cancel(by="cli")
    parsed = parse_occurrence(pending)
    assert parsed is not None
    skipped = parsed[1]
    wait_until(lambda: len([s for s in _runs(r, "ends", tag) if s > skipped]) >= 2, 20, "two later slots run")
    assert skipped not in _runs(r, "starts", tag)
    assert skipped + 1000 in _runs(r, "ends", tag)  # the very next slot ran: no gap after the cancel
    assert "Traceback" not in workers.log(proc)


def _spec_named(app: Client, name: str) -> ScheduleSpec:
    stored = app.broker.schedule_spec(app.default_queue, name)
    assert stored is not None
    return ScheduleSpec.from_json(stored)


def test_after_every_worker_was_down_across_slots_one_run_stands_for_the_missed_ones(
    app: Client, workers: Workers, queue: str, r: redis.Redis
) -> None:
    tag = f"down-{queue}"
    env = workers.env(MINICELERY_SCHEDULES=_schedule_env(workers.queue, tag))
    first = workers.start(env=env)
    workers.wait_ready(first)
    wait_until(lambda: len(_runs(r, "ends", tag)) >= 2, 20, "two slots run")
    first.send_signal(15)
    assert first.wait(30) == 0
    pending_slot = int(r.hget(f"minicelery:{{{queue}}}:schedule_state", "slot_run:d") or 0)
    # Every worker is down while three more slots pass on the Redis clock.
    wait_until(lambda: _redis_ms(r) > pending_slot + 3000, 10, "three slots to pass")
    before = set(_runs(r, "ends", tag))
    second = workers.start(env=env)
    workers.wait_ready(second)
    wait_until(lambda: len(set(_runs(r, "ends", tag)) - before) >= 2, 20, "two runs after the restart")
    after = sorted(set(_runs(r, "ends", tag)) - before)
    assert after[0] == pending_slot  # the late slot runs once, for all the missed ones
    assert after[1] - after[0] > 3000  # then the first slot still to come: no burst of the missed
    missed = int(r.hget(f"minicelery:{{{queue}}}:schedule_state", "slot_run:m") or 0)
    assert missed == (after[1] - after[0]) // 1000 - 1


def test_a_worker_without_the_schedule_neither_removes_nor_changes_it(
    app: Client, workers: Workers, queue: str, r: redis.Redis
) -> None:
    tag = f"keep-{queue}"
    declaring = _running(workers, r, tag)
    spec_before = r.hget(f"minicelery:{{{queue}}}:schedules", "slot_run")
    other = workers.start()  # deployed without any [[schedules]]
    workers.wait_ready(other)
    declaring.send_signal(9)
    declaring.wait()
    done = len(_runs(r, "ends", tag))
    wait_until(lambda: len(_runs(r, "ends", tag)) >= done + 3, 30, "the other worker to run later slots")
    assert r.hget(f"minicelery:{{{queue}}}:schedules", "slot_run") == spec_before


@pytest.mark.parametrize("skew", ["+1d", "-1d"])
def test_a_worker_with_a_skewed_clock_runs_slots_on_the_redis_clock(
    app: Client, workers: Workers, queue: str, r: redis.Redis, skew: str
) -> None:
    faketime = require_tool("faketime", "apt-get install faketime")
    tag = f"skew-{queue}"
    proc = workers.start(wrapper=[faketime, "-f", skew], MINICELERY_SCHEDULES=_schedule_env(workers.queue, tag))
    workers.wait_ready(proc)
    wait_until(lambda: len(_runs(r, "ends", tag)) >= 3, 30, "three slots run")
    slots = sorted(_runs(r, "ends", tag))
    now = _redis_ms(r)
    assert all(now - 60_000 < slot <= now for slot in slots), (now, slots)  # not a day off
    assert slots == list(range(slots[0], slots[-1] + 1000, 1000))


def test_an_older_worker_restarting_with_another_definition_wins_without_a_duplicate_slot(
    app: Client, workers: Workers, queue: str, r: redis.Redis
) -> None:
    tag = f"upgrade-{queue}"
    _running(workers, r, tag, catch_up="skip")
    old = workers.start(MINICELERY_SCHEDULES=_schedule_env(workers.queue, tag))  # the older definition
    workers.wait_ready(old)
    assert json.loads(r.hget(f"minicelery:{{{queue}}}:schedules", "slot_run"))["catch_up"] == "one"  # type: ignore[arg-type]
    done = len(_runs(r, "ends", tag))
    wait_until(lambda: len(_runs(r, "ends", tag)) >= done + 3, 30, "three more slots")
    assert r.zcard(f"minicelery:{{{queue}}}:scheduled") <= 1
    assert all(count == 1 for count in _runs(r, "starts", tag).values())


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({"task": "slot_run", "cron": "0 25 * * *"}, "schedules.0.cron"),
        ({"task": "slot_run", "cron": "0 3 * * *", "tz": "Nowhere/Atlantis"}, "schedules.0.tz"),
        ({"task": "slot_run", "cron": "0 3 * * *", "every": 60}, "exactly one of cron and every"),
        ({"task": "slot_run"}, "exactly one of cron and every"),
        ({"task": "no_such_task", "every": 60}, "schedules.0: task 'no_such_task' is not registered"),
        ({"task": "slot_run", "cron": "0 0 31 2 *"}, "never matches a date"),
        ({"task": "slot_run", "every": 60}, "schedules.0 (slot_run): arguments do not fit slot_run("),
    ],
)
def test_a_worker_with_a_bad_schedules_table_exits_78_naming_it(
    workers: Workers, entry: dict[str, object], complaint: str
) -> None:
    proc = workers.start(MINICELERY_SCHEDULES=json.dumps([entry]))
    assert proc.wait(30) == 78
    log = workers.log(proc)
    assert complaint in log and "Traceback" not in log, log


def test_a_worker_of_another_queue_declares_a_schedule_on_its_tasks_queue_not_its_own(
    app: Client, workers: Workers, queue: str, r: redis.Redis
) -> None:
    """Worker groups with different -Q importing the same modules: one schedule, not one each."""
    from test_cli import run_cli

    other_queue = f"{queue}-other"
    tag = f"groups-{queue}"
    entry = json.dumps([{"task": "slot_run", "every": 1, "args": [tag], "queue": queue}])
    ours = _running(workers, r, tag)  # declares and runs it on `queue`
    # What an older version left: the schedule declared on the first of that worker's queues.
    upsert(app.broker, ScheduleSpec("slot_run", "slot_run", other_queue, every_ms=1000, args=[tag]))
    theirs = workers.start("-Q", other_queue, MINICELERY_SCHEDULES=entry.replace(f', "queue": "{queue}"', ""))
    workers.wait_ready(theirs)
    assert "on queue default (not a queue of this worker" in workers.log(theirs)  # the task's own queue
    assert f"schedule slot_run moved from queue {other_queue} to default" in workers.log(theirs)
    assert not r.exists(f"minicelery:{{{other_queue}}}:schedules")  # no copy on the worker's own queue
    listed = run_cli("schedules", "--json", env=workers.env())
    assert {row["queue"] for row in json.loads(listed.stdout) if row["name"] == "slot_run"} >= {queue, "default"}
    run_cli("schedules", "remove", "slot_run", "-q", "default", env=workers.env())
    for proc in (ours, theirs):
        proc.send_signal(9)
        proc.wait()


def test_purge_keeps_the_schedules_paused_or_not_and_gives_each_its_next_occurrence(
    app: Client, queue: str, workers: Workers, r: redis.Redis
) -> None:
    from test_cli import run_cli

    upsert(app.broker, ScheduleSpec("hourly", "slot_run", queue, cron="0 * * * *", args=["p"]))
    upsert(app.broker, ScheduleSpec("nightly", "slot_run", queue, cron="0 3 * * *", args=["p"]), paused="1")
    app.tasks["echo"]("gone").wait(3600)
    purged = run_cli("purge", "--yes", "-q", queue, env=workers.env())
    assert purged.returncode == 0, purged.stderr
    assert "schedule hourly kept: created" in purged.stdout and "schedule nightly kept: paused" in purged.stdout
    rows = {
        row["name"]: row for row in json.loads(run_cli("schedules", "--json", "-q", queue, env=workers.env()).stdout)
    }
    assert rows["hourly"]["next_due_ms"] is not None and not rows["hourly"]["paused"]
    assert rows["nightly"]["paused"] and rows["nightly"]["next_due_ms"] is None
    assert r.zcard(f"minicelery:{{{queue}}}:scheduled") == 1  # the hourly occurrence; the echo task went


def test_the_schedules_command_lists_pauses_resumes_runs_and_removes(
    app: Client, workers: Workers, queue: str, r: redis.Redis
) -> None:
    from test_cli import run_cli

    env = workers.env()
    tag = f"cli-{queue}"
    upsert(app.broker, ScheduleSpec("nightly", "slot_run", queue, cron="30 2 * * *", tz="Europe/Berlin", args=[tag]))
    listed = run_cli("schedules", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "nightly: cron 30 2 * * * (Europe/Berlin), task slot_run" in listed.stdout
    assert " UTC)" in listed.stdout and "last run: never" in listed.stdout
    assert run_cli("schedules", "pause", "nightly", env=env).returncode == 0
    rows = json.loads(run_cli("schedules", "--json", env=env).stdout)
    assert rows[0]["paused"] and rows[0]["next_due_ms"] is None
    assert run_cli("schedules", "resume", "nightly", env=env).returncode == 0
    assert json.loads(run_cli("schedules", "--json", env=env).stdout)[0]["next_due_ms"] is not None
    sent = run_cli("schedules", "run", "nightly", env=env)
    assert sent.returncode == 0, sent.stderr
    by_hand = app.handle(sent.stdout.strip())
    assert by_hand.state == "ready"  # one run now, besides the schedule
    workers.wait_ready(workers.start())  # a worker that does not declare the schedule runs it
    by_hand.result(timeout=30)
    row = json.loads(run_cli("schedules", "--json", env=env).stdout)[0]
    assert (row["runs"], row["last_outcome"], row["last_by_hand"]) == (1, "succeeded", True)
    assert row["next_due_ms"] is not None and row["last_slot_ms"] is None  # the schedule goes on
    assert "succeeded (run by hand)" in run_cli("schedules", env=env).stdout
    typo = run_cli("schedules", "pause", "nighty", "-q", queue, env=env)
    assert typo.returncode == 1 and f"no schedule 'nighty' on {queue} (there: nightly)" in typo.stderr, typo.stderr
    assert run_cli("schedules", "remove", "nightly", env=env).returncode == 0
    assert "no schedules" in run_cli("schedules", "-q", queue, env=env).stdout
    missing = run_cli("schedules", "pause", "nightly", env=env)
    assert missing.returncode == 1 and "no schedule 'nightly'" in missing.stderr


@pytest.mark.parametrize("zone", ["UTC", "Etc/GMT"])
def test_the_schedules_command_prints_a_utc_schedules_times_once(
    app: Client, workers: Workers, queue: str, zone: str
) -> None:
    from test_cli import run_cli

    upsert(app.broker, ScheduleSpec("hourly", "slot_run", queue, cron="0 * * * *", tz=zone, args=["utc"]))
    listed = run_cli("schedules", env=workers.env())
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^  next due: \d{4}-\d\d-\d\d \d\d:00:00 UTC$", listed.stdout, re.M), listed.stdout


def test_check_config_lists_the_schedules_and_rejects_one_for_an_unregistered_task(workers: Workers) -> None:
    from test_cli import run_cli

    good = run_cli("check-config", env=workers.env(MINICELERY_SCHEDULES=_schedule_env(workers.queue, "x")))
    assert good.returncode == 0, good.stderr
    assert "schedule slot_run: task slot_run, every 1s (UTC)" in good.stderr
    assert "no task modules configured" not in good.stderr  # they are: the worker's tasks are listed
    bad = run_cli("check-config", env=workers.env(MINICELERY_SCHEDULES='[{"task": "nope", "every": 5}]'))
    assert bad.returncode == 78 and "schedules.0: task 'nope' is not registered" in bad.stderr
