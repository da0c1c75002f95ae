"""Redis Cluster: which node holds a queue, and script calls routed there.

Every key of a queue carries the hash tag `{queue}`, so a queue lives in one slot, on one
primary, and each script sees all its keys there. redis-py's `RedisCluster` discovers the
nodes and keeps the slot map (and serves the CLI's plain reads, following MOVED/ASK itself);
script calls do not go through it: `ClusterRoute.exchange` sends them with the same packed
hiredis round trip as a single Redis, one per node the calls' slots live on, all nodes'
commands written before any reply is read.

Redirections and errors, per command (each call is one script, atomic on its node):
- MOVED: the slot has a new owner (a reshard or a failover). The slot map is refreshed and
  only that call is sent again, to the new owner.
- ASK: a migration is under way and the call's keys are already on the importing node: sent
  there after ASKING, the map unchanged.
- TRYAGAIN (a migration split the call's keys), CLUSTERDOWN, a lost connection: sent again
  after a short backoff with the map refreshed, for up to `RETRY_WINDOW` seconds; then
  BrokerUnavailable (the worker retries that; a producer sees it).
- NOSCRIPT: the script cache is per node; the script is loaded there and the call resent.

A redirected call did not run (Redis answers MOVED/ASK/TRYAGAIN before running a script), so
resending it alone is exact: the calls of the same round trip that did run are not sent
again. What is not kept is the order between a redirected call and later calls of the same
round trip that ran (a finish may land after the next claim of its queue): each script is
idempotent by its task id and lease token and none depends on another's effect in the same
round trip. A connection lost mid-exchange resends every call of that node, as the single-node
exchange does (redis-py's retry): a resent finish is recognised as its own (RedisBroker.landed),
a resent enqueue answers "exists".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.exceptions as redis_errors
from redis import cluster as redis_cluster
from redis import connection as redis_connection
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from .errors import BrokerUnavailable
from .keys import queue_keys
from .redis_wire import SLOT_MAPS, primary_moved, read_replies, send
from .sentinel import parse_address, parse_url

log = logging.getLogger(__name__)

ClusterNode: Any = redis_cluster.ClusterNode  # (redis-py leaves these untyped)
Encoder: Any = redis_connection.Encoder  # type: ignore[attr-defined]

# Redirections and retries for one call give up after this many seconds (a failover takes
# cluster-node-timeout plus an election; the worker's own retry goes on after that).
RETRY_WINDOW = 5.0
# A node set aside is probed with this timeout (s): a dead one must not hold the worker.
PROBE_TIMEOUT = 0.5
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 0.5


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


def queue_slot(queue: str) -> int:
    """The slot of every key of `queue` (they share the hash tag `{queue}`)."""
    return slot_of(queue_keys(queue).ready)


def cluster_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options for every node: the url's credentials and scheme (rediss:// is TLS)
    with `options` over them. A cluster has database 0 only."""
    if url.startswith("unix://"):
        raise ValueError("a unix:// url cannot be used with a cluster: use redis:// or rediss://")
    parsed = parse_url(url)
    if int(parsed.get("db") or 0) != 0:
        raise ValueError(f"Redis Cluster has database 0 only; the url names database {parsed['db']}")
    kept = {key: value for key, value in parsed.items() if key in ("username", "password")}
    if url.startswith("rediss://"):
        kept["ssl"] = True
    return {**kept, **options}


def startup_nodes(url: str, extra: Sequence[str]) -> list[tuple[str, int]]:
    """The url's node, then the `cluster_nodes` ("host:port" each)."""
    parsed = parse_url(url)
    return [(parsed.get("host", "localhost"), int(parsed.get("port", 6379))), *(parse_address(a) for a in extra)]


