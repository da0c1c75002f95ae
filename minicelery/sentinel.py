"""Redis Sentinel: finding the primary, and noticing at once when it moves.

redis-py's `Sentinel` discovers the primary: a connection of a `master_for` pool asks the
sentinels where the primary is each time it connects, and a READONLY reply (the old primary,
now a replica) drops the connection, so the next attempt re-resolves. What redis-py does not
do (redis-py #3867) is listen for `+switch-master`: a connection blocked on a primary that
froze (kill -STOP, a long DEBUG SLEEP, a dead link) waits out its whole socket timeout,
and an idle worker's blocking wait is the longest of those. `SwitchWatch` subscribes to
`+switch-master` on each sentinel and shuts the sockets of the broker's pools when its primary
moves: every blocked or in-flight call fails at once with a connection error, is retried,
and so reconnects to the new primary. A failover is then noticed within down-after-milliseconds
plus the election (about a second past it), not after a socket timeout.

It listens earlier than that, too: the sentinel leading a failover announces the replica it
chose (+selected-slave), ~0.1 s before it tells it to become primary, and from then on
connections go to that replica once it says it is primary (Sentinel.discover_master), waiting
for that up to PROMOTION_WAIT. The sentinels name the new primary only once they have seen the
promotion, up to a second later, and the old primary, which nothing pauses, takes writes
meanwhile that are then lost: ~40 tasks per planned failover at 40 tasks/s here, when clients
followed only the sentinels' answer; 0-9 of ~10,000 enqueues at full speed when they followed
from the promotion on; 0 in 10 of 10 runs from +selected-slave on (bench/failover_window.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.exceptions as redis_errors
from redis import connection as redis_connection
from redis import sentinel as redis_sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

SWITCH_CHANNEL = "+switch-master"
PROMOTED_CHANNEL = "+promoted-slave"
PROMOTING_CHANNEL = "+failover-state-wait-promotion"  # REPLICAOF NO ONE sent to the replica chosen
# The leader chose the replica to promote: it sends REPLICAOF NO ONE at its next tick (~0.1 s).
SELECTED_CHANNEL = "+selected-slave"
# The announcements after which connections wait for the chosen replica to say it is primary.
# From +selected-slave on, nothing more is written to the old primary once it may have been
# left behind; +failover-state-wait-promotion alone came as the replica was promoted, and
# writes the old primary took before the clients heard were lost.
PROMOTING_CHANNELS = (SELECTED_CHANNEL, PROMOTING_CHANNEL)
# After PROMOTING_CHANNEL, connections go to the chosen replica once it says it is primary: up
# to this long per connection attempt, and for this long in all (then the sentinels decide).
PROMOTION_WAIT = 2.0
PROMOTION_WINDOW = 10.0
# (redis-py leaves these untyped)
parse_url: Any = redis_connection.parse_url


class Sentinel(redis_sentinel.Sentinel):
    """redis-py's Sentinel, asking GET-MASTER-ADDR-BY-NAME, as the Sentinel client guidelines
    say: during a failover a sentinel's SENTINEL MASTERS keeps naming the old primary until
    every replica is reconfigured (seconds: measured here), while this names the promoted one
    as soon as it is primary; the old one keeps taking writes meanwhile, which are lost."""

    promoting: tuple[str, int] | None = None  # the replica a failover is promoting, if any
    promoting_until = 0.0
    data_options: dict[str, Any] = {}  # noqa: RUF012  # (set per instance by Topology.client)

    def discover_master(self, service_name: str) -> tuple[str, int]:
        """The replica being promoted, once it says it is primary; else the primary most of
        the sentinels that answer name (the first one's answer on a tie).

        Not the first answer alone: a sentinel can lag behind a failover, and even announce
        an earlier one late (+switch-master to a primary that has since failed): a frozen old
        primary (kill -STOP) that wakes still says it is primary until the sentinels demote
        it, and clients sent there by such a sentinel wrote to it for ~10 s (measured: ~460
        tasks lost, or run twice, in 3 of ~12 runs of the failover suite)."""
        candidate = self.promoting
        if candidate is not None and time.monotonic() < self.promoting_until:
            if self._says_primary(candidate, min(PROMOTION_WAIT, self.promoting_until - time.monotonic())):
                return candidate
            self.promoting = None  # not primary in time: the sentinels decide
        votes: dict[tuple[str, int], int] = {}
        errors = []
        for sentinel in list(self.sentinels):  # (a watch thread may reorder them meanwhile)
            try:
                address: Any = sentinel.sentinel_get_master_addr_by_name(service_name)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                errors.append(f"{sentinel}: {exc!r}")
                continue
            if address:
                named = (_text(address[0]), int(address[1]))
                votes[named] = votes.get(named, 0) + 1
        if not votes:
            raise redis_sentinel.MasterNotFoundError(f"no sentinel knows a primary {service_name!r} {errors}")
        return max(votes, key=lambda named: votes[named])  # (dicts keep order: the first answer wins a tie)

    def _says_primary(self, address: tuple[str, int], wait: float) -> bool:
        """Whether the server answers ROLE with master, asking until `wait` s have passed
        (REPLICAOF NO ONE takes a moment). A connection error is asked again: the promotion
        itself ends with CLIENT KILL TYPE normal on that server, and a question cut by it
        taken as "no" sent connections to the old primary (measured: ~1,500 enqueues lost in
        1 of 6 planned failovers)."""
        options = {**self.data_options, "socket_timeout": 0.5, "socket_connect_timeout": 0.5}
        client: Any = redis.Redis(*address, **options, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + wait
        try:
            while True:
                with contextlib.suppress(redis_errors.ConnectionError, redis_errors.TimeoutError):
                    if _text(client.execute_command("ROLE")[0]) == "master":
                        return True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
        except redis_errors.RedisError:
            return False  # (an error reply: not a server that can be primary)
        finally:
            client.close()


def parse_address(address: str) -> tuple[str, int]:
    """Parse "host:port" (or "[v6]:port"); ValueError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port (e.g. 10.0.0.5:26379)")
    return host, int(port)


def data_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options for the primary found by the sentinels: the url's database,
    credentials and scheme (rediss:// is TLS) with `options` over them; its host and port are
    not used (the sentinels say where the primary is)."""
    if url.startswith("unix://"):
        raise ValueError("a unix:// url cannot be used with sentinels: use redis:// or rediss://")
    parsed = parse_url(url)
    kept = {key: value for key, value in parsed.items() if key in ("db", "username", "password")}
    if url.startswith("rediss://"):
        kept["ssl"] = True
    return {**kept, **options}


class Topology:
    """The sentinels of one primary (`master`), and the clients that follow it."""

    def __init__(self, sentinels: Sequence[str], master: str, sentinel_options: dict[str, Any]) -> None:
        self.addresses = [parse_address(a) for a in sentinels]
        self.master = master
        self.sentinel_options = dict(sentinel_options)
        # (redis-py leaves Sentinel untyped)
        self.sentinel: Any = Sentinel(self.addresses, sentinel_kwargs=self.sentinel_options)  # type: ignore[no-untyped-call]
        self.announced: str | None = None  # the primary the sentinels last announced
        self._lock = threading.Lock()

    def describe(self) -> str:
        listed = ",".join(f"{host}:{port}" for host, port in self.addresses)
        return f"sentinel master {self.master!r} via {listed}"

    def client(self, options: dict[str, Any]) -> redis.Redis:
        """A client whose connections always go to the current primary."""
        self.sentinel.data_options = {k: v for k, v in options.items() if not k.startswith("socket_")}
        client: redis.Redis = self.sentinel.master_for(self.master, **options)
        return client

    def moved(self, sentinel: str, primary: str, promoting: bool = False) -> bool:
        """A sentinel announced `primary`: ask that sentinel first from now on (during a
        failover only the leading sentinel names the promoted replica). `promoting`: it is
        only being promoted (see Sentinel._promoted). True if this is news (each sentinel
        announces the same move)."""
        if promoting:
            host, _, port = primary.rpartition(":")
            self.sentinel.promoting = (host, int(port))
            self.sentinel.promoting_until = time.monotonic() + PROMOTION_WINDOW
        with self._lock:
            clients = self.sentinel.sentinels
            for number, client in enumerate(clients):
                kwargs = client.connection_pool.connection_kwargs
                if f"{kwargs.get('host')}:{kwargs.get('port')}" == sentinel:
                    # A new list, bound at once: a discovery reading the old one in another
                    # thread never sees a sentinel missing or twice.
                    self.sentinel.sentinels = [client, *clients[:number], *clients[number + 1 :]]
                    break
            news, self.announced = primary != self.announced, primary
        return news

    def members(self) -> dict[str, Any]:
        """The primary and replicas the sentinels report now (for check-config and inspect)."""
        primary = self.sentinel.discover_master(self.master)
        replicas = self.sentinel.discover_slaves(self.master)
        return {
            "master": self.master,
            "primary": f"{primary[0]}:{primary[1]}",
            "replicas": [f"{host}:{port}" for host, port in replicas],
        }


def shut_sockets(client: redis.Redis, keep: str | None = None) -> None:
    """Make every call on this client's connections fail now with a connection error, from
    another thread: shutdown() wakes a recv() blocked on the socket, and the thread that owns
    the connection then disconnects it and retries, re-resolving the primary. (The sockets are
    not closed here: closing under another thread's read races with its parser.) Connections
    to `keep` ("host:port") are left alone."""
    pool: Any = client.connection_pool
    with pool._lock:  # redis-py keeps its connections in these two private sets
        connections = [*pool._available_connections, *pool._in_use_connections]
    for connection in connections:
        sock = connection._sock
        if sock is not None and f"{connection.host}:{connection.port}" != keep:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class SwitchWatch(threading.Thread):
    """Subscribed to one sentinel: calls `on_move(this sentinel, new primary "host:port",
    promoting)` when it announces that `master` moves. The broker runs one per sentinel: the
    sentinel leading a failover announces the replica it is promoting (promoting: True), then
    that it is primary (+promoted-slave), about a second before each sentinel announces
    +switch-master (the failover is over)."""

    def __init__(self, topology: Topology, address: tuple[str, int], on_move: Callable[[str, str, bool], None]) -> None:
        super().__init__(name=f"minicelery-sentinel-{address[0]}:{address[1]}", daemon=True)
        self.topology = topology
        self.address = address
        self.on_move = on_move
        self.pid = os.getpid()  # a forked child starts its own
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._listen()
            except (redis_errors.RedisError, OSError) as exc:
                log.debug("sentinel %s:%d: %s; subscribing again", *self.address, exc)
                self._stopped.wait(0.5)

    def _listen(self) -> None:
        options = {**self.topology.sentinel_options, "socket_timeout": 1.0}
        client: Any = redis.Redis(*self.address, **options)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        sentinel = f"{self.address[0]}:{self.address[1]}"
        try:
            pubsub.subscribe(SWITCH_CHANNEL, PROMOTED_CHANNEL, *PROMOTING_CHANNELS)
            while not self._stopped.is_set():
                try:
                    message = pubsub.get_message(timeout=1.0)
                except redis_errors.TimeoutError:
                    continue  # quiet: the socket timeout only bounds a read, and stop() is checked
                if message is None:
                    continue
                channel = _text(message["channel"])
                new = moved_to(self.topology.master, channel, _text(message["data"]))
                if new:
                    self.on_move(sentinel, new, channel in PROMOTING_CHANNELS)
        finally:
            pubsub.close()
            client.close()


def moved_to(master: str, channel: str, data: str) -> str | None:
    """The new primary "host:port" a sentinel event announces for `master`, else None."""
    fields = data.split()
    if channel == SWITCH_CHANNEL and len(fields) == 5 and fields[0] == master:
        return f"{fields[3]}:{fields[4]}"  # <master> <old ip> <old port> <new ip> <new port>
    if channel in (PROMOTED_CHANNEL, *PROMOTING_CHANNELS) and len(fields) == 8 and fields[5] == master:
        return f"{fields[2]}:{fields[3]}"  # slave <ip:port> <ip> <port> @ <master> <ip> <port>
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
