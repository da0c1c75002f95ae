"""Periodic tasks: slot arithmetic (DST with fixed dates), the schedule scripts on their own,
and real worker processes running a schedule exactly once per slot."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from zoneinfo import ZoneInfo

import pytest
import redis
from conftest import wait_until

from minicelery import Client, RedisBroker
from minicelery.broker import Claim
from minicelery.periodic import Schedules, declared_specs, upsert
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
        ({"cron": "0 3 * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "0 3 * * *", "every": 5}, "exactly one of"),
        ({}, "exactly one of"),
        ({"every": 0}, "positive"),
    ],
)
def test_periodic_rejects_a_bad_schedule_at_import_time(
    app: Client, options: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):

        @app.periodic(**options)  # type: ignore[arg-type]
        def nightly() -> None: ...

    assert "nightly" not in app.tasks


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
    fields: dict[str, object] = {"every_ms": 3_600_000, **options}
    return ScheduleSpec("hourly", "slot_run", queue, args=["t"], **fields)  # type: ignore[arg-type]


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
