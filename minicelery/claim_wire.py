"""What claims and hand-offs look like on the wire: claim.lua's arguments, and the Claims
read back from its reply or from a worker's inbox (see lease_tasks and encode_handed in
scripts/_common.lua)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import BrokerError
from .keys import queue_keys
from .records import Claim, Idle
from .redis_wire import text as _text


def idle_registration(queue: str, worker_id: str, lease_ms: int) -> str:
    """A worker's member in a queue's idle set: the lease a hand-off gives, who it is (the
    hand-off skips a worker its claims have not shown alive lately), and its inbox."""
    return f"{lease_ms}|{worker_id}|{queue_keys(queue).inbox(worker_id)}"


def parse_claim(queue: str, token: str, reply: list[Any]) -> list[Claim] | Idle:
    """claim.lua's reply: "none" with the next due time, or the tasks claimed and handed."""
    if _text(reply[0]) == "none":
        delay = int(reply[1])
        return Idle(next_due_in_ms=None if delay < 0 else delay, now_ms=int(reply[2]))
    claims = []
    for number, task in enumerate(reply[1:], start=1):
        if isinstance(task, bytes):  # handed to this worker while it was idle
            claims.append(decode_handed(queue, task))
        else:
            claims.append(claim_of(queue, f"{token}/{number}", task))  # the token claim_next made
    return claims


def claim_call(
    queue: str,
    token: str,
    lease_ms: int,
    worker_id: str,
    held_due_ms: int,
    batch: int,
    woken: bool,
    handoffs: bool,
) -> tuple[list[str], list[Any]]:
    """claim.lua's keys after the queue's own, and its ARGV (see the script's header)."""
    args: list[Any] = [token, lease_ms, worker_id, held_due_ms, batch, 1 if woken else 0]
    if not handoffs:
        return [], args
    return [queue_keys(queue).inbox(worker_id)], [*args, idle_registration(queue, worker_id, lease_ms)]


def claim_of(queue: str, token: str, task: Sequence[Any]) -> Claim:
    """A Claim from one task of a claim reply (its fields: lease_tasks in scripts/_common.lua)."""
    parents = _text(task[6]).split(",") if task[6] else []
    return Claim(
        queue=queue,
        id=_text(task[0]),
        token=token,
        payload=task[1] or None,
        attempts=int(task[2]),
        leases_lost=int(task[3]),
        due_ms=int(task[4]),
        now_ms=int(task[5]),
        inputs={parent: (task[7 + i] or None) for i, parent in enumerate(parents)},
    )


def decode_handed(queue: str, member: bytes) -> Claim:
    """A task handed to an inbox, as encode_handed (scripts/_common.lua) wrote it."""
    fields: list[bytes | None] = []
    at = 0
    try:
        while at < len(member):
            colon = member.index(b":", at)
            head = member[at:colon]
            if head == b"-":
                fields.append(None)
                at = colon + 1
            else:
                end = colon + 1 + int(head)
                fields.append(member[colon + 1 : end])
                at = end
        token = fields[0]
        if token is None:
            raise ValueError("no lease token")
        return claim_of(queue, _text(token), fields[1:])
    except (ValueError, IndexError) as exc:  # not written by hand_off; its lease, if any, expires
        raise BrokerError(f"unreadable task handed to queue {queue!r} ({exc}): {member[:200]!r}") from exc
