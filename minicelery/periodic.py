"""Schedules at run time: declared in Redis when a worker starts, and each slot's occurrence
started once (scripts/schedule_*.lua). The worker calls `Schedules.upsert()` once Redis
answers and `Schedules.begin(claim)` before it runs a claimed task; nothing else.

Slots are computed here (croniter, see schedules.py) on the Redis clock: the claim reply's
time, or Redis TIME at start-up. Redis keeps one pending occurrence per schedule, so any
number of workers may race to create it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .broker import RedisBroker
from .errors import BadArguments, BrokerError, ConfigError, MiniceleryError
from .occurrences import occurrence_payload
from .records import Claim
from .redis_wire import text as _text
from .runner import check_arguments
from .schedules import Plan, ScheduleSpec, occurrence_id, parse_manual_run, parse_occurrence
from .settings import ScheduleSettings, Settings
from .task import TaskDefinition

if TYPE_CHECKING:
    from .app import Client
    from .metrics import WorkerMetrics

log = logging.getLogger(__name__)

# An occurrence held back by an unfinished earlier run looks again at least this often.
OVERLAP_RECHECK_MS = 1000
# How many later slots to try when the next one already ran (Redis's clock went back).
TAKEN_RETRIES = 20
# schedule_begin.lua's ARGV[6:] for a run by hand (slot ""): no plan, nothing created.
MANUAL_PLAN = (1, "", 0, b"", 0, 1, OVERLAP_RECHECK_MS)


def declared_specs(tasks: Mapping[str, TaskDefinition], settings: Settings) -> dict[str, ScheduleSpec]:
    """The schedules this worker declares: @app.periodic tasks, then [[schedules]] tables (which
    override one of the same name). Raises ConfigError naming a table whose task is unknown."""
    specs: dict[str, ScheduleSpec] = {}
    for definition in tasks.values():
        if definition.schedule is not None:
            # The task's own queue, where a call in code sends it, whatever queues this worker
            # consumes: a worker started with another -Q must not declare a second copy of the
            # schedule on its own queue (each would run every slot).
            specs[definition.schedule.name] = dataclasses.replace(definition.schedule, queue=definition.queue)
    for index, entry in enumerate(settings.schedules):
        found = tasks.get(entry.task)
        if found is None:
            raise ConfigError(
                f"invalid setting schedules.{index}: task {entry.task!r} is not registered by the task modules "
                f"{settings.tasks} (known: {', '.join(sorted(tasks)) or 'none'})"
            )
        spec = _spec_of(entry, found)
        try:  # every slot would be dead-lettered as BadArguments: refuse it at start instead
            check_arguments(found, spec.args, spec.kwargs)
        except BadArguments as exc:
            raise ConfigError(f"invalid setting schedules.{index} ({spec.name}): {exc}") from None
        specs[spec.name] = spec
    return specs


def _spec_of(entry: ScheduleSettings, definition: TaskDefinition) -> ScheduleSpec:
    return ScheduleSpec(
        name=entry.name or entry.task,
        task=entry.task,
        queue=entry.queue or definition.queue,
        cron=entry.cron,
        every_ms=None if entry.every is None else max(1, round(entry.every * 1000)),
        tz=entry.tz,
        args=list(entry.args),
        kwargs=dict(entry.kwargs),
        overlap=entry.overlap,
        catch_up=entry.catch_up,
        time_limit=definition.time_limit,
        retries=definition.retries,
    )


def upsert(
    broker: RedisBroker, spec: ScheduleSpec, *, paused: str = "", keep_spec: bool = False
) -> tuple[str, str | None]:
    """Store `spec` (or, with keep_spec, only change `paused`) and make sure its next
    occurrence exists: the first slot after Redis's now."""
    slot = spec.after(broker.server_time_ms())
    text = "" if keep_spec else spec.to_json()
    for _ in range(TAKEN_RETRIES):
        task_id = occurrence_id(spec.name, slot)
        payload = occurrence_payload(broker, spec, task_id)
        status, pending = broker.schedule_upsert(spec.queue, spec.name, text, task_id, slot, payload, paused=paused)
        if status != "taken":
            return status, pending
        slot = spec.after(slot)
    raise BrokerError(f"schedule {spec.name}: the next {TAKEN_RETRIES} slots all ran already")


