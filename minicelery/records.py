"""The records that cross module boundaries: what the broker hands the worker and back.

The broker turns script replies into these (and script statuses into one enum, mapped in one
place: `script_status`); the worker, the runner and the heartbeat pass them between them. The
records built per task in the hot loop (Claim, Outcome, FinishItem) are slots dataclasses, not
frozen ones: frozen costs 2 µs more each.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# The states a task ends in; its result is stored with them.
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})


class ScriptStatus(enum.StrEnum):
    """What a script said about one task (its reply, as the scripts' headers list them)."""

    OK = "ok"  # done as asked
    RETRY = "retry"  # finish.lua: failed with retries left; scheduled to run again
    LATE = "late"  # the lease is no longer the caller's: nothing written
    GONE = "gone"  # the task no longer exists (purged, or Redis lost its data): nothing written
    DEFERRED = "deferred"  # defer.lua: given back, due again later
    EXPIRED = "expired"  # defer.lua: its grace has passed; nothing changed
    CANCELLED = "cancelled"  # cancel.lua: cancelled now; renew/finish: it was cancelled meanwhile
    FINISHED = "finished"  # cancel.lua: finished already, nothing changed
    UNKNOWN = "unknown"  # cancel.lua: no such task
    CHANGED = "changed"  # cancel.lua: a schedule changed since its plan was made; nothing written


def script_status(reply: Any) -> ScriptStatus:
    """The one mapping from a script's status reply (bytes or str) to ScriptStatus."""
    return ScriptStatus(reply.decode() if isinstance(reply, bytes) else str(reply))


@dataclass(frozen=True)
class RetryPlan:
    """How to run a failed task again, if it has retries left (the finish script counts them)."""

    max_retries: int
    base_ms: int  # the delay before retry r (0-based) is min(cap, base * 2**r) * jitter
    cap_ms: int
    jitter: float  # 0.5-1.0; 1.0 for no jitter
    fixed_ms: int = -1  # app.Retry(delay=...): exactly this, no backoff


NO_RETRY = RetryPlan(max_retries=0, base_ms=0, cap_ms=0, jitter=1.0)


@dataclass(slots=True)
class Claim:
    """A task this worker now holds under a lease (never changed once made)."""

    queue: str
    id: str
    token: str
    payload: bytes | None
    attempts: int
    leases_lost: int
    due_ms: int
    now_ms: int
    inputs: dict[str, bytes | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Idle:
    """Nothing to claim; `next_due_in_ms` is when something may be due (None: nothing pending)."""

    next_due_in_ms: int | None
    now_ms: int


@dataclass(frozen=True)
class Wake:
    """Why an idle wait ended: a queue's marker (with its score), this worker's wake key
    (queue None), or a task handed to this worker (`handed`, already leased to it)."""

    queue: str | None
    score_ms: float
    handed: Claim | None = None


class Lease(NamedTuple):
    """One lease the heartbeat renews."""

    queue: str
    task_id: str
    token: str


@dataclass(slots=True)
class Outcome:
    """How one run ended, ready for the finish script."""

    name: str
    succeeded: bool
    envelope: bytes
    duration: float
    error_type: str | None = None
    timed_out: bool = False
    retry: RetryPlan | None = None
    error: Exception | None = None  # what the task failed with, for the log line and the worker's choices
    keep: bool = True  # store the envelope as the result (a failure's always is: its dead letter)


@dataclass(slots=True)
class FinishItem:
    """One task's finish for finish.lua: its lease, and what to record (or retry)."""

    queue: str
    id: str
    token: str
    succeeded: bool
    envelope: bytes  # given to the task's children even when not kept
    retry: RetryPlan | None = None
    keep: bool = True  # False: a success whose result is not stored (store_result=False)

    @classmethod
    def of(cls, claim: Claim, outcome: Outcome) -> FinishItem:
        return cls(claim.queue, claim.id, claim.token, outcome.succeeded, outcome.envelope, outcome.retry, outcome.keep)


@dataclass(slots=True)
class NextClaim:
    """A claim sent in the same round trip as a batch's finishes (claim.lua, with hand-offs)."""

    queue: str
    token: str
    lease_ms: int
    worker_id: str
    batch: int
    held_due_ms: int  # a future due time (Redis clock) the worker waited for, else 0


@dataclass(frozen=True)
class Running:
    """What the main thread is running now, as the heartbeat sees it."""

    queue: str
    task_id: str
    token: str
    started: float  # monotonic
    time_limit: float | None
