"""What the fault-injection suite (tests/faults/) shares: a Redis with AOF that can be killed and
restarted on the same port, a network outage on that port (iptables on lo), and the scorecard
printed at the end of the session."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import Workers, require_root, require_tool

from minicelery import Client
from minicelery.errors import MiniceleryError
from minicelery.redis_server import RedisServer, free_port

# Filled by the fault tests, printed by conftest's pytest_terminal_summary.
SCORECARD: list[dict[str, object]] = []


def record(scenario: str, **figures: object) -> None:
    SCORECARD.append({"scenario": scenario, **figures})


@dataclass
class DurableRedis:
    """A Redis server with an append-only file, restartable on the same port from that file."""

    directory: Path
    fsync: str = "always"
    port: int = field(default_factory=free_port)
    server: RedisServer | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DurableRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ("--appendonly", "yes", "--appendfsync", self.fsync, "--aof-use-rdb-preamble", "yes")
        self.server = RedisServer(self.port, directory=self.directory, extra_args=args).start()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the AOF already holds survives."""
        assert self.server is not None
        self.server.stop(kill=True)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class Outage:
    """Cut the Redis port on loopback with iptables: DROP (packets vanish, like a dead link) or
    REJECT (connections reset at once, like a closed port)."""

    def __init__(self, port: int, how: str) -> None:
        assert how in ("DROP", "REJECT")
        extra = ["--reject-with", "tcp-reset"] if how == "REJECT" else []
        self.rule = ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", how, *extra]
        self.iptables = require_tool("iptables", "apt-get install iptables")
        require_root("iptables")

    def __enter__(self) -> Outage:
        subprocess.run([self.iptables, "-I", *self.rule], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([self.iptables, "-D", *self.rule], check=True)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class ChainProducer(threading.Thread):
    """Sends two-task chains (b after a, both `stamp_run`) to `app`'s default queue, one per
    `pace` seconds, until stopped; `accepted`: task id -> tag of every start() that returned,
    `sent_at`: tag -> when. A MiniceleryError is a refusal (never accepted, not counted); an
    exception of `counted_bugs` is kept in `crashed` and the stream goes on (any other ends
    the thread, and pytest fails the test)."""

    def __init__(
        self, app: Client, name_part: str, pace: float, counted_bugs: tuple[type[Exception], ...] = ()
    ) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.name_part = name_part
        self.pace = pace
        self.counted_bugs = counted_bugs
        self.accepted: dict[str, str] = {}
        self.sent_at: dict[str, float] = {}
        self.refused = 0
        self.crashed: list[str] = []
        self.running = threading.Event()
        self.running.set()
        self.sent = 0

    def run(self) -> None:
        stamp = self.app.tasks["stamp_run"]
        while self.running.is_set():
            tag = f"{self.name_part}-{self.sent}"
            self.sent += 1
            try:
                a = stamp(f"{tag}a")
                b = stamp(f"{tag}b", a)  # (a child is stored at once, waiting)
                b.start()
            except MiniceleryError:
                self.refused += 1  # never accepted: not counted (a failover in progress)
            except self.counted_bugs as exc:
                self.crashed.append(repr(exc))
            else:
                self.accepted.update({a.id: f"{tag}a", b.id: f"{tag}b"})
                self.sent_at[f"{tag}a"] = self.sent_at[f"{tag}b"] = time.time()
            time.sleep(self.pace)  # the stream's pace, not a synchronisation

    def stop(self) -> None:
        """End the stream (the chain being sent is finished first) and close its broker."""
        self.running.clear()
        self.join(timeout=30)
        self.app.broker.close()


def ready_workers(pool: Workers, env: dict[str, str], count: int = 3) -> list[subprocess.Popen[bytes]]:
    """`count` worker processes of `pool` started with `env`, each waited for until ready."""
    workers = [pool.start(env=env) for _ in range(count)]
    for worker in workers:
        pool.wait_ready(worker)
    return workers


BATCH = 16  # worker.batch_size (the default)


def tasks_held_at_once(workers: list[subprocess.Popen[bytes]]) -> int:
    """How many tasks the workers can hold at once (a leased batch, and a batch run but not
    yet stored, each): the most a fault may make run twice."""
    return len(workers) * 2 * BATCH