class Schedules:
    """A worker's side of periodic tasks (see the module docstring for its two hooks)."""

    def __init__(self, app: Client, settings: Settings, metrics: WorkerMetrics | None = None) -> None:
        self.broker = app.broker
        self.specs = declared_specs(app.tasks, settings)
        self.metrics = metrics
        self._early: EarlyBegin | None = None  # see begin_with_claim
        self.consumed = set(settings.worker.queues)
        self.first_queue = settings.worker.queues[0]  # where schedules went before 2026-12-03
        self._told_waiting: set[str] = set()  # occurrences whose wait was logged (once each)
        self._slots: dict[str, tuple[int, int]] = {}  # schedule name -> (since, first slot after it)
        if metrics is not None:
            metrics.watch_schedules(lambda queue: schedule_rows(self.broker, queue), settings.worker.queues)
            for name in self.specs:  # at 0 from the start, so increase() works from the first scrape
                metrics.schedule_missed.labels(name)

    def upsert(self) -> None:
        """Declare this worker's schedules in Redis (at start and after Redis comes back)."""
        for spec in self.specs.values():
            self._move_old_copy(spec)
            status, pending = upsert(self.broker, spec)
            elsewhere = "" if spec.queue in self.consumed else " (not a queue of this worker: a worker of it runs it)"
            log.info("schedule %s (%s, %s) on queue %s%s: %s %s", spec.name, spec.describe(), spec.tz, spec.queue,
                     elsewhere, status, pending or "")  # fmt: skip

    def _move_old_copy(self, spec: ScheduleSpec) -> None:
        """Before 2026-12-03 a schedule of a task with no queue of its own was declared on the
        first of the worker's queues; now it is on the task's queue. A copy of the same task
        left there would run every slot a second time: remove it (a schedule of another task
        under that name is not this one's, and is left alone)."""
        if spec.queue == self.first_queue:
            return
        stored = self.broker.schedule_spec(self.first_queue, spec.name)
        if stored is None:
            return
        try:
            old = ScheduleSpec.from_json(stored)
        except (ValueError, TypeError):
            return
        if old.task == spec.task:
            self.broker.schedule_remove(self.first_queue, spec.name)
            log.warning(
                "schedule %s moved from queue %s to %s, its task's queue (an older version declared it on "
                "the first of worker.queues): the old copy is removed", spec.name, self.first_queue, spec.queue,
            )  # fmt: skip

    def begin(self, claim: Claim) -> bool:
        """True if the claimed task is to run now: any task but a schedule's occurrence, or an
        occurrence schedule_begin.lua started. False: it was given back or dropped (not run)."""
        if not claim.id.startswith("sched:"):
            return True
        parsed = parse_occurrence(claim.id)
        if parsed is None:
            by_hand = parse_manual_run(claim.id)
            if by_hand is not None:  # recorded as the schedule's last run; it runs whatever the reply
                self.broker.schedule_begin(claim.queue, [claim.id, claim.token, by_hand, "", "", *MANUAL_PLAN])
            return True
        name, slot = parsed
        early, self._early = self._early, None
        if early is not None and early.task_id == claim.id and early.token == claim.token and early.reply:
            status, _ = self._outcome(claim.id, name, slot, early.plan, early.args, early.reply)
            if status not in ("changed", "taken", "late"):  # else nothing was written: begin here
                return status == "run"
        own = self.specs.get(name)
        text = own.to_json() if own is not None and own.queue == claim.queue else None
        floor = 0  # the next slot must be later than this (see 'taken')
        for _ in range(TAKEN_RETRIES):
            if text is None:
                stored = self.broker.schedule_spec(claim.queue, name)
                text = "" if stored is None else _text(stored)
            made = self._args(claim.id, claim.token, name, slot, text, claim.now_ms, floor)
            if made is None:
                return True
            args, plan = made
            reply = self.broker.schedule_begin(claim.queue, args)
            status, detail = self._outcome(claim.id, name, slot, plan, args, reply)
            if status == "changed":  # the spec was replaced meanwhile: plan again with the stored one
                text = _text(detail)
            elif status == "taken":  # the next slot already ran: plan the one after it
                floor = int(detail)
            else:
                return status == "run"
        log.warning("occurrence %s: its schedule kept changing, or its next slots all ran; not run now", claim.id)
        return False

    def begin_with_claim(self, queue: str, due_ms: int, token: str) -> list[Any] | None:
        """schedule_begin.lua's ARGV for the occurrence due at `due_ms`, if a schedule of this
        worker has a slot then. The claim sent at that moment most likely leases it first
        (token `token`/1), so this begin goes in the same round trip and starts it there: a
        periodic run then waits no longer than any scheduled task. Planned as on time: the
        script writes nothing if the claim is a slot late ('changed'), nor if the occurrence
        was not leased under that token ('late'); begin() then starts it as usual."""
        self._early = None
        for spec in self.specs.values():
            if spec.queue == queue and self._slot_after(spec, due_ms - 1) == due_ms:
                task_id, lease = occurrence_id(spec.name, due_ms), f"{token}/1"
                made = self._args(task_id, lease, spec.name, due_ms, spec.to_json(), due_ms, on_time=True)
                if made is None:
                    return None
                self._early = EarlyBegin(task_id, lease, made[1], made[0])
                return made[0]
        return None

    def _slot_after(self, spec: ScheduleSpec, after_ms: int) -> int:
        """spec.after(after_ms), remembered: every claim at a due time asks, a delayed task's
        or a retry's too, and a cron slot costs croniter ~0.4 ms. The first slot after any time
        from a remembered `after_ms` up to its slot is that same slot."""
        since, slot = self._slots.get(spec.name, (0, 0))
        if not since <= after_ms < slot:
            since, slot = after_ms, spec.after(after_ms)
            self._slots[spec.name] = (since, slot)
        return slot

    def begun_with_claim(self, reply: list[Any]) -> None:
        """The reply to begin_with_claim's begin; begin() uses it when that occurrence comes."""
        if self._early is not None:
            self._early.reply = reply

    def _args(
        self,
        task_id: str,
        token: str,
        name: str,
        slot: int,
        text: str,
        now_ms: int,
        floor: int = 0,
        on_time: bool = False,
    ) -> tuple[list[Any], Plan | None] | None:
        """schedule_begin.lua's ARGV and the plan in it; None if the stored spec is unreadable
        (the occurrence then runs as stored). `on_time`: valid only before the next slot."""
        try:
            spec = ScheduleSpec.from_json(text) if text else None
        except (ValueError, TypeError) as exc:
            log.error("schedule %s: unreadable spec in Redis (%s); the occurrence runs as stored", name, exc)
            return None
        plan = None
        plan_args: list[Any] = [1, "", 0, b"", 0, 1]
        if spec is not None:
            plan = spec.plan(slot, now_ms)
            next_slot = plan.next_slot
            while next_slot <= floor:
                next_slot = spec.after(next_slot)
            next_id = occurrence_id(name, next_slot)
            payload = occurrence_payload(self.broker, spec, next_id)
            plan_args = [1 if plan.run else 0, next_id, next_slot, payload, plan.missed, 1 if spec.overlap else 0]
        args = [task_id, token, name, slot, text, *plan_args, OVERLAP_RECHECK_MS]
        if on_time and plan is not None:
            args.append(plan.next_slot)
        return args, plan

    def _outcome(
        self, task_id: str, name: str, slot: int, plan: Plan | None, args: list[Any], reply: list[Any]
    ) -> tuple[str, Any]:
        """Count and log what schedule_begin.lua did; returns (status, detail)."""
        status, detail = reply[0], reply[1]
        if status == "taken":
            return status, args[7]
        advanced = status == "skipped" or (status == "run" and len(reply) > 2 and int(reply[2]) == 1)
        if plan is not None and advanced and plan.missed and self.metrics is not None:
            self.metrics.schedule_missed.labels(name).inc(plan.missed)
        if status == "run":
            if self.metrics is not None:
                self.metrics.schedule_lag.labels(name).observe(max(0, int(detail) - slot) / 1000)
        elif status == "wait":
            if task_id not in self._told_waiting:  # it looks again every second: say it once
                if len(self._told_waiting) > 1000:  # (bounded: one id per waiting occurrence)
                    self._told_waiting.clear()
                self._told_waiting.add(task_id)
                log.info("occurrence %s waits for the schedule's earlier run to end", task_id)
        elif status != "changed":
            log.info("occurrence %s not run: %s", task_id, status)
        return status, detail


