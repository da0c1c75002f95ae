"""A schedule's occurrences as tasks: the payload of one (what workers and the CLI send), and
what a cancel of one needs so that its schedule goes on (cancel.lua creates the next).

Cancelling an occurrence skips that one run; pausing (`minicelery schedules pause`) is how to
stop a schedule. The next slot is computed here, on the Redis clock, because Lua has no cron
calendar; cancel.lua uses it only if the occurrence is still its schedule's pending one and
the spec it was planned from is still the stored one, in the same step as the cancel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .schedules import ScheduleSpec, occurrence_id, parse_occurrence
from .transport import TaskMessage

if TYPE_CHECKING:
    from .broker import RedisBroker


def occurrence_payload(broker: RedisBroker, spec: ScheduleSpec, task_id: str) -> bytes:
    message = TaskMessage(
        id=task_id,
        name=spec.task,
        args=list(spec.args),
        kwargs=dict(spec.kwargs),
        time_limit=spec.time_limit,
        retries=spec.retries,
    )
    return broker.transport.dumps_message(message)


def skip_plans(broker: RedisBroker, queue: str, task_ids: Sequence[str]) -> list[Any]:
    """For each id that is a schedule's occurrence, five values for cancel.lua: the id, the
    spec it was planned from, and the next occurrence's id, slot and payload. The next slot
    is the first after the cancelled one's, or after now if that has passed (no burst). No
    Redis call unless an id is an occurrence."""
    occurrences = [(task_id, parsed) for task_id in task_ids if (parsed := parse_occurrence(task_id))]
    if not occurrences:
        return []
    now = broker.server_time_ms()
    plans: list[Any] = []
    for task_id, (name, slot) in occurrences:
        stored = broker.schedule_spec(queue, name)
        if stored is None:
            continue  # removed: nothing comes next
        try:
            spec = ScheduleSpec.from_json(stored)
        except (ValueError, TypeError):
            continue  # unreadable (the worker says so when it meets it): cancel.lua leaves no next one
        next_slot = spec.after(max(slot, now))
        next_id = occurrence_id(name, next_slot)
        plans += [task_id, stored, next_id, next_slot, occurrence_payload(broker, spec, next_id)]
    return plans
