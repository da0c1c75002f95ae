"""Redis Cluster topology changes under load: 3 worker processes, each on 3 queues whose slots
live on the 3 different primaries of a real 6-node cluster (tests/clusterkit.py: 3 primaries,
3 replicas, cluster-node-timeout 2 s), and in turn:

1. `redis-cli --cluster reshard` of a few slots, a busy queue's among them, to another
   primary, while its tasks flow: workers blocked on the old node must re-home (redis #2379
   / valkey #2734: blocking pops that hang after a reshard);
2. the same by hand, slower: a busy queue's slot migrated key by key (SETSLOT
   IMPORTING/MIGRATING, MIGRATE of one key at a time, SETSLOT NODE on every primary), so its
   calls meet ASK and TRYAGAIN mid-way and MOVED after;
3. CLUSTER FAILOVER on a busy primary's replica (a planned switch);
4. kill -9 of a busy primary: its replica takes over after the node timeout.

Per queue, two producers send a steady stream of two-task chains (b after a) and record every
start() that returned: one with the default (min_replicas_acked 0), one with
min_replicas_acked 1. Per fault the scorecard gets: accepted tasks lost by each, tasks run
twice, how long the cluster took to settle, how long after the fault began each worker ran a
task of an affected queue sent after it settled (p50, max), and the longest pause meanwhile
in the queues the fault did not touch (no task of theirs ran). The test fails if a worker
is stuck (no such run within 30 s) or dies, if a kill -9 loses a task that min_replicas_acked
1 accepted (the shard's one replica held it, and it is the one promoted), if a reshard or a
planned failover loses any, or if more tasks ran twice than the workers can hold at once (as
tests/faults/test_failover.py bounds it).
The workers keep the default idle_block_max (5 s), and 5 s leases: one that re-homed only
when its block timed out would show ~5 s (tests/test_cluster.py blocks 300 s to show Redis
redirecting a blocked wait). `drained_s`: from the producers' stop to every queue empty; a
task that waits for its lease to expire shows there as up to 5 s. (With 60 s leases, each of
the four faults left a task handed to an idle worker (a token "h…", state running, the inbox
empty) that no worker ran until its lease expired: drained_s 55-60 s each, against 0 in the
same test with no fault. The core's to look into; 5 s leases keep the suite short.)

The tasks record their runs in a plain Redis off the cluster (tests/clustertasks.py), so a
killed primary cannot take the record with it.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import clustertasks
import pytest
import redis
from clusterkit import RedisCluster, slot_of_queue
from conftest import Workers, wait_until
from faultkit import BATCH, ChainProducer, ready_workers, record, tasks_held_at_once
from test_failover import audit, resumed, start_under_load

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.keys import QueueKeys
from minicelery.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORKER_SETTINGS = {  # quick reconnects; default idle blocks (see the module's docstring)
    "MINICELERY_TASKS": '["clustertasks"]',
    "MINICELERY_REDIS__CLUSTER": "true",
    "MINICELERY_WORKER__LEASE_SECONDS": "5",
    "MINICELERY_WORKER__IDLE_BLOCK_MAX": "5",
    "MINICELERY_WORKER__RECONNECT_MAX_DELAY": "0.5",
    "MINICELERY_WORKER__SHUTDOWN_GRACE": "2",
    "MINICELERY_REDIS__SOCKET_TIMEOUT": "2",
    "MINICELERY_WORKER__BATCH_SIZE": str(BATCH),
}
PACE = 0.05  # seconds between two chains, per producer
FAULTS = ("redis-cli reshard", "slot migration", "CLUSTER FAILOVER", "kill -9")
# Each queue's slot is among the first SPAN of its primary's range: `redis-cli --cluster
# reshard` moves a primary's lowest slots first, so a few slots carry the busy queue along.
SPAN = 16


class Producer(ChainProducer):
    """Chains to `queue` on the cluster, with min_replicas_acked = `acked`."""

    def __init__(self, cluster: RedisCluster, queue: str, acked: int, prefix: str) -> None:
        broker = RedisBroker(
            JSONTransport(),
            url=cluster.url,
            cluster=True,
            result_ttl=3600,
            max_block=1,
            connection_options={"socket_timeout": 2.0, "socket_connect_timeout": 2.0},
            min_replicas_acked=acked,
            replica_ack_timeout=0.5,
        )
        app = Client(broker, default_queue=queue)
        Client.instances.remove(app)
        clustertasks.register(app)
        super().__init__(app, f"{prefix}-{queue}-m{acked}", PACE)
        self.queue = queue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A cluster of this module's own: the faults change its topology."""
    nodes = RedisCluster(tmp_path_factory.mktemp("fault-cluster")).start()
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def ledger_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def test_a_durable_enqueue_sent_to_a_primary_turned_replica_follows_it(cluster: RedisCluster) -> None:
    """min_replicas_acked 1, and the broker's slot map still names a primary that a CLUSTER
    FAILOVER made a replica: start() follows the MOVED to the new primary and returns (or
    raises a MiniceleryError such as NotReplicated), never a TypeError."""
    queue = cluster.queues_on_distinct_primaries(f"durable{uuid.uuid4().hex[:4]}", 1)[0]
    producer = Producer(cluster, queue, 1, "stale")
    stamp = producer.app.tasks["stamp_run"]
    try:
        stamp("first").start()  # the slot map is read
        old = cluster.node_of_queue(queue)
        cluster.failover(cluster.replica_of(old))
        cluster.wait_ok(60, replicas=3)
        task = stamp("after").start()
        reader = cluster.cluster_client()
        keys = QueueKeys(queue)  # stored on the new primary (pending: its payload; run: state or result)
        assert (
            reader.hexists(keys.payload, task.id)
            or reader.hexists(keys.result, task.id)
            or reader.hexists(keys.info, f"{task.id}:s")
        )
        reader.close()
    finally:
        producer.app.broker.close()


