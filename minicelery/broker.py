"""The Redis broker: every state change is one Lua script (scripts/*.lua), run by SHA.

This module and the three beside it are the only ones that talk to Redis: redis_wire.py
(the round trip, the scripts' source, errors translated into minicelery's BrokerError
tree), claim_wire.py (claims on the wire) and queue_reads.py (read-only views).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions as redis_errors
from redis.commands.core import Script

from .claim_wire import claim_call, decode_handed, idle_registration, parse_claim
from .cluster import ClusterRoute, LazyClusterClient, queue_slot, slot_of
from .cluster_wait import wait_on_cluster, wake_commands
from .errors import ClusterMismatch, NotReplicated
from .keys import QueueKeys, queue_keys, worker_wake_key
from .queue_reads import QueueReads
from .records import (
    NO_RETRY,
    Claim,
    FinishItem,
    Idle,
    Lease,
    NextClaim,
    RetryPlan,
    ScriptStatus,
    Wake,
    script_status,
)
from .redis_wire import SCRIPT_NAMES, exchange, raise_error_reply, script_source, translate_errors
from .redis_wire import text as _text
from .sentinel import SwitchWatch, Topology, data_options, shut_sockets
from .transport import JSONTransport

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

# A blocking call must end before its connection's socket times out: this much slack.
BLOCKING_SOCKET_SLACK = 5.0
# The orphan sweep looks at this many of the oldest waiting tasks per call.
ORPHAN_SWEEP_BATCH = 100
# More tasks than an inbox ever holds (a hand-off gives an idle worker a batch at most).
INBOX_MAX = 100_000


# Finishes that wrote to Redis (a result or dead letter, or a retry scheduled).
_WRITTEN = frozenset({ScriptStatus.OK, ScriptStatus.RETRY})
# finish.lua's retry fields for an outcome that is never retried (max_retries 0)
_NO_RETRY_ARGS = (0, NO_RETRY.base_ms, NO_RETRY.cap_ms, repr(NO_RETRY.jitter), NO_RETRY.fixed_ms)


@dataclass(frozen=True)
class EnqueueReply:
    status: str  # "ok", "exists" or "duplicate"
    detail: str  # the task's state, or the id of the task holding the idempotency key


def _socket_options(options: dict[str, Any]) -> dict[str, Any]:
    """The timeouts of the data connection, which the sentinel connections share by default."""
    return {key: value for key, value in options.items() if key.startswith("socket_")}


class RedisBroker(QueueReads):
    """Talks to one Redis server for producers (`Client`) and workers alike.

    `url` is a redis://, rediss:// or unix:// URL; without it the settings decide (the
    `MINICELERY_REDIS__URL` variable or the config file), else redis://localhost:6379/0.
    Nothing connects until the first command.
    """

    def __init__(
        self,
        transport: JSONTransport | None = None,
        url: str | None = None,
        result_ttl: float | None = None,
        *,
        max_block: float | None = None,
        dead_letter_ttl: float | None = None,
        connection_options: dict[str, Any] | None = None,
        settings: Settings | None = None,
        sentinels: Sequence[str] | None = None,
        sentinel_master: str | None = None,
        sentinel_options: dict[str, Any] | None = None,
        min_replicas_acked: int | None = None,
        replica_ack_timeout: float | None = None,
        replicate_results: bool | None = None,
        cluster: bool | None = None,
        cluster_nodes: Sequence[str] | None = None,
    ) -> None:
        """What is not given comes from `settings`, loaded here if not passed: the one source
        of every default (the worker and the CLI pass theirs, via from_settings).

        With `sentinels` ("host:port" each) and `sentinel_master`, the sentinels say where the
        primary is, and every call follows it across a failover (see sentinel.py); `url` then
        gives only the database, credentials and scheme. `min_replicas_acked`: enqueues
        return only once that many replicas hold them (WAIT, up to `replica_ack_timeout` s).
        `replicate_results`: a worker's finish waits for them too (see finish_many).

        With `cluster=True`, `url` names any node of a Redis Cluster (`cluster_nodes`: more
        "host:port" to start from) and each queue's calls go to the primary of its slot,
        following the cluster through reshards and failovers (see cluster.py)."""
        from .settings import (
            RedisSettings,
            WorkerSettings,
            load_settings,
            mask_url,
        )  # deferred: settings read env and files

        options = dict(connection_options or {})
        if settings is None and None in (url, result_ttl, max_block):
            settings = load_settings()
        worker = settings.worker if settings is not None else WorkerSettings()
        redis_settings = settings.redis if settings is not None else RedisSettings()
        if settings is not None:
            url = url or settings.redis.url
            options = {**settings.redis.connection_options(), **options}
            if sentinels is None and settings.redis.sentinels:
                sentinels, sentinel_master = settings.redis.sentinels, settings.redis.sentinel_master
                sentinel_options = {**settings.redis.sentinel_options(), **(sentinel_options or {})}
        if cluster is None:
            cluster = redis_settings.cluster
            cluster_nodes = cluster_nodes if cluster_nodes is not None else redis_settings.cluster_nodes
        if cluster and sentinels:
            raise ValueError("cluster and sentinels cannot be used together: a cluster fails over by itself")
        if min_replicas_acked is None:
            min_replicas_acked = redis_settings.min_replicas_acked
        if replica_ack_timeout is None:
            replica_ack_timeout = redis_settings.replica_ack_timeout
        if replicate_results is None:
            replicate_results = redis_settings.replicate_results
        if min_replicas_acked < 0 or replica_ack_timeout <= 0:
            raise ValueError("min_replicas_acked must be 0 or more, replica_ack_timeout positive (seconds)")
        if replicate_results and not min_replicas_acked:
            raise ValueError("replicate_results needs min_replicas_acked of 1 or more (how many replicas)")
        self.replicate_results = bool(replicate_results)
        # Called with how many finishes' results were stored on fewer replicas than asked (the
        # worker counts them in a metric).
        self.on_unreplicated: Callable[[int], None] = lambda _count: None
        self.min_replicas_acked = int(min_replicas_acked)
        self.replica_ack_timeout = float(replica_ack_timeout)
        result_ttl = worker.result_ttl if result_ttl is None else result_ttl
        max_block = worker.idle_block_max if max_block is None else max_block
        dead_letter_ttl = worker.dead_letter_ttl if dead_letter_ttl is None else dead_letter_ttl
        assert url is not None
        if result_ttl <= 0:
            raise ValueError("result_ttl must be positive (seconds)")
        if dead_letter_ttl <= 0:
            raise ValueError("dead_letter_ttl must be positive (seconds)")
        self.dead_letter_ttl = float(dead_letter_ttl)
        self.transport = transport or JSONTransport()
        self.url = url
        self.result_ttl = float(result_ttl)
        self.max_block = float(max_block)
        options.setdefault("socket_timeout", 5.0)
        options.setdefault("socket_connect_timeout", 5.0)
        self._options = options
        self.topology: Topology | None = None
        self._watches: list[SwitchWatch] = []
        self._watch_lock = threading.Lock()
        self.where = mask_url(url)  # (logged: a password in the url is not)
        if sentinels:
            if not sentinel_master:
                raise ValueError("sentinel_master must name the primary the sentinels monitor")
            self.topology = Topology(
                sentinels, sentinel_master, {**_socket_options(options), **(sentinel_options or {})}
            )
            self._options = data_options(url, options)
            self.where = self.topology.describe()
        self.cluster: ClusterRoute | None = None
        if cluster:
            self.cluster = ClusterRoute(url, cluster_nodes or (), options)
            self.cluster.blocking_timeout = self.max_block + BLOCKING_SOCKET_SLACK
            self.where = self.cluster.describe()
        self.redis = self._client(self._options)
        blocking_options = {**self._options, "socket_timeout": self.max_block + BLOCKING_SOCKET_SLACK}
        # Blocking calls get their own pool whose socket timeout outlasts the longest block.
        self.blocking_redis = self._client(blocking_options)
        # (a Script only hashes its source until called: on a cluster, nothing connects yet)
        self._scripts: dict[str, Script] = {name: Script(self.redis, script_source(name)) for name in SCRIPT_NAMES}

    def configure(
        self, *, result_ttl: float | None = None, max_block: float | None = None, dead_letter_ttl: float | None = None
    ) -> None:
        """Change what the broker was made with (app.start() overrides); None keeps a value."""
        if result_ttl is not None:
            self.result_ttl = float(result_ttl)
        if dead_letter_ttl is not None:
            self.dead_letter_ttl = float(dead_letter_ttl)
        if max_block is not None and max_block != self.max_block:
            self.max_block = float(max_block)
            if self.cluster is not None:
                self.cluster.set_blocking_timeout(self.max_block + BLOCKING_SOCKET_SLACK)
                return
            # The blocking connections' socket timeout must outlast the longest block.
            self.blocking_redis.close()
            options = {**self._options, "socket_timeout": self.max_block + BLOCKING_SOCKET_SLACK}
            self.blocking_redis = self._client(options)

    def _client(self, options: dict[str, Any]) -> redis.Redis:
        """A client of the one Redis server, or of whichever is primary now (sentinels), or
        redis-py's cluster client (made at first use) for the reads and admin commands."""
        if self.cluster is not None:
            return LazyClusterClient(self.cluster)  # type: ignore[return-value]
        if self.topology is not None:
            return self.topology.client(options)
        return redis.Redis.from_url(self.url, **options)

    def follow_failovers(self) -> None:
        """With sentinels: start (once per process) the thread that makes every call blocked or
        in flight on an old primary fail over at once when the sentinels announce a new one
        (see sentinel.py). Called before blocking waits and at a worker's connect, not at
        construction: no thread may start before a worker pool forks."""
        if self.topology is None or (self._watches and self._watches[0].pid == os.getpid()):
            return
        with self._watch_lock:  # the heartbeat thread may get here at the same moment
            if self._watches and self._watches[0].pid == os.getpid():
                return
            watches = [SwitchWatch(self.topology, address, self._primary_moved) for address in self.topology.addresses]
            for watch in watches:
                watch.start()
            self._watches = watches

    def _primary_moved(self, sentinel: str, primary: str, promoting: bool) -> None:
        assert self.topology is not None
        if self.topology.moved(sentinel, primary, promoting):
            log.warning("sentinel %s: the primary is now %s; following it", sentinel, primary)
        # On every announcement, news or not: a connection made meanwhile may have gone to a
        # server a lagging sentinel still named (an old primary that, woken, says it is one).
        for client in (self.redis, self.blocking_redis):
            shut_sockets(client, keep=primary)

    def members(self) -> dict[str, Any] | None:
        """With sentinels: the primary and replicas they report now; on a cluster: its
        primaries (with their slot ranges) and replicas (check-config, inspect)."""
        if self.cluster is not None:
            with translate_errors("read the cluster's nodes"):
                return self.cluster.members()
        if self.topology is None:
            return None
        with translate_errors("ask the sentinels"):
            return self.topology.members()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisBroker:
        """A broker configured entirely by settings (what the worker and the CLI use)."""
        return cls(JSONTransport(settings.worker.max_payload_bytes), settings=settings)

    # --- lifecycle -----------------------------------------------------------------------------

    def ping(self) -> None:
        """Redis answers (a worker's connect). Without redis.cluster, the server must not be a
        cluster node: a worker would serve the queues of that node's slots and fail on the
        others', so it is refused at once (ClusterMismatch: exit 78)."""
        self.follow_failovers()
        with translate_errors("PING"):
            self.redis.ping()
            if self.cluster is None:
                self._refuse_a_cluster_node()

    def _refuse_a_cluster_node(self) -> None:
        try:
            enabled = self.redis.info("cluster").get("cluster_enabled")
        except redis_errors.ResponseError:  # INFO renamed or not allowed by the ACL: a MOVED says it later
            return
        if enabled:
            raise ClusterMismatch(
                f"the server at {self.where} is a Redis Cluster node: set redis.cluster = true "
                "(RedisBroker(cluster=True))"
            )

    def load_scripts(self) -> None:
        """Load every script now, so a broken one fails at worker start, not on the first task
        (on a cluster: on every primary; a node that lacks one later loads it on NOSCRIPT)."""
        with translate_errors("SCRIPT LOAD"):
            if self.cluster is not None:
                self._load_on_cluster()
                return
            for script in self._scripts.values():
                script.sha = self.redis.script_load(script.script)

    def _load_on_cluster(self) -> None:
        """Load the scripts on every primary that answers. One that does not (its shard down,
        or failing over) is left out: its queues' calls load them there on NOSCRIPT once it
        answers, and a worker sets those queues aside meanwhile. None answering raises."""
        assert self.cluster is not None
        self.cluster.refresh()  # (a worker loads them as it connects: after a failover too)
        nodes = self.cluster.primaries()
        down: list[str] = []
        for node in nodes:
            try:
                self._load_on(self.cluster.client(node))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                if len(down) == len(nodes) - 1:
                    raise  # (no primary answered)
                down.append(f"{node} ({exc})")
        if down:
            self.cluster.stale = True
            log.warning("Redis Cluster: scripts not loaded on %s: not answering", ", ".join(down))

    def check_queue_node(self, queue: str) -> None:
        """On a cluster: ask the primary of `queue`'s slot whether it serves it, once (no
        retry, 0.5 s; ClusterRoute.probe), and raise BrokerUnavailable if it does not: how a
        worker tells whether a queue it set aside can be taken back without stalling its
        other queues, nor taking back one whose claims would only meet CLUSTERDOWN again."""
        assert self.cluster is not None
        with translate_errors(f"check the node of queue {queue}"):
            try:
                self.cluster.probe(self.cluster.primary_of_queue(queue), queue_keys(queue).ready)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ClusterDownError) as exc:
                self.cluster.stale = True  # (the next check reads the slot map: a replica may have taken over)
                raise redis_errors.ConnectionError(f"the node of queue {queue} does not serve it: {exc}") from exc

    def node_of(self, queue: str) -> tuple[int, str] | None:
        """On a cluster: the slot of `queue`'s keys and the primary serving it now (inspect), so
        an operator sees which node a hot queue loads; None on a single Redis or with sentinels."""
        if self.cluster is None:
            return None
        with translate_errors(f"find the node of queue {queue}"):
            return queue_slot(queue), self.cluster.primary_of_queue(queue)

    def _client_of(self, queue: str) -> redis.Redis:
        """The client for plain commands on `queue`'s keys: on a cluster, a client of the node
        of its slot (so a pipeline may carry TIME or be a transaction, as on one Redis)."""
        if self.cluster is None:
            return self.redis
        with translate_errors(f"find the node of queue {queue}"):  # (the first use reads the slot map)
            return self.cluster.client(self.cluster.primary_of_queue(queue))

    def _load_on(self, client: redis.Redis, _sha: str = "") -> None:
        for script in self._scripts.values():
            script.sha = client.script_load(script.script)

    def forget_connections(self) -> None:
        """In a forked child: drop the parent's connections without closing them (a socket
        shared by two processes interleaves their replies; see pool_child)."""
        if self.cluster is not None:
            self.cluster.forget_connections()
            return
        for client in (self.redis, self.blocking_redis):
            client.connection_pool.reset()

    def eviction_policy(self) -> str:
        with translate_errors("CONFIG GET"):
            try:
                reply = self._first_answer(lambda client: client.config_get("maxmemory-policy"))
            except redis_errors.ResponseError:  # CONFIG may be renamed or forbidden by ACL
                return "unknown"
        return _text(next(iter(reply.values()), "unknown"))

    def _first_answer(self, ask: Callable[[redis.Redis], Any]) -> Any:
        """`ask` Redis; on a cluster, the first primary that answers (a shard may be down)."""
        if self.cluster is None:
            return ask(self.redis)
        nodes = self.cluster.primaries()
        for node in nodes[:-1]:
            with contextlib.suppress(redis_errors.ConnectionError, redis_errors.TimeoutError):
                return ask(self.cluster.client(node))
        return ask(self.cluster.client(nodes[-1]))

    def close(self) -> None:
        for watch in self._watches:
            watch.stop()
        self._watches = []  # (a broker used again after close() starts fresh ones)
        if self.cluster is not None:
            self.cluster.close()
            return
        self.redis.close()
        self.blocking_redis.close()

    # --- scripts -------------------------------------------------------------------------------

    def _pipelined(
        self, what: str, calls: Sequence[tuple[str, list[str], list[Any]]], *, replicated: bool = False
    ) -> list[Any]:
        """Several scripts in one round trip, by SHA. Scripts missing after a Redis restart (or
        on a new primary: the script cache is per server) are loaded and the whole lot is sent
        again: a NOSCRIPT reply means that script did not run. An error reply from any script
        raises, after every reply has been read. `replicated`: with min_replicas_acked, a WAIT
        follows in the same round trip, and fewer replicas than that raise NotReplicated."""
        replies, acked = self._round_trip(what, calls, wait=replicated and self.min_replicas_acked > 0)
        if acked is not None:
            self._check_replicated(what, acked)
        return replies

    def _round_trip(
        self, what: str, calls: Sequence[tuple[str, list[str], list[Any]]], *, wait: bool
    ) -> tuple[list[Any], int | None]:
        """_pipelined's round trip; with `wait`, a WAIT for min_replicas_acked replicas after
        the scripts, and how many acknowledged (else None)."""
        if self.cluster is not None:
            return self._round_trip_on_cluster(what, calls, wait)
        if self.topology is not None:
            self.follow_failovers()  # (a producer may never block nor ping)
        for attempt in (1, 2):
            # (built again after a reload: loading sets each script's SHA)
            commands: list[tuple[Any, ...]] = [
                ("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args) for name, keys, args in calls
            ]
            if wait:
                commands.append(("WAIT", self.min_replicas_acked, int(self.replica_ack_timeout * 1000)))
            with translate_errors(what):
                try:
                    replies = exchange(self.redis, commands)
                except redis_errors.NoScriptError:
                    if attempt == 2:
                        raise
                    self.load_scripts()
                    continue
            return replies, (int(replies.pop()) if wait else None)
        raise AssertionError("unreachable")

    def _round_trip_on_cluster(
        self, what: str, calls: Sequence[tuple[str, list[str], list[Any]]], wait: bool
    ) -> tuple[list[Any], int | None]:
        """_round_trip on a cluster: each call to the primary of its queue's slot (cluster.py);
        with `wait`, a WAIT after each node's calls, the fewest acks counting."""
        assert self.cluster is not None
        commands = [("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args) for name, keys, args in calls]
        slots = [slot_of(keys[0]) for _name, keys, _args in calls]
        tail = ("WAIT", self.min_replicas_acked, int(self.replica_ack_timeout * 1000)) if wait else None
        with translate_errors(what):
            replies, acks = self.cluster.exchange(commands, slots, self._load_on, after_each_node=tail)
            raise_error_reply(replies)
        return replies, (min(int(acked) for acked in acks) if wait and acks else None)

    def _check_replicated(self, what: str, acked: int) -> None:
        if acked < self.min_replicas_acked:
            raise NotReplicated(
                f"{what}: stored on the primary, but {acked} of the {self.min_replicas_acked} replicas required "
                f"(redis.min_replicas_acked) acknowledged it within {self.replica_ack_timeout:g} s, so a failover "
                "now could lose it; sending it again is safe (the task id makes it idempotent)"
            )

    def _run(self, name: str, keys: QueueKeys, args: Sequence[Any], extra_keys: Sequence[str] = ()) -> Any:
        return self._pipelined(name, [(name, [*keys.as_list(), *extra_keys], list(args))])[0]

    @staticmethod
    def _enqueue_args(
        task_id: str,
        payload: bytes,
        *,
        delay_ms: int | None = None,
        at_ms: int | None = None,
        parents: Sequence[str] = (),
        dedup_key: str | None = None,
        reschedule: bool = False,
    ) -> list[Any]:
        return [
            task_id,
            payload,
            "" if delay_ms is None else int(delay_ms),
            "" if at_ms is None else int(at_ms),
            ",".join(parents),
            dedup_key or "",
            "reschedule" if reschedule else "new",
        ]

    def enqueue(self, queue: str, task_id: str, payload: bytes, **options: Any) -> EnqueueReply:
        """Store one task (options: delay_ms, at_ms, parents, dedup_key, reschedule)."""
        calls = [("enqueue", queue_keys(queue).as_list(), self._enqueue_args(task_id, payload, **options))]
        reply = self._pipelined(f"enqueue of task {task_id}", calls, replicated=True)[0]
        return EnqueueReply(_text(reply[0]), _text(reply[1]))

    def enqueue_many(self, queue: str, tasks: Sequence[tuple[str, bytes]]) -> list[EnqueueReply]:
        """Store many ready-to-run tasks in one round trip (a pipeline of enqueue scripts)."""
        keys = queue_keys(queue).as_list()
        calls = [("enqueue", keys, self._enqueue_args(task_id, payload)) for task_id, payload in tasks]
        replies = self._pipelined(f"enqueue of {len(calls)} tasks", calls, replicated=True)
        return [EnqueueReply(_text(reply[0]), _text(reply[1])) for reply in replies]

    def claim(
        self,
        queue: str,
        token: str,
        lease_ms: int,
        worker_id: str,
        held_due_ms: int = 0,
        batch: int = 1,
        *,
        woken: bool = False,
        handoffs: bool = False,
    ) -> list[Claim] | Idle:
        """Claim up to `batch` ready tasks (never more than half the backlog, rounded up, nor
        those promised to other woken workers). `woken`: this claim follows a wake-up.
        `handoffs`: this worker takes tasks handed to it while idle (see wait_for_work); the
        claim takes those waiting in its inbox too, and a worker that gets tasks leaves the
        idle set."""
        extra_keys, args = claim_call(queue, token, lease_ms, worker_id, held_due_ms, batch, woken, handoffs)
        reply = self._run("claim", queue_keys(queue), args, extra_keys)
        return parse_claim(queue, token, reply)

    def claim_and_begin(
        self, queue: str, token: str, lease_ms: int, worker_id: str, held_due_ms: int, batch: int, begin: list[Any]
    ) -> tuple[list[Claim] | Idle, list[Any]]:
        """claim(handoffs=True), and schedule_begin.lua with ARGV `begin` after it in the same
        round trip (see periodic.Schedules.begin_with_claim); returns both replies."""
        keys = queue_keys(queue)
        extra_keys, args = claim_call(queue, token, lease_ms, worker_id, held_due_ms, batch, False, True)
        calls = [
            ("claim", [*keys.as_list(), *extra_keys], args),
            ("schedule_begin", [*keys.as_list(), *keys.schedule_keys()], begin),
        ]
        claimed, begun = self._pipelined("claim", calls)
        return parse_claim(queue, token, claimed), [_text(begun[0]), *begun[1:]]

    def finish(
        self,
        queue: str,
        task_id: str,
        token: str,
        *,
        succeeded: bool,
        envelope: bytes,
        retry: RetryPlan | None = None,
        keep: bool = True,
    ) -> ScriptStatus:
        """Record the outcome, or schedule a retry (failed, with `retry` and retries left).
        `keep=False`: a success's envelope goes to its children but is not stored.

        Returns OK (recorded), RETRY (scheduled to run again), LATE (the lease was lost:
        nothing written) or GONE (the task no longer exists: nothing written).
        """
        statuses, _ = self.finish_many([FinishItem(queue, task_id, token, succeeded, envelope, retry, keep)])
        return statuses[0]

    def finish_many(
        self, finishes: Sequence[FinishItem], next_claim: NextClaim | None = None
    ) -> tuple[list[ScriptStatus], list[Claim] | Idle | None]:
        """Several finishes, then optionally a worker's next claim (as claim(handoffs=True)), in
        one pipelined round trip: one finish script per queue, each atomic. Returns each
        finish's status, then the claim's reply."""
        by_queue: dict[str, list[int]] = {}
        for index, item in enumerate(finishes):
            by_queue.setdefault(item.queue, []).append(index)
        calls: list[tuple[str, list[str], list[Any]]] = []
        for queue, indexes in by_queue.items():
            keys = queue_keys(queue)
            script_keys, args = keys.as_list(), list[Any](self._ttls())
            for index in indexes:
                item = finishes[index]
                script_keys.append(keys.done(item.id))
                args += self._finish_args(item)
            calls.append(("finish", script_keys, args))
        if next_claim is not None:
            nc = next_claim
            extra_keys, claim_args = claim_call(
                nc.queue, nc.token, nc.lease_ms, nc.worker_id, nc.held_due_ms, nc.batch, False, True
            )
            calls.append(("claim", [*queue_keys(nc.queue).as_list(), *extra_keys], claim_args))
        replies, acked = self._round_trip("finish", calls, wait=self.replicate_results)
        statuses = [ScriptStatus.OK] * len(finishes)
        for indexes, reply in zip(by_queue.values(), replies, strict=False):
            for index, status in zip(indexes, reply, strict=True):
                statuses[index] = script_status(status)
        if acked is not None and acked < self.min_replicas_acked:
            self._unreplicated(finishes, statuses, acked)
        claimed = None if next_claim is None else parse_claim(next_claim.queue, next_claim.token, replies[-1])
        return statuses, claimed

    def _unreplicated(self, finishes: Sequence[FinishItem], statuses: list[ScriptStatus], acked: int) -> None:
        """replicate_results and the WAIT fell short: the results are on the primary only. Not
        an error: the task did run and its result is stored. If a failover loses them, the new
        primary still holds the task leased (its finish went too), so the lease expires and it
        runs again: at least once holds, and this says which tasks may run twice."""
        written = [item.id for item, status in zip(finishes, statuses, strict=True) if status in _WRITTEN]
        if not written:
            return
        log.warning(
            "results of %d tasks stored on the primary, but %d of the %d replicas required "
            "(redis.min_replicas_acked) acknowledged them within %g s: a failover now could lose them, "
            "and those tasks would run again: %s",
            len(written), acked, self.min_replicas_acked, self.replica_ack_timeout, " ".join(written),
        )  # fmt: skip
        self.on_unreplicated(len(written))

    def landed(self, finishes: Sequence[FinishItem], statuses: list[ScriptStatus]) -> list[ScriptStatus]:
        """`statuses` of finishes sent again after a send that got no reply (a failover, a
        lost connection): a LATE whose task holds this very outcome was the first send's,
        which did land, so it is OK. (Safe either way: finish.lua never writes twice.)"""
        checked = list(statuses)
        for index, (item, status) in enumerate(zip(finishes, statuses, strict=True)):
            if status is ScriptStatus.LATE and self.outcome(item.queue, item.id)[1] == item.envelope:
                checked[index] = ScriptStatus.OK
        return checked

    def _ttls(self) -> tuple[int, int]:
        return int(self.result_ttl * 1000), int(self.dead_letter_ttl * 1000)

    @staticmethod
    def _finish_args(item: FinishItem) -> list[Any]:
        if item.succeeded:
            return [item.id, item.token, "succeeded", item.envelope, *_NO_RETRY_ARGS, 1 if item.keep else 0]
        plan = item.retry or NO_RETRY
        return [
            item.id,
            item.token,
            "failed",
            item.envelope,
            plan.max_retries,
            plan.base_ms,
            plan.cap_ms,
            repr(plan.jitter),
            plan.fixed_ms,
            1,  # an error is always kept: its dead letter
        ]

    def release(self, queue: str, task_id: str, token: str) -> bool:
        """Hand a claimed task back to the queue at once; False if the lease was no longer ours."""
        return script_status(self._run("release", queue_keys(queue), [task_id, token])) is ScriptStatus.OK

    def defer(self, queue: str, task_id: str, token: str, delay_ms: int, grace_ms: int) -> tuple[ScriptStatus, int]:
        """Give a claimed task back to run after `delay_ms`, for a worker that has its task
        (see defer.lua). Returns (DEFERRED | EXPIRED | LATE, first deferral time in ms)."""
        status, first = self._run("defer", queue_keys(queue), [task_id, token, delay_ms, grace_ms])
        return script_status(status), int(first)

    def forget_worker(self, queues: Sequence[str], worker_id: str) -> None:
        """Drop a stopping worker from the queues' workers sets, so `inspect` stops listing it
        as live at once (otherwise it is listed until two leases after its last claim)."""
        with translate_errors("forget worker"):
            pipe = self.redis.pipeline(transaction=False)
            for queue in queues:
                pipe.zrem(queue_keys(queue).workers, worker_id)
            pipe.execute()

    def renew(self, queue: str, task_id: str, token: str, lease_ms: int) -> bool:
        return script_status(self._run("renew", queue_keys(queue), [task_id, token, lease_ms])) is ScriptStatus.OK

    def cancel(
        self, queue: str, task_ids: Sequence[str], envelope: bytes, by: str, plans: Sequence[Any] = ()
    ) -> list[ScriptStatus]:
        """Cancel these tasks (cancel.lua; for a cascade, parents before children). Each gets
        CANCELLED, FINISHED (nothing changed) or UNKNOWN; or the one status CHANGED, nothing
        written, if a schedule changed since `plans` (occurrences.skip_plans) were made."""
        keys = queue_keys(queue)
        args = [int(self.result_ttl * 1000), envelope, by, len(plans) // 5, *plans, *task_ids]
        extra = [*keys.schedule_keys(), *(keys.done(i) for i in task_ids)]
        reply = self._run("cancel", keys, args, extra_keys=extra)
        return [script_status(status) for status in reply]

    def renew_many(self, leases: Sequence[Lease], lease_ms: int) -> list[ScriptStatus]:
        """Renew several (queue, id, token) leases in one pipelined round trip."""
        calls = [("renew", queue_keys(q).as_list(), [task_id, token, lease_ms]) for q, task_id, token in leases]
        return [script_status(reply) for reply in self._pipelined("renew", calls)]

    def revive(self, queue: str, task_ids: Sequence[str]) -> list[str]:
        """Put dead letters back in the queue to run again; returns the ids put back."""
        keys = queue_keys(queue)
        revived: list[str] = []
        for start in range(0, len(task_ids), 100):  # bounded work per script call
            batch = list(task_ids[start : start + 100])
            reply = self._run("revive", keys, batch, extra_keys=[keys.done(i) for i in batch])
            revived += [_text(i) for i in reply]
        return revived

    def rearm(self, queue: str, due_ms: int) -> None:
        self._run("rearm", queue_keys(queue), [due_ms])

    # --- waiting -------------------------------------------------------------------------------

    def wait_for_work(
        self,
        queues: Sequence[str],
        worker_id: str,
        timeout: float,
        *,
        handoffs_lease_ms: int | None = None,
        register: Sequence[str] = (),
    ) -> Wake | None:
        """Block (one BZPOPMIN) until this worker's wake key, a queue's marker or, with
        `handoffs_lease_ms`, one of its inboxes is pushed. First, in the same round trip, it
        joins the idle set of each queue in `register`: from then on a ready task on that queue
        may be handed straight to its inbox, leased for `handoffs_lease_ms`. On a cluster, one
        blocking call per queue, all at once (cluster_wait.py)."""
        if self.cluster is not None:
            timeout = max(0.001, min(timeout, self.max_block))
            return wait_on_cluster(
                self.cluster, queues, worker_id, timeout, BLOCKING_SOCKET_SLACK, handoffs_lease_ms, register
            )
        self.follow_failovers()
        markers = {queue_keys(q).marker: q for q in queues}
        inboxes = {} if handoffs_lease_ms is None else {queue_keys(q).inbox(worker_id): q for q in queues}
        wake_key = worker_wake_key(worker_id)
        timeout = max(0.001, min(timeout, self.max_block))
        commands: list[tuple[Any, ...]] = []
        if handoffs_lease_ms is not None:
            for queue in register:
                member = idle_registration(queue, worker_id, handoffs_lease_ms)
                commands.append(("ZADD", queue_keys(queue).idle, time.time() * 1000, member))
        # A stop comes first, then a task already leased to this worker, then a marker.
        commands.append(("BZPOPMIN", wake_key, *inboxes, *markers, timeout))
        with translate_errors("BZPOPMIN"):
            reply = exchange(self.blocking_redis, commands)[-1]
        if reply is None:
            return None
        key, member, score = _text(reply[0]), reply[1], float(reply[2])
        if key in inboxes:
            return Wake(queue=inboxes[key], score_ms=score, handed=decode_handed(inboxes[key], member))
        return Wake(queue=markers.get(key), score_ms=score)

    def leave(self, queues: Sequence[str], worker_id: str, lease_ms: int) -> list[Claim]:
        """Leave every queue's idle set, so nothing more is handed to this worker, and return
        the tasks already handed to it (still leased to it: a stopping worker releases them).

        Single-key commands, not a script or a MULTI: during a slot migration on a Redis
        Cluster a multi-key call waits (TRYAGAIN) until the migration ends, while these follow
        ASK at once. No atomicity is needed: once the ZREM is done no hand-off picks this
        worker, so the inbox only shrinks; ZPOPMIN reads and empties it in one command."""
        leaving = [("ZREM", queue_keys(q).idle, idle_registration(q, worker_id, lease_ms)) for q in queues]
        emptying = [("ZPOPMIN", queue_keys(q).inbox(worker_id), INBOX_MAX) for q in queues]
        with translate_errors("leave the idle set"):
            if self.cluster is None:
                replies = exchange(self.redis, [*leaving, *emptying])[len(queues) :]
            else:  # (a redirect may reorder one node's calls: the ZREMs go first, on their own)
                slots = [queue_slot(q) for q in queues]
                self._cluster_commands(leaving, slots)
                replies = self._cluster_commands(emptying, slots)
        return [
            decode_handed(q, member) for q, popped in zip(queues, replies, strict=True) for member in _members(popped)
        ]

    def _cluster_commands(
        self, commands: Sequence[tuple[Any, ...]], slots: Sequence[int], *, blocking: bool = False
    ) -> list[Any]:
        """Plain commands, each to the primary of its slot, redirections followed; an error
        reply raises (as a pipeline's does on one Redis). `blocking`: on the blocking pools."""
        assert self.cluster is not None
        replies = self.cluster.exchange(commands, slots, self._load_on, blocking=blocking)[0]
        raise_error_reply(replies)
        return replies

    def wake_worker(self, worker_id: str, queues: Sequence[str] = ()) -> None:
        """Make a worker's idle wait return now (the key expires if nobody pops it). On a
        cluster the worker waits on a wake key per queue: `queues` are the ones it waits on."""
        if self.cluster is not None:
            commands, slots = wake_commands(queues, worker_id)
            with translate_errors("wake worker"):
                self._cluster_commands(commands, slots)
            return
        key = worker_wake_key(worker_id)
        with translate_errors("wake worker"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(key, {"w": 0})
            pipe.expire(key, 60)
            pipe.execute()

    def watch(self, queue: str, task_id: str) -> tuple[str | None, bytes | None]:
        """Like outcome(), and a pending task's finish will wake wait_done() (only watched tasks
        pay for a done list)."""
        state, envelope = self._run("watch", queue_keys(queue), [task_id])
        return (_text(state) if state else None), (envelope or None)

    def wait_done(self, queue: str, task_id: str, timeout: float) -> bool:
        """Block until a watched task finishes or `timeout` passes; True if it finished.

        BLMOVE from the task's done list back onto itself returns to every waiter in turn
        and leaves the element in place, so any number of waiters wake on one finish.
        """
        self.follow_failovers()
        key = queue_keys(queue).done(task_id)
        timeout = max(0.001, min(timeout, self.max_block))
        if self.cluster is not None:
            command = ("BLMOVE", key, key, "RIGHT", "LEFT", timeout)
            with translate_errors("BLMOVE"):
                return self._cluster_commands([command], [slot_of(key)], blocking=True)[0] is not None
        with translate_errors("BLMOVE"):
            return self.blocking_redis.blmove(key, key, timeout, "RIGHT", "LEFT") is not None  # type: ignore[arg-type]

    # --- schedules (see periodic.py and scripts/schedule_*.lua) --------------------------------

    def server_time_ms(self) -> int:
        """Now on the Redis clock, in ms: the one clock slots are computed on."""
        with translate_errors("TIME"):
            seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def schedule_upsert(
        self, queue: str, name: str, spec: str, next_id: str, next_slot: int, payload: bytes, *, paused: str = ""
    ) -> tuple[str, str | None]:
        """Declare (spec) or pause/resume (paused "1"/"0", spec "" to keep the stored one) a
        schedule and make sure its next occurrence exists; see schedule_upsert.lua."""
        keys = queue_keys(queue)
        args = [name, spec, paused, next_id, next_slot, payload]
        status, pending = self._run("schedule_upsert", keys, args, keys.schedule_keys())
        return _text(status), (_text(pending) if pending else None)

    def schedule_begin(self, queue: str, args: Sequence[Any]) -> list[Any]:
        """Start a claimed occurrence (ARGV of schedule_begin.lua); returns its reply, the
        status (text) first."""
        keys = queue_keys(queue)
        reply = self._run("schedule_begin", keys, args, keys.schedule_keys())
        return [_text(reply[0]), *reply[1:]]

    def schedule_remove(self, queue: str, name: str) -> bool:
        keys = queue_keys(queue)
        return int(self._run("schedule_remove", keys, [name], keys.schedule_keys())) == 1

    # --- orphans: waiting tasks whose parents were never started ------------------------------

    def sweep_orphans(self, queue: str, orphan_ttl: float, batch: int = ORPHAN_SWEEP_BATCH) -> list[str]:
        """Dead-letter waiting tasks whose parents were never started within `orphan_ttl`
        seconds (see scripts/orphans.lua), among the `batch` oldest; returns their ids. One
        round trip (the Redis clock and the oldest waiting tasks), and the script only if one
        of them has waited that long."""
        keys = queue_keys(queue)
        ttl_ms = int(orphan_ttl * 1000)
        with translate_errors("sweep orphans"):
            pipe = self._client_of(queue).pipeline(transaction=False)
            pipe.time()
            pipe.zrange(keys.waiting, 0, batch - 1, withscores=True)
            (seconds, micros), oldest = pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        due = [_text(task_id) for task_id, since in oldest if since <= now_ms - ttl_ms]
        if not due:
            return []
        keep_ms = int(max(self.result_ttl, self.dead_letter_ttl) * 1000)
        args = [ttl_ms, keep_ms, f"{orphan_ttl:g}", *due]
        return [_text(i) for i in self._run("orphans", keys, args, extra_keys=[keys.done(i) for i in due])]

    def purge(self, queue: str) -> int:
        """Delete every key of a queue but its schedules (declarations, not tasks: their pending
        occurrences go, see Admin.purge); returns how many keys went."""
        keys = queue_keys(queue)
        kept = set(keys.schedule_keys())
        deleted = 0
        with translate_errors("purge"):
            client = self._client_of(queue)  # (on a cluster: SCAN on the node of its slot only)
            for key in client.scan_iter(match=keys.all_keys_pattern(), count=500):
                if _text(key) not in kept:
                    deleted += int(client.delete(key))
        return deleted


def _members(popped: list[Any]) -> list[bytes]:
    """The members of a ZPOPMIN reply: [member, score] pairs, or (RESP2 unparsed) members and
    scores alternating."""
    if popped and isinstance(popped[0], (list, tuple)):
        return [pair[0] for pair in popped]
    return list(popped[::2])
