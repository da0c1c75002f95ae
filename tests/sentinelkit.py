"""A real Sentinel set on free loopback ports: 1 primary, 2 replicas and 3 sentinels (quorum 2,
down-after-milliseconds 1000 unless given, failover-timeout 30 s), as OPS-NOTES.md describes.
Used by tests/test_sentinel.py and the failover suite (tests/faults/test_failover.py)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import redis
from conftest import wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry

from minicelery.redis_server import RedisServer, find_server_binary, free_port

MASTER = "mc"
Replica = tuple[tuple[str, ...], tuple[str, ...]] | tuple[()]  # (server command, extra arguments), or ()
# Diskless full syncs at once (the default waits 5 s for more replicas to join one).
# DEBUG (SLEEP) from loopback only, for the failover suite.
NODE_ARGS = ("--repl-diskless-sync-delay", "0", "--enable-debug-command", "local")
DOWN_AFTER_MS = 1000
# Well over the time a failover takes, as Sentinel's docs advise (default 180 s): a failover
# whose promoted replica is seen as primary late, on a loaded machine, is not aborted and
# tried again with another replica. (A completed failover resets the sentinels' timers: the
# next fault is not held back by it.)
FAILOVER_TIMEOUT_MS = 30000


class SentinelSet:
    def __init__(
        self, directory: Path, down_after_ms: int = DOWN_AFTER_MS, replicas: tuple[Replica, ...] = ((), ())
    ) -> None:
        """`replicas`: each replica's (server command, extra arguments), e.g. under faketime."""
        self.directory = directory
        self.replicas = replicas
        self.down_after_ms = down_after_ms
        self.nodes: list[RedisServer] = []
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def start(self) -> SentinelSet:
        primary = RedisServer(directory=self._dir("n0"), extra_args=NODE_ARGS).start()
        self.nodes.append(primary)
        for i, replica in enumerate(self.replicas, start=1):
            command, extra = replica or ((), ())
            replicaof = (*NODE_ARGS, *extra, "--replicaof", "127.0.0.1", str(primary.port))
            node = RedisServer(directory=self._dir(f"n{i}"), extra_args=replicaof, command=command)
            self.nodes.append(node.start())
        for i in range(3):
            port = free_port()
            conf = self._dir(f"s{i}") / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {conf.parent}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            )
            proc = subprocess.Popen(
                [find_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.sentinels.append(proc)
            self.sentinel_ports.append(port)
        wait_until(self._settled, 30, "sentinels to see 2 replicas and each other")
        return self

    def _dir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _ask(self, port: int, *command: str) -> object:
        # No retries: redis-py's default (10, each after a socket timeout) makes one question
        # to a stopped server take 15 s.
        client = redis.Redis(port=port, socket_timeout=1, decode_responses=True, retry=Retry(NoBackoff(), 0))
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def _settled(self) -> bool:
        try:
            for port in self.sentinel_ports:
                state = self._ask(port, "SENTINEL", "MASTER", MASTER)
                info = state if isinstance(state, dict) else dict(zip(state[::2], state[1::2], strict=True))  # type: ignore[index]
                if int(info["num-slaves"]) < 2 or int(info["num-other-sentinels"]) < 2:
                    return False
            return self.replicas_online() == 2
        except redis.RedisError:
            return False

    def replicas_online(self) -> int:
        """How many replicas the primary streams to (their first sync done)."""
        port = self.primary_port()
        if port is None:
            return 0
        info = self.client(port).info("replication")
        return sum(1 for key, value in info.items() if key.startswith("slave") and value["state"] == "online")

    def primary_port(self) -> int | None:
        """The primary's port if every live sentinel agrees on it and it says it is primary."""
        try:
            answers = {tuple(self._ask(p, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)) for p in self.sentinel_ports}  # type: ignore[arg-type]
        except redis.RedisError:
            return None
        if len(answers) != 1:
            return None
        port = int(next(iter(answers))[1])
        try:
            role = self._ask(port, "ROLE")
        except redis.RedisError:
            return None
        return port if role[0] == "master" else None  # type: ignore[index]

    def replica_port(self) -> int:
        """A node that says it is a replica with its link to the primary up."""

        def synced_replica() -> int | None:
            for node in self.nodes:
                try:
                    info = self.client(node.port).info("replication")
                except redis.RedisError:
                    continue
                if info.get("role") == "slave" and info.get("master_link_status") == "up":
                    return node.port
            return None

        return int(wait_until(synced_replica, 30, "a synced replica"))  # type: ignore[call-overload]

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def client(self, port: int | None = None) -> redis.Redis:
        return redis.Redis(port=port or self.primary_port() or 0, socket_timeout=5)

    def failover(self) -> None:
        """A planned failover (SENTINEL FAILOVER): returns once a new primary is agreed on."""
        old = self.primary_port()
        self._ask(self.sentinel_ports[0], "SENTINEL", "FAILOVER", MASTER)
        self.wait_new_primary(old)

    def wait_new_primary(self, old: int | None, timeout: float = 30) -> int:
        """Until a quorum (2) of sentinels names a primary other than `old` that says it is
        primary (the third may lag for seconds: clients asking it first retry)."""
        port = wait_until(lambda: (p := self._quorum_primary()) not in (None, old) and p, timeout, "a new primary")
        return int(port)  # type: ignore[call-overload]

    def _quorum_primary(self) -> int | None:
        named: dict[int, int] = {}
        for sentinel in self.sentinel_ports:
            try:
                port = int(self._ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)[1])  # type: ignore[index]
            except redis.RedisError:
                continue
            named[port] = named.get(port, 0) + 1
        port = next((p for p, votes in named.items() if votes >= 2), None)
        try:
            return port if port is not None and self._ask(port, "ROLE")[0] == "master" else None  # type: ignore[index]
        except redis.RedisError:
            return None

    def signal_primary(self, sig: signal.Signals) -> int:
        port = self.primary_port()
        assert port is not None
        process = self.node(port).process
        assert process is not None
        os.kill(process.pid, sig)
        return port

    def restart(self, port: int) -> None:
        """Start a killed node again on its port, as a replica of the current primary."""
        node = self.node(port)
        if node.process is not None:
            node.process.wait()  # reap the killed one
        primary = self.primary_port()
        node.extra_args = (*NODE_ARGS, "--replicaof", "127.0.0.1", str(primary))
        node.start()

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)
            node.cleanup()

    def wait_quiet(self, timeout: float = 30) -> None:
        """Until every sentinel agrees on one primary that says it is primary."""
        wait_until(lambda: self.primary_port() is not None, timeout, "one agreed primary")
