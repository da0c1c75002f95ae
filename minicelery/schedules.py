"""Periodic schedules: what one is (a ScheduleSpec) and when its slots fall.

A schedule runs a task at slots: the times a cron expression gives in a zone (croniter and
zoneinfo do the calendar work), or every N milliseconds counted from the Unix epoch (so every
worker computes the same slots). Each slot becomes an ordinary scheduled task whose id names
the schedule and the slot (`occurrence_id`), so two workers that race to create it create one.
Times here are milliseconds on the Redis clock; this module never reads a clock itself.

What runs when is decided by `plan()` (the catch-up policy); the Redis side is in periodic.py
and scripts/schedule_*.lua.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterBadDateError, croniter

CatchUp = Literal["one", "all", "skip"]
CATCH_UP_POLICIES: tuple[str, ...] = ("one", "all", "skip")
OCCURRENCE_PREFIX = "sched:"
MANUAL_MARK = "by-hand-"  # after the name in a run by hand's id, where an occurrence has its slot
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
# Counting missed cron slots walks them one by one: past this many, the count says "at least".
MISSED_COUNT_CAP = 10_000


def check_schedule_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"schedule name {name!r} is invalid: use 1-200 letters, digits, '_', '.' or '-'")
    return name


def check_cron(expression: str) -> str:
    if not isinstance(expression, str) or not croniter.is_valid(expression):
        raise ValueError(f"{expression!r} is not a valid cron expression (e.g. '0 3 * * *')")
    try:  # valid fields can still name no date at all ('0 0 31 2 *'): a worker would find no slot
        croniter(expression, dt.datetime(2000, 1, 1)).get_next(dt.datetime)
    except CroniterBadDateError:
        raise ValueError(f"{expression!r} never matches a date (such as 31 February)") from None
    return expression


def check_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        same_but_case = [zone for zone in available_timezones() if zone.lower() == name.lower()]
        hint = (
            f"did you mean {same_but_case[0]!r}?" if same_but_case else "an IANA name such as 'Europe/Berlin' or 'UTC'"
        )
        raise ValueError(f"unknown time zone {name!r} ({hint})") from exc
    return name


def check_zone_applies(every: object, tz: str) -> None:
    """A zone other than UTC with `every`: refused where a schedule is declared (code or TOML;
    not on specs already stored), since it would look as if it applied and it does not."""
    if every is not None and tz != "UTC":
        raise ValueError(
            f"tz = {tz!r} applies to cron schedules only: an every schedule's slots count from the Unix "
            "epoch whatever the zone (leave tz out, or use cron for times of day in a zone)"
        )


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule as stored in Redis (as canonical JSON: equal specs have equal text)."""

    name: str
    task: str
    queue: str
    cron: str | None = None
    every_ms: int | None = None
    tz: str = "UTC"
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    overlap: bool = False  # True: a slot may start while the previous run still runs
    catch_up: str = "one"  # after slots were missed: "one" run for them, "all" of them, or "skip"
    time_limit: float | None = None
    retries: int = 0

    def __post_init__(self) -> None:
        check_schedule_name(self.name)
        if (self.cron is None) == (self.every_ms is None):
            raise ValueError("give exactly one of cron= and every=")
        if self.cron is not None:
            check_cron(self.cron)
        if self.every_ms is not None and self.every_ms <= 0:
            raise ValueError("every must be a positive interval")
        check_zone(self.tz)
        if self.catch_up not in CATCH_UP_POLICIES:
            raise ValueError(f"catch_up must be one of {', '.join(CATCH_UP_POLICIES)}, not {self.catch_up!r}")

    # --- storage -------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ScheduleSpec:
        return cls(**json.loads(text))

    def describe(self) -> str:
        """The schedule in one phrase: 'cron 0 3 * * *' or 'every 30s'."""
        if self.cron is not None:
            return f"cron {self.cron}"
        assert self.every_ms is not None
        return f"every {self.every_ms / 1000:g}s"

    # --- slots ---------------------------------------------------------------------------------

    def after(self, ms: int) -> int:
        """The first slot strictly after `ms`."""
        if self.every_ms is not None:
            return (ms // self.every_ms + 1) * self.every_ms
        assert self.cron is not None
        zone = ZoneInfo(self.tz)
        start = dt.datetime.fromtimestamp(ms / 1000, zone)
        slots = croniter(self.cron, start)
        while True:
            slot: dt.datetime = slots.get_next(dt.datetime)
            # On a fall-back day the wall clock runs an hour twice; croniter gives its times
            # again. A slot whose wall time is not later than the start's already ran (or was
            # passed) on the wall clock: a 02:30 daily job runs once, at the first 02:30.
            if slot.replace(tzinfo=None) > start.replace(tzinfo=None):
                return int(slot.timestamp() * 1000)

    def interval_ms(self, ms: int) -> int:
        """The gap between the slot after `ms` and the one after it (an alert's yardstick)."""
        first = self.after(ms)
        return self.after(first) - first

    def count_between(self, first: int, last: int) -> int:
        """How many slots fall in [first, last] (capped at MISSED_COUNT_CAP for cron)."""
        if last < first:
            return 0
        if self.every_ms is not None:
            return (last // self.every_ms) - ((first - 1) // self.every_ms)
        count, slot = 0, first - 1
        while count < MISSED_COUNT_CAP:
            slot = self.after(slot)
            if slot > last:
                break
            count += 1
        return count

    def plan(self, slot: int, now: int) -> Plan:
        """What to do with the occurrence for `slot`, started at `now`: run it or not, which
        slot comes next, and how many slots are given up (missed). On time, or with catch-up
        "all", it runs and the next slot follows it (if that is past already, it runs at once:
        all missed slots replay, one after another). Late by more than a slot, "one" runs this
        occurrence for all the missed slots and "skip" runs none of them; either way the next
        slot is the first one still to come."""
        following = self.after(slot)
        if self.catch_up == "all" or following > now:
            return Plan(run=True, next_slot=following, missed=0)
        upcoming = self.after(now)
        given_up = self.count_between(following, now)
        if self.catch_up == "skip":
            return Plan(run=False, next_slot=upcoming, missed=given_up + 1)
        return Plan(run=True, next_slot=upcoming, missed=given_up)


@dataclass(frozen=True)
class Plan:
    run: bool
    next_slot: int
    missed: int


def occurrence_id(name: str, slot_ms: int) -> str:
    """The task id of a schedule's slot: the same in every worker, so creating it is idempotent."""
    return f"{OCCURRENCE_PREFIX}{name}:{slot_ms}"


def manual_run_id(name: str, unique: str) -> str:
    """The task id of a run by hand (`minicelery schedules run NAME`): names its schedule, so
    the worker that starts it records it as the schedule's last run; no slot."""
    return f"{OCCURRENCE_PREFIX}{name}:{MANUAL_MARK}{unique}"


def parse_manual_run(task_id: str) -> str | None:
    """The schedule name of a run by hand's id, or None for any other task id."""
    if not task_id.startswith(OCCURRENCE_PREFIX):
        return None
    name, _, rest = task_id[len(OCCURRENCE_PREFIX) :].rpartition(":")
    return name if name and rest.startswith(MANUAL_MARK) else None


def parse_occurrence(task_id: str) -> tuple[str, int] | None:
    """(schedule name, slot ms) of an occurrence id, or None for any other task id."""
    if not task_id.startswith(OCCURRENCE_PREFIX):
        return None
    name, _, slot = task_id[len(OCCURRENCE_PREFIX) :].rpartition(":")
    if not name or not slot.isdigit():
        return None
    return name, int(slot)


def every_ms(every: float | dt.timedelta) -> int:
    """An `every=` value (seconds or a timedelta) in whole milliseconds, checked positive."""
    seconds = every.total_seconds() if isinstance(every, dt.timedelta) else every
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ValueError(f"every must be a positive number of seconds or a timedelta, not {every!r}")
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"every must be at least a millisecond, not {every!r}")
    return ms