@dataclasses.dataclass
class EarlyBegin:
    """A begin sent with a claim (Schedules.begin_with_claim), and Redis's reply to it."""

    task_id: str
    token: str
    plan: Plan | None
    args: list[Any]
    reply: list[Any] | None = None


def schedule_rows(broker: RedisBroker, queue: str) -> list[dict[str, Any]]:
    """Each schedule of a queue as the CLI and the metrics show it (times in ms, Redis clock)."""
    now, specs, state = broker.schedule_table(queue)
    rows = []
    for name, text in sorted(specs.items()):
        try:
            spec = ScheduleSpec.from_json(text)
        except (ValueError, TypeError, MiniceleryError):
            continue
        field = {f: state.get(f"{name}:{f}") for f in ("d", "c", "s", "S", "p", "m", "r", "o")}
        rows.append(
            {
                "name": name,
                "queue": queue,
                "task": spec.task,
                "spec": spec.describe(),
                "tz": spec.tz,
                "interval_ms": spec.interval_ms(now),
                "next_due_ms": _int(field["d"]),
                "last_start_ms": _int(field["s"]),
                "last_slot_ms": _int(field["S"]),
                "last_outcome": _text(field["o"]) if field["o"] else None,
                "last_by_hand": field["c"] is not None and parse_manual_run(_text(field["c"])) is not None,
                "paused": field["p"] is not None,
                "missed": _int(field["m"]) or 0,
                "runs": _int(field["r"]) or 0,
                "overlap": spec.overlap,
                "catch_up": spec.catch_up,
            }
        )
    return rows


def _int(value: bytes | None) -> int | None:
    return None if value is None else int(value)
