"""Shared fixtures: a real Redis server for the session, a fresh queue per test, worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.keys import ROOT
from minicelery.redis_server import RedisServer

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
# MINICELERY_TEST_CLUSTER=1: the broker-level fixtures (redis_url, r, app, workers) use a real
# Redis Cluster (the `cluster` fixture) instead of one server, so a cross-slot access fails
# loudly (tests/test_cluster.py runs some test modules so).
ON_CLUSTER = bool(os.environ.get("MINICELERY_TEST_CLUSTER"))
CLI_ON: dict[str, str] = {"MINICELERY_REDIS__CLUSTER": "true"} if ON_CLUSTER else {}  # a CLI's env, made by hand
if ON_CLUSTER:  # every broker a test makes (many make their own) talks to the cluster
    _plain_init = RedisBroker.__init__

    def _cluster_init(self: RedisBroker, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("cluster", True)
        _plain_init(self, *args, **kwargs)

    RedisBroker.__init__ = _cluster_init  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """MINICELERY_TEST_REDIS_URL if set, else a private server on a free port for this session
    (with MINICELERY_TEST_CLUSTER: a node of the session's cluster)."""
    if ON_CLUSTER:
        yield request.getfixturevalue("cluster").url
        return
    url = os.environ.get("MINICELERY_TEST_REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client: Any = redis.RedisCluster.from_url(redis_url) if ON_CLUSTER else redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def queue(r: redis.Redis) -> Iterator[str]:
    """A queue name no other test uses; its keys are deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    for key in r.scan_iter(match=f"{ROOT}:{{{name}}}:*", count=1000):
        r.delete(key)


@pytest.fixture
def app(redis_url: str, queue: str) -> Iterator[Client]:
    import worktasks

    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=600, max_block=1, cluster=ON_CLUSTER)
    client = Client(broker, default_queue=queue)
    worktasks.register(client)
    yield client
    client.broker.close()
    Client.instances.remove(client)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real 6-node Redis Cluster (3 primaries, 3 replicas) for the session: a
    clusterkit.RedisCluster. Needs redis-cli (Debian: redis-tools)."""
    from clusterkit import RedisCluster

    if shutil.which("redis-cli") is None:
        unavailable("redis-cli is not installed (apt-get install redis-tools)")
    nodes = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


def on_node_of(r: Any, queue: str) -> dict[str, Any]:
    """Keyword arguments that send a keyless command of `r` to the node of `queue` on a
    cluster (MINICELERY_TEST_CLUSTER); none on one Redis."""
    return {"target_nodes": r.get_node_from_key(f"{ROOT}:{{{queue}}}:ready")} if ON_CLUSTER else {}


def wait_until(condition: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Workers:
    """Starts real `minicelery worker` processes on the test's queue; stops them afterwards."""

    def __init__(self, redis_url: str, queue: str, tmp_path: Path, cluster: bool = ON_CLUSTER) -> None:
        self.redis_url = redis_url
        self.cluster = cluster
        self.queue = queue
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, **settings: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("MINICELERY_") and key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
        }
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
                "MINICELERY_REDIS__URL": self.redis_url,
                "MINICELERY_TASKS": '["worktasks"]',
                "MINICELERY_WORKER__QUEUES": f'["{self.queue}"]',
                "MINICELERY_WORKER__IDLE_BLOCK_MAX": "1",
                "MINICELERY_WORKER__LEASE_SECONDS": "5",
                "MINICELERY_WORKER__SHUTDOWN_GRACE": "10",
                "MINICELERY_METRICS__ENABLED": "false",
                "MINICELERY_LOGGING__LEVEL": "INFO",
                **({"MINICELERY_REDIS__CLUSTER": "true"} if self.cluster else {}),
            }
        )
        env.update(settings)
        return env

    def start(
        self, *args: str, env: dict[str, str] | None = None, wrapper: Sequence[str] = (), **settings: str
    ) -> subprocess.Popen[bytes]:
        """A worker process; `wrapper` goes in front of its command line (e.g. faketime)."""
        log_path = self.tmp_path / f"worker-{len(self.procs)}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "minicelery", "worker", *args],
                env=env or self.env(**settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop_all() reaches a wrapper's child too
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @staticmethod
    def log(proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text()  # type: ignore[attr-defined]

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
        wait_until(lambda: "ready on queues" in self.log(proc) or proc.poll() is not None, timeout, "worker ready")
        assert proc.poll() is None, self.log(proc)

    def stop_all(self) -> None:
        """Kill every worker's process group: a wrapper such as faketime forks the worker, and
        killing the wrapper alone left it running, orphaned, after the session."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def workers(redis_url: str, queue: str, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(redis_url, queue, tmp_path)
    yield pool
    pool.stop_all()


def unavailable(reason: str) -> NoReturn:
    """A test cannot run here (a tool or root is missing). On a developer machine it is
    skipped, saying why. In CI (MINICELERY_REQUIRE_TOOLS=1, set by .ci/run, which provides
    everything) it fails, so a broken install step cannot pass as green."""
    if os.environ.get("MINICELERY_REQUIRE_TOOLS"):
        pytest.fail(reason)
    pytest.skip(reason)


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"needs root ({why})")


def require_tool(name: str, install: str) -> str:
    """The path of an outside tool the test needs (promtool, podman, …), on PATH or in this venv."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path:
        return path
    unavailable(f"{name} is not installed ({install})")


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """A Debian rootfs with systemd and python3 (tests/deploytools.py), built once per machine."""
    from deploytools import debian_rootfs

    require_root("systemd-nspawn, podman")
    return debian_rootfs()


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of this project and its dependencies, for installs that cannot reach PyPI."""
    from deploytools import build_wheelhouse

    return build_wheelhouse(tmp_path_factory.mktemp("wheels"))


# Scorecard rows the run's workers (pytest -n) sent back when they finished.
_WORKER_SCORECARDS: list[dict[str, Any]] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a worker of `pytest -n`: hand the fault suite's scorecard to the controller."""
    faultkit = sys.modules.get("faultkit")
    if hasattr(session.config, "workeroutput") and faultkit is not None:
        session.config.workeroutput["scorecard"] = json.dumps(faultkit.SCORECARD)


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_testnodedown(node: Any, error: Any) -> None:
    """In the controller of `pytest -n`: a worker finished; keep its scorecard rows."""
    _WORKER_SCORECARDS.extend(json.loads(getattr(node, "workeroutput", {}).get("scorecard", "[]")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's scorecard (tests/faults/), when it ran."""
    faultkit = sys.modules.get("faultkit")
    rows = [*(faultkit.SCORECARD if faultkit is not None else []), *_WORKER_SCORECARDS]
    if not rows:
        return
    terminalreporter.section("fault-injection scorecard")
    for row in rows:
        figures = ", ".join(f"{k}={v}" for k, v in row.items() if k != "scenario")
        terminalreporter.write_line(f"{row['scenario']:<34} {figures}")