def test_leaving_the_idle_set_of_a_queue_whose_keys_were_migrated_follows_the_ask(cluster: RedisCluster) -> None:
    """Mid-migration, every key of the queue already on the importing node: the source
    answers ASK, and leave() (a worker busy on another queue) must go there and succeed."""
    queue = cluster.queues_on_distinct_primaries(f"leave{uuid.uuid4().hex[:4]}", 1)[0]
    broker = RedisBroker(JSONTransport(), url=cluster.url, cluster=True, max_block=1)
    app = Client(broker, default_queue=queue)
    Client.instances.remove(app)
    clustertasks.register(app)
    app.tasks["stamp_run"]("parked").start()  # the queue's keys exist
    slot = slot_of_queue(queue)
    target = next(p for p in cluster.primaries() if p != cluster.node_of_queue(queue))
    source = cluster.begin_migration(slot, target)
    try:
        assert cluster.move_keys(slot, source, target) > 0
        assert broker.leave([queue], "w-1", 5000) == []  # nothing was handed to "w-1"
    finally:
        cluster.end_migration(slot, source, target)
        broker.close()


def test_a_worker_keeps_serving_its_queue_on_a_live_primary_while_another_shard_is_down(
    cluster: RedisCluster, ledger_url: str, tmp_path: Path
) -> None:
    """A shard (primary and replica) down, cluster-require-full-coverage off so that the
    other shards keep serving: a worker on a queue of each still runs the live one's tasks,
    and takes the other queue back once its shard is up again."""
    dead_queue, live_queue = cluster.queues_on_distinct_primaries(f"half{uuid.uuid4().hex[:4]}", 2)
    ports = cluster.live_ports()
    for port in ports:
        cluster.ask(port, "CONFIG", "SET", "cluster-require-full-coverage", "no")
    live_url = f"redis://127.0.0.1:{cluster.node_of_queue(live_queue)}/0"  # (a startup node that stays)
    pool = Workers(live_url, live_queue, tmp_path)
    env = pool.env(
        MINICELERY_WORKER__QUEUES=str([dead_queue, live_queue]).replace("'", '"'),
        MINICELERY_TEST_LEDGER_URL=ledger_url,
        **WORKER_SETTINGS,
    )
    worker = pool.start(env=env)
    pool.wait_ready(worker)
    apps: dict[str, Client] = {}
    for queue in (live_queue, dead_queue):
        apps[queue] = Client(RedisBroker(JSONTransport(), url=live_url, cluster=True, max_block=1), default_queue=queue)
        Client.instances.remove(apps[queue])
        clustertasks.register(apps[queue])
    primary = cluster.node_of_queue(dead_queue)
    shard = [cluster.replica_of(primary), primary]
    down = False
    try:
        for port in shard:
            cluster.stop_node(port)  # SIGKILL: the shard is gone until restarted below
        down = True
        task = apps[live_queue].tasks["stamp_run"]("live").start()
        assert task.result(timeout=10) == "live"
        for port in reversed(shard):
            cluster.restart(port)
        down = False
        cluster.wait_ok(60, replicas=3)
        task = apps[dead_queue].tasks["stamp_run"]("back").start()
        assert task.result(timeout=30) == "back"
        assert f"queue {dead_queue} taken back" in pool.log(worker)
    finally:
        pool.stop_all()
        for app in apps.values():
            app.broker.close()
        if down:
            for port in reversed(shard):
                cluster.restart(port)
        cluster.wait_ok(60, replicas=3)
        for port in ports:
            cluster.ask(port, "CONFIG", "SET", "cluster-require-full-coverage", "yes")


