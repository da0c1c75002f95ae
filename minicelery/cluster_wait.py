"""An idle worker's wait on a Redis Cluster: one blocking call per queue, all at once.

On one Redis the worker blocks in a single BZPOPMIN over its wake key and every queue's
inbox and marker. On a cluster one blocking call may only name keys of one slot, and each
queue is its own slot: so each queue gets its own BZPOPMIN (the worker's wake key for that
queue, its inbox there, the queue's marker), sent on a connection to the queue's node, and
the worker waits on all those sockets at once (selectors: no thread, no polling). About one
command per queue per idle period, as on one Redis.

When one call returns, the others are made to return too (their wake keys are pushed), and
every reply is read: a task handed to another inbox meanwhile, or another queue's marker, is
put back where it was (the inbox keeps the task leased to this worker; the next claim or
wait takes it), so nothing popped is dropped.

A blocked call whose slot moves gets MOVED from Redis (it redirects blocked clients of a slot
it no longer serves) or, at the latest, times out with its block; a node that fails closes or
times out the socket. Either way the slot map is marked stale and the next wait goes to the
slot's new owner (redis #2379 / valkey #2734: a blocked pop left waiting on the old owner).
"""

from __future__ import annotations

import logging
import selectors
import time
from collections.abc import Sequence
from typing import Any

import redis.exceptions as redis_errors

from .claim_wire import decode_handed, idle_registration
from .cluster import ClusterRoute, slot_of
from .errors import BrokerUnavailable
from .keys import queue_keys
from .records import Wake
from .redis_wire import read_replies, send
from .redis_wire import text as _text

log = logging.getLogger(__name__)

# A call during its slot's migration is answered at once (ASK, TRYAGAIN): wait this long
# before the worker asks again, so an idle worker does not spin through a migration.
MIGRATION_PAUSE = 0.05
_WAKE_TTL = 60


def wake_commands(queues: Sequence[str], worker_id: str) -> tuple[list[tuple[Any, ...]], list[int]]:
    """Push the worker's wake key of each queue (it expires if nobody pops it)."""
    commands: list[tuple[Any, ...]] = []
    slots: list[int] = []
    for queue in queues:
        key = queue_keys(queue).wake(worker_id)
        commands += [("ZADD", key, 0, "w"), ("EXPIRE", key, _WAKE_TTL)]
        slots += [slot_of(key)] * 2
    return commands, slots


class _Call:
    """One queue's blocking call, on a connection of its node."""

    def __init__(self, route: ClusterRoute, queue: str, commands: list[tuple[Any, ...]]) -> None:
        self.queue = queue
        self.commands = commands
        self.node = route.primary_of_queue(queue)
        self.pool = route.client(self.node, blocking=True).connection_pool
        self.connection: Any = self.pool.get_connection()
        self.reply: Any = None
        self.read = False
        self.unblocked = False  # made to return by pushing its wake key (which it then pops)

    def read_leading(self) -> bool:
        """Read the replies before the BZPOPMIN's (the idle registration: at once), so that its
        socket turns readable only for the BZPOPMIN; True if that reply is in already."""
        leading = read_replies(self.connection, len(self.commands) - 1)
        errors = [reply for reply in leading if isinstance(reply, Exception)]
        self.reply = errors[0] if errors else None  # (a MOVED here comes again for the BZPOPMIN)
        return bool(self.connection.can_read(timeout=0))

    def finish(self) -> None:
        """Read the BZPOPMIN's reply (an earlier error reply, if any, wins)."""
        reply = read_replies(self.connection, 1)[0]
        self.reply = self.reply or reply
        self.read = True


