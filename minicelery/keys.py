"""Every Redis key minicelery uses, built in one place.

A queue's keys share the prefix `minicelery:{queue}:`; the braces make Redis Cluster hash
them to one slot, so every script sees all its keys on one node. Scripts receive these keys
in `KEYS`, in the order of `QueueKeys.as_list()`, and never build key names themselves. One
name is read from data instead: a hand-off (scripts/_common.lua) writes to the inbox an idle
worker registered, which is in the queue's slot too.

That undeclared key is safe on a Redis Cluster, checked on a real one (Redis 7.0,
tests/test_cluster.py: tasks handed to idle workers on queues of three primaries): a script
may touch an undeclared key of the slot its declared keys hash to, on the node serving it,
and the inbox always is one (idle_registration builds it from the queue's QueueKeys: a
registration naming another slot could only come from a hand-edited idle set). During a
migration of the slot the script's declared keys already make it wait (TRYAGAIN) until the
slot is handed over, so the inbox is never written on a node that has given the slot away.
Redis 7.0 does not refuse undeclared keys in scripts; a server that did would fail these
tests loudly, and the inbox would then go in KEYS.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

ROOT = "minicelery"
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def check_queue_name(name: str) -> str:
    if not _QUEUE_NAME.match(name):
        raise ValueError(f"queue name {name!r} is invalid: use 1-100 letters, digits, '_', '.' or '-'")
    return name


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one queue. See scripts/_common.lua for what each one holds."""

    queue: str

    def __post_init__(self) -> None:
        check_queue_name(self.queue)

    @property
    def prefix(self) -> str:
        return f"{ROOT}:{{{self.queue}}}:"

    @property
    def ready(self) -> str:
        return self.prefix + "ready"

    @property
    def scheduled(self) -> str:
        return self.prefix + "scheduled"

    @property
    def running(self) -> str:
        return self.prefix + "running"

    @property
    def marker(self) -> str:
        return self.prefix + "marker"

    @property
    def payload(self) -> str:
        return self.prefix + "payload"

    @property
    def result(self) -> str:
        return self.prefix + "result"

    @property
    def info(self) -> str:
        return self.prefix + "info"

    @property
    def inputs(self) -> str:
        return self.prefix + "inputs"

    @property
    def expiry(self) -> str:
        return self.prefix + "expiry"

    @property
    def dead(self) -> str:
        return self.prefix + "dead"

    @property
    def workers(self) -> str:
        return self.prefix + "workers"

    @property
    def dedup(self) -> str:
        return self.prefix + "dedup"

    @property
    def idle(self) -> str:
        return self.prefix + "idle"

    @property
    def waiting(self) -> str:
        return self.prefix + "waiting"

    @property
    def schedules(self) -> str:
        """hash: schedule name -> its spec (JSON); see scripts/schedule_upsert.lua"""
        return self.prefix + "schedules"

    @property
    def schedule_state(self) -> str:
        """hash: "<schedule name>:<f>" -> what the schedule scripts keep of its runs"""
        return self.prefix + "schedule_state"

    def schedule_keys(self) -> list[str]:
        """KEYS[15], KEYS[16] of the schedule scripts, after the queue key set."""
        return [self.schedules, self.schedule_state]

    def inbox(self, worker_id: str) -> str:
        """Where tasks handed to an idle worker of this queue wait for it (see hand_off in
        scripts/_common.lua); the worker blocks on it."""
        return f"{self.prefix}inbox:{worker_id}"

    def wake(self, worker_id: str) -> str:
        """A worker's wake-up key in this queue's slot: on a Redis Cluster, where one blocking
        call names keys of one slot only, the worker blocks on it per queue (cluster_wait.py)
        and a stop pushes it on each of its queues."""
        return f"{self.prefix}wake:{worker_id}"

    def done(self, task_id: str) -> str:
        """The list a finished task pushes to when someone watches it (scripts/watch.lua), so
        `.result()` waiters block on Redis."""
        return f"{self.prefix}done:{task_id}"

    def as_list(self) -> list[str]:
        """KEYS[1..14] of every script, in the order scripts/_common.lua names them."""
        return list(self._listed)

    @functools.cached_property
    def _listed(self) -> tuple[str, ...]:
        return (
            self.ready,
            self.scheduled,
            self.running,
            self.marker,
            self.payload,
            self.result,
            self.info,
            self.inputs,
            self.expiry,
            self.dead,
            self.workers,
            self.dedup,
            self.idle,
            self.waiting,
        )

    def all_keys_pattern(self) -> str:
        """A SCAN pattern that matches every key of this queue (for purge and tests)."""
        return f"{ROOT}:{{{self.queue}}}:*"


@functools.lru_cache(maxsize=1024)
def queue_keys(queue: str) -> QueueKeys:
    """A queue's keys, built (and the name checked) once: every script call needs them."""
    return QueueKeys(queue)


def worker_wake_key(worker_id: str) -> str:
    """A worker's own wake-up key on a single Redis: pushed to stop its idle wait at once (on
    SIGTERM). It has no hash tag (it spans queues); on a cluster, QueueKeys.wake is used."""
    return f"{ROOT}:worker:{worker_id}:wake"
