"""What the operator commands do: enqueue, inspect, result, purge (cli.py parses, this acts)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import sys
import uuid
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

from .app import DEFAULT_QUEUE, Client
from .broker import RedisBroker
from .errors import BadArguments, ResultNotKept, TaskNotFound
from .loader import load_task_modules
from .periodic import schedule_rows, upsert
from .records import FINISHED_STATES, ScriptStatus
from .runner import check_arguments
from .schedules import ScheduleSpec, manual_run_id
from .settings import Settings
from .task import Task
from .transport import TaskMessage

EXIT_FAILED = 1  # the task failed, or there is no such task
EXIT_USAGE = 2  # refused before sending: what was asked cannot run (as argparse's usage errors)
EXIT_NOT_FINISHED = 75  # EX_TEMPFAIL: the task has not finished yet; ask again later


class Admin:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = RedisBroker.from_settings(settings)
        self.app = Client(self.broker, default_queue=settings.worker.queues[0])
        Client.instances.remove(self.app)

    def enqueue(
        self,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        queue: str | None,
        delay: float | None,
        at: dt.datetime | None,
        key: str | None,
        wait: bool,
        timeout: float | None,
        force: bool = False,
    ) -> int:
        refused = "" if force else self._refusal(name, args, kwargs)
        if refused:
            print(f"minicelery: {refused}", file=sys.stderr)
            return EXIT_USAGE
        why_guessed = self._use_definition(name)
        handle = self.app.send_task(name, args, kwargs, queue=queue, delay=delay, at=at, key=key)
        print(handle.id)
        if why_guessed and queue is None:  # say where it went, and how to choose
            print(
                f"minicelery: sent to queue {handle.queue!r}, the first of worker.queues ({why_guessed}); "
                "-q QUEUE chooses the queue",
                file=sys.stderr,
            )
        if not wait:
            return 0
        return self._print_result(handle.result, timeout)

    def _refusal(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
        """Why not to send: with the task modules configured, a name they do not register (a
        typo would sit in the queue until unknown_task_grace, then be dead-lettered) or arguments
        that do not fit the function (dead-lettered at once as BadArguments). "" to send."""
        if not self.settings.tasks:
            return ""  # nothing to check against
        tasks = load_task_modules(self.settings.tasks)
        definition = tasks.get(name)
        if definition is None:
            close = difflib.get_close_matches(name, list(tasks), n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            return (
                f"task {name!r} is not registered by the task modules {self.settings.tasks}{guess}; "
                "--force sends it anyway (for workers that run newer code)"
            )
        try:
            check_arguments(definition, args, kwargs)
        except BadArguments as exc:
            return f"{exc}; --force sends it anyway"
        return ""

    def _use_definition(self, name: str) -> str:
        """With the task modules configured, send `name` with its definition's retries= and
        time_limit=, and its queue if it has one of its own, as calling it in code would.
        Returns why the queue is the first of worker.queues instead, or "" if it is not."""
        if not self.settings.tasks:
            return "no task modules are configured to tell the task's own queue"
        definition = load_task_modules(self.settings.tasks).get(name)
        if definition is None:
            return f"task {name!r} is not registered by the task modules {self.settings.tasks}"
        # A task on the built-in queue named none of its own (neither queue= nor its Client's
        # default_queue): keep sending it where workers are configured to look.
        own = definition.queue != DEFAULT_QUEUE
        queue = definition.queue if own else self.app.default_queue
        # Rebound to this client, so it is sent through the broker these settings configure.
        self.app.tasks[name] = dataclasses.replace(definition, app=self.app, queue=queue)
        return "" if own else f"task {name!r} names no queue of its own"

    def find(self, task_id: str, queue: str | None) -> tuple[Task, str]:
        """A handle to the task and its state: on `queue` if given, else on the first of the
        configured queues that has it (an id is unique; users should not need to know its queue)."""
        queues = [queue] if queue else self.settings.worker.queues
        for name in queues:
            handle = self.app.handle(task_id, queue=name)
            state = handle.state
            if state != "unknown":
                return handle, state
        where = ", ".join(repr(name) for name in queues)
        hint = "" if queue else " (a task of another queue: add -q QUEUE)"
        raise TaskNotFound(f"task {task_id} is not stored on queue {where}{hint}")

    def result(self, task_id: str, queue: str | None, timeout: float) -> int:
        handle, state = self.find(task_id, queue)
        if state not in FINISHED_STATES and timeout <= 0:
            print(f"minicelery: task {task_id} is {state}, not finished (--timeout S waits for it)", file=sys.stderr)
            return EXIT_NOT_FINISHED
        return self._print_result(handle.result, timeout)

    @staticmethod
    def _print_result(get: Any, timeout: float | None) -> int:
        try:
            value = get(timeout=timeout)
        except TimeoutError as exc:
            print(f"minicelery: {exc}", file=sys.stderr)
            return EXIT_NOT_FINISHED
        except ResultNotKept as exc:  # it succeeded: nothing to print, and not a failure
            print(f"minicelery: {exc}", file=sys.stderr)
            return 0
        except Exception as exc:
            print(f"task failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            remote = getattr(exc, "remote_traceback", None) or getattr(exc, "traceback", None)
            if remote:
                print(remote, file=sys.stderr, end="")
            return EXIT_FAILED
        print(json.dumps(value))
        return 0

    def inspect(self, queues: Sequence[str], *, as_json: bool) -> int:
        report = {queue: self.broker.queue_report(queue, self.settings.worker.lease_seconds) for queue in queues}
        members = self.broker.members()  # the primary and replicas the sentinels report, or the cluster's nodes
        kind = "cluster" if members is not None and "primaries" in members else "sentinel"
        for queue in queues:
            report[queue]["orphans"] = self._orphans(queue)
            if members is not None:  # per queue, so the top level stays one key per queue
                report[queue][kind] = members
            located = self.broker.node_of(queue)
            if located is not None:
                report[queue]["node"] = {"slot": located[0], "primary": located[1]}
        if as_json:
            print(json.dumps(report, indent=2))
            return 0
        if members is not None:
            print(describe_members(members))
        for queue, info in report.items():
            depths = ", ".join(f"{state} {count}" for state, count in info["depths"].items())
            print(f"queue {queue}: {depths}")
            if "node" in info:
                print(f"  on primary {info['node']['primary']} (slot {info['node']['slot']})")
            due = info["next_due"]
            print(f"  next due: {due if due else 'nothing scheduled'}")
            print(f"  live workers: {len(info['workers'])} {' '.join(info['workers'])}".rstrip())
            for dead in info["dead_letters"]:
                print(f"  dead: {dead['id']} {dead['name']} attempts={dead['attempts']} at {dead['failed_at']}")
                print(f"        {dead['error']}")
                last_line = dead["traceback"].strip().splitlines()[-2:-1]  # the line that raised
                if last_line:
                    print(f"        {last_line[0].strip()}")
            _print_orphans(info["orphans"])
        return 0

    def _orphans(self, queue: str) -> dict[str, Any]:
        """Waiting tasks whose parents were never started, each with when the sweep takes it."""
        orphans = self.broker.orphans(queue)
        orphans["orphan_ttl"] = ttl = self.settings.worker.orphan_ttl
        for orphan in orphans["oldest"]:
            orphan["swept_in_seconds"] = max(0.0, ttl - orphan["waited_seconds"])
        return orphans

    def cancel(self, task_ids: Sequence[str], queue: str | None, *, cascade: bool) -> int:
        """Cancel each task; exit 0 if every one was cancelled or had already finished."""
        unknown = 0
        for task_id in task_ids:
            try:
                handle, state = self.find(task_id, queue)
            except TaskNotFound as exc:
                unknown += 1
                print(f"minicelery: {exc}", file=sys.stderr)
                continue
            statuses = handle.cancel_each(cascade=cascade, by="cli")
            if statuses.pop(task_id, None) is ScriptStatus.CANCELLED:
                print(f"{task_id} cancelled (it was {state})")
            else:
                print(f"{task_id} had already finished ({handle.state}): nothing changed")
            if cascade:
                stopped = [child for child, status in statuses.items() if status is ScriptStatus.CANCELLED]
                print(f"  and {len(stopped)} of its {len(statuses)} descendants: {' '.join(stopped) or 'none'}")
        return EXIT_FAILED if unknown else 0

    def retry_dead(self, queues: Sequence[str], task_ids: Sequence[str]) -> int:
        """Put dead letters back: the given ids, or every dead letter of the queues."""
        missing = set(task_ids)
        for queue in queues:
            wanted = list(task_ids) if task_ids else self.broker.dead_letters(queue)
            revived = self.broker.revive(queue, wanted)
            missing -= set(revived)
            for task_id in revived:
                print(f"{task_id} put back on queue {queue}")
        for task_id in sorted(missing):
            print(f"minicelery: {task_id} is not a dead letter on {', '.join(queues)}", file=sys.stderr)
        return 1 if missing else 0

    def schedule_queues(self, asked: Sequence[str] | None) -> list[str]:
        """The queues asked for; else worker.queues and every other queue that has schedules
        (a schedule declared for a queue this config does not consume would otherwise be out
        of sight, and never run)."""
        if asked:
            return list(asked)
        mine = list(self.settings.worker.queues)
        return mine + [queue for queue in self.broker.schedule_queues() if queue not in mine]

    def schedules(self, queues: Sequence[str], *, as_json: bool) -> int:
        """List every schedule of the queues: spec, zone, next due, last run, paused."""
        rows = [row for queue in queues for row in schedule_rows(self.broker, queue)]
        if as_json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print(f"no schedules on {', '.join(queues)}")
            return 0
        for row in rows:
            paused = "  PAUSED" if row["paused"] else ""
            print(f"{row['name']}: {row['spec']} ({row['tz']}), task {row['task']}, queue {row['queue']}{paused}")
            due = row["next_due_ms"]
            print(f"  next due: {_both_zones(due, row['tz']) if due is not None else 'none pending'}")
            if row["last_start_ms"] is None:
                print("  last run: never")
            else:
                by_hand = " (run by hand)" if row["last_by_hand"] else ""
                print(f"  last run: {_both_zones(row['last_start_ms'], row['tz'])}, {row['last_outcome']}{by_hand}")
            policies = f"catch-up {row['catch_up']}, overlap {'allowed' if row['overlap'] else 'no'}"
            print(f"  runs {row['runs']}, missed slots {row['missed']}, {policies}")
        return 0

    def schedule_action(self, action: str, name: str, queues: Sequence[str]) -> int:
        """pause, resume, run or remove the schedule `name` (found on one of the queues)."""
        for queue in queues:
            stored = self.broker.schedule_spec(queue, name)
            if stored is None:
                continue
            spec = ScheduleSpec.from_json(stored)
            if action == "remove":
                self.broker.schedule_remove(queue, name)
                print(f"schedule {name} removed from queue {queue}")
            elif action == "run":
                task_id = manual_run_id(name, uuid.uuid4().hex)  # the worker records it as the last run
                message = TaskMessage(task_id, spec.task, list(spec.args), dict(spec.kwargs))
                message = dataclasses.replace(message, time_limit=spec.time_limit, retries=spec.retries)
                self.broker.enqueue(queue, message.id, self.broker.transport.dumps_message(message))
                print(message.id)
            else:
                status, pending = upsert(self.broker, spec, paused="1" if action == "pause" else "0", keep_spec=True)
                print(f"schedule {name} on queue {queue}: {status}{f', next {pending}' if pending else ''}")
            return 0
        known = sorted({row["name"] for queue in queues for row in schedule_rows(self.broker, queue)})
        listed = f" (there: {', '.join(known)})" if known else " (none there)"
        print(f"minicelery: no schedule {name!r} on {', '.join(queues)}{listed}", file=sys.stderr)
        return EXIT_FAILED

    def purge(self, queues: Sequence[str], *, assume_yes: bool) -> int:
        if not assume_yes:
            try:
                answer = input(
                    f"Delete every task, result and dead letter of {', '.join(queues)} (schedules are kept)? [y/N] "
                )
            except EOFError:  # stdin empty or closed (a script, < /dev/null): no answer is a no
                print("\nminicelery: no answer on stdin; nothing deleted (--yes skips the question)", file=sys.stderr)
                return EXIT_FAILED
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return EXIT_FAILED
        for queue in queues:
            deleted = self.broker.purge(queue)
            print(f"queue {queue}: {deleted} keys deleted")
            # Schedules stay, paused or not; each gets its next occurrence back (its pending one
            # was a task, and went).
            for name, stored in self.broker.schedule_table(queue)[1].items():
                status, pending = upsert(self.broker, ScheduleSpec.from_json(stored), keep_spec=True)
                print(f"  schedule {name} kept: {status}{f', next {pending}' if pending else ''}")
        return 0


def _print_orphans(orphans: dict[str, Any]) -> None:
    if not orphans["count"]:
        return
    more = "" if orphans["examined"] >= orphans["waiting"] else f" among the oldest {orphans['examined']} waiting"
    print(
        f"  waiting for parents never started: {orphans['count']}{more} "
        f"(dead-lettered after worker.orphan_ttl, {orphans['orphan_ttl']:g} s)"
    )
    for orphan in orphans["oldest"]:
        print(
            f"    {orphan['id']} {orphan['name']} waited {_duration(orphan['waited_seconds'])}, "
            f"{_sweep_due(orphan['swept_in_seconds'])}; never started: {', '.join(orphan['never_started'])}"
        )


def _sweep_due(seconds: float) -> str:
    return f"swept in {_duration(seconds)}" if seconds > 0 else "swept by the next worker sweep"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _both_zones(ms: int, zone: str) -> str:
    """A time in the schedule's zone and in UTC: 2030-01-27 03:00 CET (02:00 UTC); once for a
    zone that is UTC all year (UTC, Etc/GMT, ...; not Europe/London, which is at UTC in winter)."""
    at = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    local = at.astimezone(ZoneInfo(zone))
    if all(
        at.replace(month=month, day=1).astimezone(ZoneInfo(zone)).utcoffset() == dt.timedelta(0) for month in (1, 7)
    ):
        return f"{at:%Y-%m-%d %H:%M:%S} UTC"
    return f"{local:%Y-%m-%d %H:%M:%S %Z} ({at:%Y-%m-%d %H:%M:%S} UTC)"


def describe_members(members: dict[str, Any]) -> str:
    """One line (sentinels) or one per primary (cluster) of what RedisBroker.members() found."""
    if "primaries" not in members:
        replicas = ", ".join(members["replicas"]) or "none"
        return f"sentinel master {members['master']}: primary {members['primary']}, replicas {replicas}"
    lines = [f"cluster: {len(members['primaries'])} primaries, {len(members['replicas'])} replicas"]
    for primary, slots in members["primaries"].items():
        listed = [replica for replica, of in members["replicas"].items() if of == primary]
        lines.append(f"  primary {primary} slots {' '.join(slots)}, replicas {' '.join(listed) or 'none'}")
    return "\n".join(lines)
