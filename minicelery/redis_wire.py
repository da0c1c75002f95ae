"""The wire under the broker: one round trip of raw commands on a pooled connection, the
scripts' source, and redis-py's exceptions translated, once, into minicelery's BrokerError
tree (so a failover's READONLY or UNBLOCKED reads as a lost connection, which is retried)."""

from __future__ import annotations

import contextlib
import socket
import weakref
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import hiredis
import redis
import redis.exceptions as redis_errors

from .errors import BrokerAuthError, BrokerError, BrokerUnavailable, ClusterMismatch

SCRIPT_NAMES = (
    "enqueue",
    "claim",
    "finish",
    "release",
    "defer",
    "renew",
    "rearm",
    "revive",
    "watch",
    "orphans",
    "cancel",
    "schedule_upsert",
    "schedule_begin",
    "schedule_remove",
)


# The slot maps of this process's Redis Cluster routes (cluster.py adds each): a MOVED on a
# plain read marks them stale, so the next call reads the map again.
SLOT_MAPS: weakref.WeakSet[Any] = weakref.WeakSet()


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn redis-py exceptions into minicelery's, naming the operation."""
    try:
        yield
    except (redis_errors.AuthenticationError, redis_errors.NoPermissionError) as exc:
        raise BrokerAuthError(
            f"Redis refused {what}: {exc} (check redis.username, the password and the ACL user's permissions)"
        ) from exc
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError) as exc:
        # A host name that does not resolve is said plainly; it stays "unavailable" (retried),
        # since DNS can come back.
        dns = isinstance(exc.__cause__ or exc.__context__, socket.gaierror)
        reason = f"cannot resolve host: {exc}" if dns else str(exc)
        raise BrokerUnavailable(f"Redis unavailable during {what}: {reason}") from exc
    except redis_errors.AskError as exc:  # (and MOVED) a cluster's slot moved under a plain read
        if not SLOT_MAPS:  # no cluster configured in this process: the settings are wrong
            raise ClusterMismatch(
                f"Redis answered {what} with a redirection ({exc}): the server is a Redis Cluster node; "
                "set redis.cluster = true (RedisBroker(cluster=True))"
            ) from exc
        for slot_map in SLOT_MAPS:
            slot_map.stale = True
        raise BrokerUnavailable(f"Redis Cluster slot moved during {what}: {exc}; retrying finds its new node") from exc
    except redis_errors.ResponseError as exc:
        if primary_moved(exc):  # the primary became a replica (a failover): follow it, as for a lost connection
            raise BrokerUnavailable(f"Redis primary moved during {what}: {exc}") from exc
        raise BrokerError(f"Redis error during {what}: {exc}") from exc
    except redis_errors.RedisError as exc:
        raise BrokerError(f"Redis error during {what}: {exc}") from exc
    except redis_errors.RedisClusterException as exc:  # (not a RedisError) no node answered
        if "cluster mode is not enabled" in str(exc).lower():  # (redis-py's words for a plain Redis)
            raise ClusterMismatch(
                f"Redis answered {what} as a server that is not a Redis Cluster node ({exc}): "
                "set redis.cluster = false, or point redis.url at a node of the cluster"
            ) from exc
        raise BrokerUnavailable(f"Redis Cluster unavailable during {what}: {exc}") from exc


def primary_moved(exc: redis_errors.ResponseError) -> bool:
    """READONLY (a write reached a replica) or UNBLOCKED (a blocking call ended because its
    server turned replica): the primary moved; reconnecting finds the new one."""
    return isinstance(exc, redis_errors.ReadOnlyError) or str(exc).startswith("UNBLOCKED")


def script_source(name: str) -> str:
    """The script with the shared steps it uses prepended: _common.lua for all, and
    _schedules.lua for the schedule scripts and cancel.lua."""
    folder = resources.files("minicelery") / "scripts"
    shared = ["_common", "_schedules"] if name.startswith("schedule_") or name == "cancel" else ["_common"]
    return "\n".join((folder / f"{part}.lua").read_text() for part in [*shared, name])


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def send(connection: Any, commands: Sequence[tuple[Any, ...]]) -> None:
    """Write commands on a connection in one send, each packed by hiredis (in C)."""
    connection.send_packed_command([b"".join([hiredis.pack_command(c) for c in commands])])


def read_replies(connection: Any, count: int) -> list[Any]:
    """`count` replies, an error reply kept as its exception (the socket stays in step)."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(connection.read_response())
        except redis_errors.ResponseError as exc:
            replies.append(exc)
    return replies


def exchange(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send commands on one of the client's pooled connections and read every reply, then
    raise the first error reply, if any (every reply is read first, so the socket stays in
    step). Connection errors are retried as redis-py retries them.

    Not redis-py's Pipeline: its bookkeeping (and packing argument by argument in Python)
    cost a busy worker 19 µs of CPU per task, a quarter of all it spends on a no-op task;
    this is the same wire exchange with hiredis packing each command in C."""
    pool = client.connection_pool
    connection: Any = pool.get_connection()  # (redis-py leaves its connection API untyped)

    def send_and_read() -> list[Any]:
        send(connection, commands)
        replies = read_replies(connection, len(commands))
        for reply in replies:
            if isinstance(reply, redis_errors.ResponseError) and primary_moved(reply):
                # nothing ran on a replica: reconnect (to the new primary) and resend
                raise redis_errors.ConnectionError(f"the primary moved: {reply}")
        return replies

    try:
        replies: list[Any] = connection.retry.call_with_retry(send_and_read, lambda _error: connection.disconnect())
    except BaseException:
        connection.disconnect()  # replies may be left unread: never reuse this socket
        raise
    finally:
        pool.release(connection)
    raise_error_reply(replies)
    return replies


def raise_error_reply(replies: Sequence[Any]) -> None:
    """Raise the first error reply of a round trip read whole, if any."""
    for reply in replies:
        if isinstance(reply, redis_errors.ResponseError):
            raise reply