def slot_ranges(cluster: RedisCluster) -> list[tuple[int, int, int]]:
    """(first slot, last slot, primary's port) of every range a live primary owns."""
    return [(a, b, int(n["port"])) for n in cluster._nodes() if n["primary"] and not n["failed"] for a, b in n["slots"]]  # type: ignore[attr-defined, call-overload]


def queues_near_range_starts(cluster: RedisCluster, prefix: str) -> list[str]:
    """A queue per primary, each in the first SPAN slots of its primary's lowest range (the
    slots `redis-cli --cluster reshard` moves first)."""
    lowest: dict[int, tuple[int, int]] = {}
    for a, b, port in sorted(slot_ranges(cluster)):
        lowest.setdefault(port, (a, min(b, a + SPAN - 1)))
    found: dict[int, str] = {}
    number = 0
    while len(found) < len(lowest):
        name = f"{prefix}-{number}"
        number += 1
        slot = slot_of_queue(name)
        found.update({port: name for port, (a, b) in lowest.items() if a <= slot <= b and port not in found})
    return list(found.values())


def reshard(cluster: RedisCluster, queue: str, target: int) -> None:
    """`redis-cli --cluster reshard` of the queue's primary's lowest slots, up to the queue's,
    to the primary on `target`: what an operator runs."""
    source = cluster.node_of_queue(queue)
    lowest = min(a for a, _b, port in slot_ranges(cluster) if port == source)
    command = [
        *("redis-cli", "--cluster", "reshard", f"127.0.0.1:{source}", "--cluster-yes"),
        *("--cluster-from", cluster.node_id(source), "--cluster-to", cluster.node_id(target)),
        *("--cluster-slots", str(slot_of_queue(queue) - lowest + 1)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    cluster.wait_ok()


def inject(cluster: RedisCluster, fault: str, queues: list[str]) -> tuple[list[str], float]:
    """Cause the fault to the primary of the first queue (the busy one); returns the queues
    it affected and the time the cluster settled (every live node ok, one slot map)."""
    busy = queues[0]
    old = cluster.node_of_queue(busy)
    if fault == "redis-cli reshard":
        target = next(cluster.node_of_queue(q) for q in queues if cluster.node_of_queue(q) != old)
        reshard(cluster, busy, target)
        assert cluster.node_of_queue(busy) == target
        return [busy], time.time()
    if fault == "slot migration":
        others = [cluster.node_of_queue(q) for q in queues if cluster.node_of_queue(q) != old]
        slot = slot_of_queue(busy)
        source = cluster.begin_migration(slot, others[0])
        cluster.move_keys(slot, source, others[0], batch=1)  # key by key: calls meet ASK, TRYAGAIN
        cluster.end_migration(slot, source, others[0])
        assert cluster.node_of_queue(busy) == others[0]
        return [busy], time.time()
    affected = [q for q in queues if cluster.node_of_queue(q) == old]
    replica = cluster.replica_of(old)
    if fault == "CLUSTER FAILOVER":
        cluster.failover(replica)
        settled = time.time()
    else:
        cluster.stop_node(old, kill=True)  # SIGKILL, and reaped: it is no longer asked
        wait_until(lambda: replica in cluster.primaries(), 60, f"replica {replica} to take over")
        cluster.wait_ok()
        settled = time.time()
        cluster.restart(old)  # back as a replica
    cluster.wait_ok(60, replicas=3)
    assert cluster.node_of_queue(busy) == replica
    return affected, settled


def longest_pause(ledger: redis.Redis, since: float, until: float, tags: set[str]) -> float:
    """The longest time in [since, until] in which no task among `tags` ran (by any worker)."""
    ran = [at for member, at in ledger.zrangebyscore(clustertasks.STAMPS_KEY, since, until, withscores=True)
           if member.decode().split("|", 1)[1] in tags]  # fmt: skip
    marks = [since, *sorted(ran), until]
    return max(b - a for a, b in itertools.pairwise(marks))


def drained(reader: redis.RedisCluster, queues: list[str]) -> bool:
    return all(
        reader.llen(QueueKeys(q).ready) + reader.zcard(QueueKeys(q).running) + reader.zcard(QueueKeys(q).scheduled) == 0
        for q in queues
    )


def test_topology_changes_under_load(cluster: RedisCluster, ledger_url: str, tmp_path: Path) -> None:
    """The same 3 workers ride out the four faults one after the other."""
    ledger = redis.Redis.from_url(ledger_url)
    queues = queues_near_range_starts(cluster, f"cf{uuid.uuid4().hex[:4]}")
    pool = Workers(cluster.url, ",".join(queues), tmp_path)
    env = pool.env(
        MINICELERY_WORKER__QUEUES=str(queues).replace("'", '"'),
        MINICELERY_TEST_LEDGER_URL=ledger_url,
        **WORKER_SETTINGS,
    )
    workers = ready_workers(pool, env)
    pids = [w.pid for w in workers]
    redo_bound = tasks_held_at_once(workers)
    began = time.monotonic()
    try:
        for number, fault in enumerate(FAULTS):
            order = queues[number:] + queues[:number]  # each fault hits another queue's primary
            producers = [Producer(cluster, q, acked, f"f{number}") for q in order for acked in (0, 1)]
            start_under_load(producers, ledger, pids)
            at = time.time()
            affected, settled = inject(cluster, fault, order)

            def sent_after() -> set[str]:
                return {
                    tag
                    for p in producers  # noqa: B023
                    if p.queue in affected  # noqa: B023
                    for tag in list(p.accepted.values())
                    if p.sent_at.get(tag, 0) >= settled  # noqa: B023
                }

            wait_until(
                lambda: len(resumed(ledger, pids, at, sent_after())) == 3,  # noqa: B023
                30,
                f"every worker to run a task of {affected} after {fault}",
            )
            times = sorted(resumed(ledger, pids, at, sent_after()).values())
            others = {tag for p in producers if p.queue not in affected for tag in p.accepted.values()}
            others_paused = longest_pause(ledger, at, at + times[-1], others)
            for producer in producers:
                producer.stop()
            reader = cluster.cluster_client()
            stopped = time.monotonic()
            wait_until(lambda: drained(reader, queues), 60, "the queues to drain")  # noqa: B023
            drained_s = time.monotonic() - stopped
            default = [audit(reader, ledger, p.queue, p.accepted) for p in producers[0::2]]
            durable = [audit(reader, ledger, p.queue, p.accepted) for p in producers[1::2]]
            reader.close()

            def total(audits: list[dict[str, int]], figure: str) -> int:
                return sum(a[figure] for a in audits)

            record(
                f"Cluster: {fault}",
                lost_default=f"{total(default, 'lost')}/{total(default, 'accepted')}",
                lost_acked1=f"{total(durable, 'lost')}/{total(durable, 'accepted')}",
                refused=sum(p.refused for p in producers),
                ran_twice=total(default, "ran_twice") + total(durable, "ran_twice"),
                settled_s=round(settled - at, 2),
                resume_p50_s=round(statistics.median(times), 2),
                resume_max_s=round(times[-1], 2),
                other_queues_paused_s=round(others_paused, 2),
                drained_s=round(drained_s, 2),
            )
            assert all(w.poll() is None for w in workers), fault  # no worker died
            assert total(default, "ran_twice") + total(durable, "ran_twice") <= redo_bound, (fault, default, durable)
            if fault == "kill -9":
                assert total(durable, "lost") == 0, (fault, durable)
            else:  # a migration and a planned failover lose nothing
                assert total(default, "lost") + total(durable, "lost") == 0, (fault, default, durable)
        record("Cluster: the four faults", seconds=round(time.monotonic() - began, 1))
    finally:
        pool.stop_all()
        ledger.close()