def wait_on_cluster(
    route: ClusterRoute,
    queues: Sequence[str],
    worker_id: str,
    timeout: float,
    socket_slack: float,
    handoffs_lease_ms: int | None,
    register: Sequence[str],
) -> Wake | None:
    """RedisBroker.wait_for_work on a cluster (see the module docstring)."""
    calls: list[_Call] = []
    try:
        for queue in queues:
            keys = queue_keys(queue)
            commands: list[tuple[Any, ...]] = []
            if handoffs_lease_ms is not None and queue in register:
                member = idle_registration(queue, worker_id, handoffs_lease_ms)
                commands.append(("ZADD", keys.idle, time.time() * 1000, member))
            inbox = [keys.inbox(worker_id)] if handoffs_lease_ms is not None else []
            commands.append(("BZPOPMIN", keys.wake(worker_id), *inbox, keys.marker, timeout))
            calls.append(_Call(route, queue, commands))
            send(calls[-1].connection, commands)
        answered = [call for call in calls if call.read_leading()]
        if not answered:
            with selectors.DefaultSelector() as selector:
                for call in calls:
                    selector.register(call.connection._sock, selectors.EVENT_READ, call)
                answered = [key.data for key, _ in selector.select(timeout + socket_slack)]
            if not answered:
                raise redis_errors.TimeoutError(f"no reply within {timeout + socket_slack:g} s")
        for call in answered:
            call.finish()
        _end_the_others(route, [call for call in calls if not call.read], worker_id)
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        route.stale = True
        raise BrokerUnavailable(f"Redis unavailable during the idle wait: {exc}") from exc
    finally:
        for call in calls:
            if not call.read:  # its reply may still come: never reuse this socket
                call.connection.disconnect()
            call.pool.release(call.connection)
    return _chosen(route, calls, worker_id, handoffs_lease_ms)


def _end_the_others(route: ClusterRoute, waiting: list[_Call], worker_id: str) -> None:
    """One call answered: make the others return (push their wake keys) and read them. If
    that fails (their node went away), they are left unread and disconnected: what the
    answered calls popped is still acted on."""
    if not waiting:
        return
    commands, slots = wake_commands([call.queue for call in waiting], worker_id)
    try:
        route.exchange(commands, slots, _no_scripts)
        for call in waiting:
            call.unblocked = True
            call.finish()
    except (BrokerUnavailable, redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        route.stale = True
        log.warning("could not end the idle wait on %s: %s", ", ".join(c.queue for c in waiting), exc)


def _no_scripts(_client: Any, _sha: str) -> None:
    raise AssertionError("no script is sent here")


def _chosen(route: ClusterRoute, calls: list[_Call], worker_id: str, lease_ms: int | None) -> Wake | None:
    """The wake to act on, as one BZPOPMIN over all the keys would pick it (a stop, then a
    task handed to this worker, then a marker); whatever else was popped is put back."""
    popped: list[tuple[int, str, Any, float, Wake]] = []  # (rank, key, member, score, wake)
    trouble: Exception | None = None
    for call in calls:
        reply = call.reply
        if isinstance(reply, redis_errors.ResponseError):
            trouble = trouble or reply
        elif reply is not None:
            key, member, score = _text(reply[0]), reply[1], float(reply[2])
            keys = queue_keys(call.queue)
            if key == keys.wake(worker_id):
                if not call.unblocked:  # (else our own push: spent)
                    popped.append((0, key, member, score, Wake(queue=None, score_ms=score)))
            elif key == keys.marker:
                popped.append((2, key, member, score, Wake(queue=call.queue, score_ms=score)))
            else:
                handed = decode_handed(call.queue, member)
                popped.append((1, key, member, score, Wake(queue=call.queue, score_ms=score, handed=handed)))
    popped.sort(key=lambda entry: entry[0])
    # A wake key popped is spent either way (ours, pushed to end a call, or a stop, which the
    # worker's own flag carries); a handed task or a marker goes back where it was.
    commands: list[tuple[Any, ...]] = []
    for rank, key, member, score, _wake in popped[1:]:
        if rank == 1:  # (the inbox went with its last member: it expires as hand_off set it)
            commands += [("ZADD", key, score, member), ("PEXPIRE", key, 2 * (lease_ms or 0) or 60_000)]
        elif rank == 2:
            commands.append(("ZADD", key, "LT", score, member))
    if commands:
        try:
            route.exchange(commands, [slot_of(command[1]) for command in commands], _no_scripts)
        except BrokerUnavailable as exc:  # a handed task's lease brings it back; a marker, the next claim
            route.stale = True
            log.warning("could not put back what the idle wait popped: %s", exc)
    if popped:
        return popped[0][4]
    if trouble is not None:
        route.stale = True  # MOVED (the slot moved while blocked), UNBLOCKED, ASK, TRYAGAIN, CLUSTERDOWN
        if isinstance(trouble, redis_errors.ClusterDownError):
            raise BrokerUnavailable(f"Redis Cluster during the idle wait: {trouble}")
        if not isinstance(trouble, redis_errors.MovedError):
            time.sleep(MIGRATION_PAUSE)
    return None