class ClusterRoute:
    """The nodes of one cluster: the slot map, a client per node, and script calls routed."""

    def __init__(self, url: str, extra_nodes: Sequence[str], options: dict[str, Any]) -> None:
        self.startup = startup_nodes(url, extra_nodes)
        self.options = cluster_options(url, options)
        self.blocking_timeout = float(self.options.get("socket_timeout") or 5.0)
        self._cluster: redis.RedisCluster | None = None
        self._clients: dict[tuple[str, bool], redis.Redis] = {}
        self._lock = threading.Lock()  # (the heartbeat thread routes renewals too)
        self.stale = False  # a node failed or a slot moved: refresh the map before the next call
        SLOT_MAPS.add(self)

    def describe(self) -> str:
        return "cluster via " + ",".join(f"{host}:{port}" for host, port in self.startup)

    @property
    def cluster(self) -> redis.RedisCluster:
        """redis-py's cluster client, made (and the slot map read) at first use."""
        if self._cluster is None:
            with self._lock:
                if self._cluster is None:
                    nodes = [ClusterNode(host, port) for host, port in self.startup]
                    self._cluster = redis.RedisCluster(startup_nodes=nodes, **self.options)
        return self._cluster

    def refresh(self) -> None:
        """Read the slot map again (CLUSTER SLOTS from a node that answers)."""
        cluster = self.cluster
        with self._lock:  # (the heartbeat thread's renewals may find the map stale at once)
            cluster.nodes_manager.initialize()
            self.stale = False  # (only once read: a failed read leaves it stale)

    def primary_of(self, slot: int) -> str:
        """ "host:port" of the primary that owns `slot` now."""
        if self.stale:
            self.refresh()
        node = self.cluster.nodes_manager.get_node_from_slot(slot)
        return str(node.name)

    def primary_of_queue(self, queue: str) -> str:
        """ "host:port" of the primary that holds `queue` now."""
        return self.primary_of(queue_slot(queue))

    def primaries(self) -> list[str]:
        if self.stale:
            self.refresh()
        cluster: Any = self.cluster
        return sorted(str(node.name) for node in cluster.get_primaries())

    def members(self) -> dict[str, Any]:
        """The primaries (with their slot ranges) and replicas (with their primary) one node
        reports now, by CLUSTER NODES (check-config, inspect)."""
        self.refresh()
        cluster: Any = self.cluster
        listing: dict[str, dict[str, Any]] = cluster.cluster_nodes()
        names = {info["node_id"]: address.split("@")[0] for address, info in listing.items()}
        primaries: dict[str, list[str]] = {}
        replicas: dict[str, str] = {}
        for address, info in sorted(listing.items()):
            name = address.split("@")[0]
            if "fail" in info["flags"]:
                continue
            if "master" in info["flags"] and info["slots"]:
                primaries[name] = ["-".join(dict.fromkeys(map(str, span))) for span in info["slots"]]
            elif "slave" in info["flags"]:
                replicas[name] = names.get(info["master_id"], "?")
        return {"primaries": primaries, "replicas": replicas}

    def client(self, node: str, blocking: bool = False) -> redis.Redis:
        """A plain client of one node (its own pool); `blocking`: with the socket timeout of
        the blocking calls, and no retry of its own (cluster_wait decides what a failed wait
        means: redis-py's default retry would hold the worker ~5 s on a dead node)."""
        found = self._clients.get((node, blocking))
        if found is None:
            host, port = parse_address(node)
            options = self.options
            if blocking:
                options = {**options, "socket_timeout": self.blocking_timeout, "retry": Retry(NoBackoff(), 0)}
            found = self._clients.setdefault((node, blocking), redis.Redis(host, port, **options))
        return found

    def probe(self, node: str, key: str) -> None:
        """Ask one node whether it serves `key`'s slot (EXISTS), once, on a fresh connection
        with a short timeout and no retry: how a worker tells, without stalling, whether a
        queue it set aside can be served again. A node that answers but cannot serve the slot
        (CLUSTERDOWN: a shard down with cluster-require-full-coverage yes) raises
        ClusterDownError; MOVED or ASK mean another node serves it (the map is read again)."""
        host, port = parse_address(node)
        options = {
            **self.options,
            "socket_timeout": PROBE_TIMEOUT,
            "socket_connect_timeout": PROBE_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        client = redis.Redis(host, port, **options)
        try:
            client.exists(key)
        except (redis_errors.MovedError, redis_errors.AskError):
            self.stale = True  # (served elsewhere now: the next call follows the new map)
        finally:
            client.close()

    def close(self) -> None:
        for client in list(self._clients.values()):
            client.close()
        self._clients.clear()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def set_blocking_timeout(self, seconds: float) -> None:
        """The blocking calls' socket timeout (it must outlast the longest block)."""
        self.blocking_timeout = seconds
        for key in [key for key in self._clients if key[1]]:
            self._clients.pop(key).close()

    def forget_connections(self) -> None:
        """After a fork: drop the parent's sockets without closing them (see pool_child)."""
        for client in self._clients.values():
            client.connection_pool.reset()
        self._clients.clear()
        self._cluster = None

    def exchange(
        self,
        commands: Sequence[tuple[Any, ...]],
        slots: Sequence[int],
        load_script: Callable[[redis.Redis, str], None],
        *,
        after_each_node: tuple[Any, ...] | None = None,
        blocking: bool = False,
    ) -> tuple[list[Any], list[Any]]:
        """Send each command to the primary of its slot, one round trip per node (all written
        before any is read), following redirections (see the module docstring). Returns the
        replies in order, error replies as exceptions, and the replies to `after_each_node`
        (e.g. WAIT), one per node that got commands. `load_script(client, sha)`: on NOSCRIPT."""
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asked: dict[int, str] = {}  # call -> the node an ASK named
        tails: list[Any] = []
        deadline = time.monotonic() + RETRY_WINDOW
        delay = _BACKOFF_FIRST
        while True:
            groups: dict[str, list[int]] = {}
            for index in todo:
                groups.setdefault(asked.get(index) or self.primary_of(slots[index]), []).append(index)
            again: list[int] = []
            trouble: Exception | None = None
            for node, indexes, got in self._round_trip(groups, commands, asked, after_each_node, blocking):
                if isinstance(got, Exception):  # the connection: every call of that node again
                    trouble, self.stale = got, True
                    again += indexes
                    continue
                tail = got.pop() if after_each_node is not None else None
                landed = False
                for index, reply in zip(indexes, got, strict=True):
                    asked.pop(index, None)
                    if isinstance(reply, redis_errors.MovedError):
                        self.stale = True
                        again.append(index)
                    elif isinstance(reply, redis_errors.AskError):
                        asked[index] = f"{reply.host}:{reply.port}"
                        again.append(index)
                    elif isinstance(reply, (redis_errors.TryAgainError, redis_errors.ClusterDownError)):
                        trouble = reply
                        again.append(index)
                    elif isinstance(reply, redis_errors.ResponseError) and primary_moved(reply):
                        trouble, self.stale = reply, True  # READONLY: a primary turned replica
                        again.append(index)
                    elif isinstance(reply, redis_errors.NoScriptError):
                        load_script(self.client(node), commands[index][1])
                        again.append(index)
                    else:
                        replies[index] = reply
                        landed = True
                # The tail (WAIT) counts for a node only if some call ran there: a node whose
                # calls were all redirected (a primary turned replica refuses WAIT, too) says
                # nothing about them. An error reply to it there counts as no replica.
                if after_each_node is not None and landed:
                    tails.append(0 if isinstance(tail, Exception) else tail)
            if not again:
                return replies, tails
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"Redis Cluster: {len(again)} calls not done in {RETRY_WINDOW:g} s: {trouble}")
            if trouble is not None:
                time.sleep(delay)  # a migration step or an election: give it a moment
                delay = min(delay * 2, _BACKOFF_MAX)
            todo = sorted(again)

    def _round_trip(
        self,
        groups: dict[str, list[int]],
        commands: Sequence[tuple[Any, ...]],
        asked: dict[int, str],
        tail: tuple[Any, ...] | None,
        blocking: bool,
    ) -> list[tuple[str, list[int], Any]]:
        """Write each node's commands, then read each node's replies (the nodes work at once).
        Yields (node, call indexes, replies without ASKING's, or the connection's exception)."""
        sent: list[tuple[str, list[int], Any, Any, list[bool]]] = []  # (…, pool, connection, ASKING or not)
        results: list[tuple[str, list[int], Any]] = []
        for node, indexes in groups.items():
            packed: list[tuple[Any, ...]] = []
            is_asking: list[bool] = []
            for index in indexes:
                if index in asked:
                    packed.append(("ASKING",))
                    is_asking.append(True)
                packed.append(commands[index])
                is_asking.append(False)
            if tail is not None:
                packed.append(tail)
                is_asking.append(False)
            pool = self.client(node, blocking).connection_pool
            connection: Any = None
            try:
                connection = pool.get_connection()
                send(connection, packed)
                sent.append((node, indexes, pool, connection, is_asking))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                if connection is not None:
                    connection.disconnect()
                    pool.release(connection)
                results.append((node, indexes, exc))
        for node, indexes, pool, connection, is_asking in sent:
            try:
                got = read_replies(connection, len(is_asking))
                results.append((node, indexes, [r for r, asking in zip(got, is_asking, strict=True) if not asking]))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                connection.disconnect()  # replies may be left unread: never reuse this socket
                results.append((node, indexes, exc))
            except BaseException:
                connection.disconnect()
                raise
            finally:
                pool.release(connection)
        return results


class LazyClusterClient:
    """Stands where RedisBroker keeps its client: redis-py's RedisCluster, made at first use
    (its constructor connects, and nothing may connect before the first command)."""

    def __init__(self, route: ClusterRoute) -> None:
        self._route = route

    def get_encoder(self) -> Any:
        """What a Script asks its client for to hash its source (answered without connecting)."""
        return Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._route.cluster, name)
