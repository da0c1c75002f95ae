"""A real Redis Cluster on free loopback ports: 3 primaries and 3 replicas, as OPS-NOTES.md
describes. Used by tests/test_cluster.py (the `cluster` fixture in conftest.py) and by the
topology-change fault suite.

Each node gets two free ports: its client port and its cluster bus port (`--cluster-port`,
Redis 7), so the bus never needs port+10000 to be free. Slots go 0-5460, 5461-10922,
10923-16383 to the first three nodes (the primaries, in creation order); redis-cli picks
each one's replica among the other three.

Use (the fault suite, the scale-out bench):

    def test_x(cluster: RedisCluster, tmp_path):           # session fixture, conftest.py
        queues = cluster.queues_on_distinct_primaries("q")  # one queue per primary
        app = cluster_app(cluster, queues[0])              # a producer (tests/worktasks.py)
        pool = Workers(cluster.url, queues[0], tmp_path, cluster=True)
        proc = start_worker(pool, queues)                  # a worker on all three
        primary = cluster.node_of_queue(queues[0])          # port of its primary, now
        cluster.failover(cluster.replica_of(primary))       # CLUSTER FAILOVER, waits for ok
        cluster.stop_node(primary); cluster.restart(primary)  # kill -9, then rejoin
        cluster.migrate_slot(slot_of_queue(queues[0]), other_primary_port)  # a reshard by hand

A session's tests share the cluster: leave it as found (a moved slot back, a killed node
restarted: restart() waits until every node agrees again). RedisCluster(directory,
primaries=N, replicas=False).start() makes a private one of any size (1 or 2 primaries are
joined by hand: redis-cli insists on 3); stop() ends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import redis
import worktasks
from conftest import Workers, wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.cluster import queue_slot as slot_of_queue  # (the slot every key of a queue hashes to)
from minicelery.keys import QueueKeys
from minicelery.redis_server import RedisServer, free_port

SLOTS = 16384
# A failed primary is voted out after this long (Redis' default is 15 s: too slow for tests).
NODE_TIMEOUT_MS = 2000
# DEBUG (SLEEP) from loopback only, for the fault suite; diskless full syncs at once.
NODE_ARGS = ("--enable-debug-command", "local", "--repl-diskless-sync-delay", "0")


class RedisCluster:
    def __init__(
        self, directory: Path, node_timeout_ms: int = NODE_TIMEOUT_MS, primaries: int = 3, replicas: bool = True
    ) -> None:
        """`primaries` (1 or more), each with one replica if `replicas`."""
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.primary_count = primaries
        self.replicas = replicas
        self.count = primaries * (2 if replicas else 1)
        self.nodes: list[RedisServer] = []
        self.bus_ports: dict[int, int] = {}  # client port -> cluster bus port

    # --- life ----------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> RedisCluster:
        ports: set[int] = set()
        while len(ports) < 2 * self.count:  # (free_port may hand out the same free port twice)
            ports.add(free_port())
        for i in range(self.count):
            path = self.directory / f"n{i}"
            path.mkdir(parents=True, exist_ok=True)
            port, bus = ports.pop(), ports.pop()
            self.bus_ports[port] = bus
            args = (
                *NODE_ARGS,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--cluster-port",
                str(bus),
            )
            self.nodes.append(RedisServer(port, directory=path, extra_args=args).start())
        try:
            self._create(timeout)
        except BaseException:
            self.stop()
            raise
        self.wait_ok(timeout, replicas=self.count - self.primary_count)
        return self

    def _create(self, timeout: float) -> None:
        """redis-cli --cluster create; by hand (ADDSLOTSRANGE, MEET, REPLICATE) for fewer than
        the 3 primaries redis-cli insists on."""
        if self.primary_count >= 3:
            replicas = "1" if self.replicas else "0"
            create = ["redis-cli", "--cluster", "create", *self.addresses, "--cluster-replicas", replicas]
            done = subprocess.run(
                [*create, "--cluster-yes"], capture_output=True, text=True, timeout=timeout, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}\n{done.stderr}")
            return
        primaries, others = self.ports[: self.primary_count], self.ports[self.primary_count :]
        share = SLOTS // self.primary_count
        for number, port in enumerate(primaries):
            last = SLOTS - 1 if number == self.primary_count - 1 else (number + 1) * share - 1
            self.ask(port, "CLUSTER", "ADDSLOTSRANGE", number * share, last)
        for port in self.ports[1:]:
            self.ask(port, "CLUSTER", "MEET", "127.0.0.1", self.ports[0], self.bus_ports[self.ports[0]])
        for replica, primary in zip(others, primaries, strict=False):  # (others: none without replicas)
            primary_id = self.node_id(primary)

            def met(replica: int = replica, primary_id: str = primary_id) -> bool:
                return primary_id in str(self.ask(replica, "CLUSTER", "NODES"))

            wait_until(met, timeout, "the nodes to meet")
            self.ask(replica, "CLUSTER", "REPLICATE", primary_id)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)  # a stopped (SIGSTOP) node cannot exit
            node.cleanup()

    # --- where things are ----------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        """A URL naming one live node: a cluster client discovers the rest from it."""
        return f"redis://127.0.0.1:{self.live_ports()[0]}/0"

    def live_ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.process is not None and n.process.poll() is None]

    def ask(self, port: int, *command: str | int) -> object:
        """One command to one node, no retries (a stopped node answers within a second)."""
        client = redis.Redis(port=port, socket_timeout=1, decode_responses=True, retry=Retry(NoBackoff(), 0))
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def client(self, port: int) -> redis.Redis:
        """A plain client of one node (the caller closes it)."""
        return redis.Redis(port=port, socket_timeout=5)

    def cluster_client(self) -> redis.RedisCluster:
        """redis-py's own cluster client (follows MOVED/ASK): for checking data in tests."""
        return redis.RedisCluster(host="127.0.0.1", port=self.live_ports()[0], socket_timeout=5)

    def _nodes(self, port: int | None = None) -> list[dict[str, object]]:
        """CLUSTER NODES as one node (any live one) sees it: port, id, role, primary id, slots."""
        listing = str(self.ask(port or self.live_ports()[0], "CLUSTER", "NODES"))
        nodes = []
        for line in listing.splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            slots: list[tuple[int, int]] = []
            for part in fields[8:]:
                if part.startswith("["):  # a slot being migrated or imported
                    continue
                first, _, last = part.partition("-")
                slots.append((int(first), int(last or first)))
            nodes.append(
                {
                    "port": int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                    "id": fields[0],
                    "primary": "master" in flags,
                    "failed": "fail" in flags or "fail?" in flags,
                    "of": fields[3],
                    "slots": slots,
                }
            )
        return nodes

    def node_id(self, port: int) -> str:
        return str(self.ask(port, "CLUSTER", "MYID"))

    def primaries(self) -> list[int]:
        """Ports of the primaries that own slots, as a live node sees them."""
        return sorted(int(n["port"]) for n in self._nodes() if n["primary"] and n["slots"] and not n["failed"])  # type: ignore[call-overload]

    def replica_of(self, primary: int) -> int:
        """The port of a replica of the primary on `primary`."""
        primary_id = self.node_id(primary)
        for n in self._nodes():
            if n["of"] == primary_id and not n["failed"]:
                return int(n["port"])  # type: ignore[call-overload]
        raise AssertionError(f"no replica of {primary}")

    def primary_of_slot(self, slot: int) -> int:
        for n in self._nodes():
            if n["primary"] and not n["failed"] and any(a <= slot <= b for a, b in n["slots"]):  # type: ignore[attr-defined]
                return int(n["port"])  # type: ignore[call-overload]
        raise AssertionError(f"no primary owns slot {slot}")

    def node_of_queue(self, queue: str) -> int:
        """The port of the primary that holds `queue` (its slot) now."""
        return self.primary_of_slot(slot_of_queue(queue))

    def queues_on_distinct_primaries(self, prefix: str, count: int = 3) -> list[str]:
        """`count` queue names starting with `prefix`, each held by a different primary."""
        found: dict[int, str] = {}
        number = 0
        while len(found) < count:
            name = f"{prefix}-{number}"
            found.setdefault(self.node_of_queue(name), name)
            number += 1
        return list(found.values())

    # --- changing the topology -----------------------------------------------------------------

    def server(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def signal(self, port: int, sig: signal.Signals) -> None:
        process = self.server(port).process
        assert process is not None
        os.kill(process.pid, sig)

    def stop_node(self, port: int, kill: bool = True) -> None:
        """Stop one node (SIGKILL by default, as a crash; else SIGTERM)."""
        self.server(port).stop(kill=kill)

    def restart(self, port: int, timeout: float = 30) -> None:
        """Start a stopped node again on its port and directory (its nodes.conf rejoins it)."""
        node = self.server(port)
        if node.process is not None:
            node.process.wait()
        node.start()
        self.wait_ok(timeout)

    def failover(self, replica: int, timeout: float = 30) -> None:
        """CLUSTER FAILOVER on `replica` (a planned switch): returns once it is primary and the
        cluster is ok."""
        self.ask(replica, "CLUSTER", "FAILOVER")
        wait_until(lambda: replica in self.primaries(), timeout, f"node {replica} to become primary")
        self.wait_ok(timeout)

    def begin_migration(self, slot: int, target: int) -> int:
        """Mark `slot` MIGRATING on its owner and IMPORTING on `target` (keys not yet moved: a
        command on a key already moved gets ASK); returns the source port."""
        source = self.primary_of_slot(slot)
        self.ask(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.ask(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        return source

    def move_keys(self, slot: int, source: int, target: int, batch: int = 100) -> int:
        """MIGRATE every key of `slot` from `source` to `target` (during a migration)."""
        moved = 0
        while True:
            keys = self.ask(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                return moved
            self.ask(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)  # type: ignore[misc]
            moved += len(keys)  # type: ignore[arg-type]

    def end_migration(self, slot: int, source: int, target: int) -> None:
        """Give `slot` to `target` on every primary (CLUSTER SETSLOT NODE), then wait for ok."""
        target_id = self.node_id(target)
        for port in [target, source, *(p for p in self.primaries() if p not in (source, target))]:
            self.ask(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok()

    def migrate_slot(self, slot: int, target: int) -> int:
        """Move `slot` and its keys to the primary on `target`, as a reshard does; returns the
        source port."""
        source = self.begin_migration(slot, target)
        self.move_keys(slot, source, target)
        self.end_migration(slot, source, target)
        return source

    def wait_ok(self, timeout: float = 60, replicas: int = 0) -> None:
        """Until every live node says cluster_state:ok, they agree on who owns each slot, and
        each sees at least `replicas` replicas with their link to the primary up."""
        wait_until(lambda: self._settled(replicas), timeout, "cluster_state:ok on every node, one slot map")

    def _settled(self, replicas: int) -> bool:
        try:
            views = set()
            for port in self.live_ports():
                if "cluster_state:ok" not in str(self.ask(port, "CLUSTER", "INFO")):
                    return False
                owners = []
                for n in self._nodes(port):
                    if n["primary"] and not n["failed"]:
                        owners += [(a, b, n["id"]) for a, b in n["slots"]]  # type: ignore[attr-defined]
                views.add(tuple(sorted(owners)))
                if sum(1 for n in self._nodes(port) if not n["primary"] and not n["failed"]) < replicas:
                    return False
                info = str(self.ask(port, "INFO", "replication")) if replicas else ""
                if "role:slave" in info and "master_link_status:up" not in info:
                    return False
                if sum(b - a + 1 for a, b, _ in owners) != SLOTS:
                    return False
            return len(views) == 1
        except redis.RedisError:
            return False


# --- producers and workers on a cluster ---------------------------------------------------


def cluster_app(cluster: RedisCluster, queue: str, **options: Any) -> Client:
    """A producer whose tasks (tests/worktasks.py) go to `queue`, its broker on the cluster
    (RedisBroker options may be given; the caller closes it and removes it from
    Client.instances)."""
    broker = RedisBroker(JSONTransport(), url=cluster.url, result_ttl=600, max_block=1, cluster=True, **options)
    app = Client(broker, default_queue=queue)
    worktasks.register(app)
    return app


# Idle blocks this long make a test fail if the worker's wait does not end by a wake-up (or
# by Redis redirecting it), rather than by its block timing out.
LONG_BLOCKS = {"MINICELERY_WORKER__IDLE_BLOCK_MAX": "300", "MINICELERY_WORKER__LEASE_SECONDS": "300"}


def start_worker(pool: Workers, queues: list[str], **settings: str) -> subprocess.Popen[bytes]:
    """A `minicelery worker` process on `queues`, ready; `pool` made with cluster=True
    (Workers(cluster.url, queue, tmp_path, cluster=True)); `settings`: MINICELERY_* variables."""
    proc = pool.start(MINICELERY_WORKER__QUEUES=json.dumps(queues), **settings)
    pool.wait_ready(proc)
    return proc


def idle_on(cluster: RedisCluster, queues: list[str]) -> bool:
    """Whether a worker sits in the idle set of every one of `queues` (it waits there)."""
    client = cluster.cluster_client()
    try:
        return all(client.zcard(QueueKeys(queue).idle) for queue in queues)
    finally:
        client.close()
