"""Redis Sentinel against a real set (tests/sentinelkit.py): settings, a worker and a producer
following the primary across a planned failover, READONLY and NOSCRIPT on the new primary,
and durable enqueues (min_replicas_acked)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import worktasks
from conftest import Workers, wait_until
from helpers import drain
from sentinelkit import MASTER, SentinelSet

from minicelery import BrokerUnavailable, Client, JSONTransport, NotReplicated, RedisBroker
from minicelery.errors import ConfigError
from minicelery.keys import QueueKeys
from minicelery.queue_reads import stored_payload
from minicelery.records import FinishItem, ScriptStatus
from minicelery.redis_server import RedisServer
from minicelery.settings import load_settings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    cluster = SentinelSet(tmp_path_factory.mktemp("sentinel")).start()
    yield cluster
    cluster.stop()


def sentinel_app(cluster: SentinelSet, queue: str, **options: Any) -> Client:
    broker = RedisBroker(
        JSONTransport(),
        url="redis://ignored:1/0",  # the sentinels say where the primary is
        result_ttl=600,
        max_block=1,
        sentinels=cluster.addresses,
        sentinel_master=MASTER,
        **options,
    )
    app = Client(broker, default_queue=queue)
    Client.instances.remove(app)
    worktasks.register(app)
    return app


def sentinel_env(pool: Workers, cluster: SentinelSet, **settings: str) -> dict[str, str]:
    """A worker's environment for the Sentinel set. Its redis.url's host is not used by the
    broker (the sentinels name the primary); worktasks count their runs there (pool's url)."""
    return pool.env(
        MINICELERY_REDIS__SENTINELS=str(cluster.addresses).replace("'", '"'),
        MINICELERY_REDIS__SENTINEL_MASTER=MASTER,
        **settings,
    )


def test_sentinel_settings_are_checked_and_each_problem_names_the_setting(tmp_path: Path) -> None:
    cases = {
        'sentinels = ["10.0.0.5"]': "redis.sentinels",
        'sentinels = ["10.0.0.5:26379"]': "redis.sentinel_master must name",
        'sentinel_master = "mc"': "lists no sentinel",
        'sentinels = ["a:1"]\nsentinel_master = "mc"\nurl = "unix:///run/redis.sock"': "cannot be unix://",
        "min_replicas_acked = -1": "redis.min_replicas_acked",
        "min_replicas_acked = 1\nreplica_ack_timeout = 5": "must be below redis.socket_timeout",
        "replicate_results = true": "redis.replicate_results needs redis.min_replicas_acked",
    }
    for body, expected in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(f"[redis]\n{body}\n")
        with pytest.raises(ConfigError, match=expected):
            load_settings(path)
    path.write_text('[redis]\nsentinels = ["10.0.0.5"]\n')  # and the worker exits 78, naming the setting
    result = subprocess.run(
        [sys.executable, "-m", "minicelery", "worker", "--config", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 78 and "redis.sentinels" in result.stderr and "host:port" in result.stderr


def test_the_sentinels_password_comes_from_the_setting_its_file_or_the_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sentinel-password").write_text("from-credential\n")
    (tmp_path / "file").write_text("from-file\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    path = tmp_path / "tasks.toml"
    base = '[redis]\nsentinels = ["127.0.0.1:26379"]\nsentinel_master = "mc"\n'
    for extra, expected in (
        ("", "from-credential"),
        (f'sentinel_password_file = "{tmp_path / "file"}"\n', "from-file"),
        ('sentinel_password = "inline"\n', "inline"),
    ):
        path.write_text(base + extra)
        assert load_settings(path).redis.sentinel_options()["password"] == expected


def test_check_config_and_inspect_show_the_primary_and_replicas(sentinel_set: SentinelSet, tmp_path: Path) -> None:
    path = tmp_path / "tasks.toml"
    addresses = ", ".join(f'"{a}"' for a in sentinel_set.addresses)
    path.write_text(f'[redis]\nsentinels = [{addresses}]\nsentinel_master = "{MASTER}"\nsentinel_password = "s3"\n')
    primary = f"127.0.0.1:{sentinel_set.primary_port()}"
    for command in ("check-config", "inspect"):
        result = subprocess.run(
            [sys.executable, "-m", "minicelery", command, "--config", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        out = result.stdout + result.stderr
        assert f"primary {primary}, replicas 127.0.0.1:" in out and "s3" not in out
    result = subprocess.run(
        [sys.executable, "-m", "minicelery", "inspect", "--json", "-q", "a", "-q", "b", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    replicas = {f"127.0.0.1:{n.port}" for n in sentinel_set.nodes} - {primary}
    for queue in ("a", "b"):
        seen = report[queue]["sentinel"]
        assert seen["master"] == MASTER and seen["primary"] == primary and set(seen["replicas"]) == replicas


def test_a_worker_and_a_waiter_follow_a_planned_failover(
    sentinel_set: SentinelSet, redis_url: str, tmp_path: Path
) -> None:
    """The worker is blocked idle and a .result() waiter waits when SENTINEL FAILOVER moves the
    primary: both notice (the old primary drops them, or +switch-master shuts their sockets)
    and carry on against the new one; the scripts are loaded there on NOSCRIPT."""
    queue = f"s-{uuid.uuid4().hex[:8]}"
    app = sentinel_app(sentinel_set, queue)
    pool = Workers(redis_url, queue, tmp_path)
    try:
        worker = pool.start(env=sentinel_env(pool, sentinel_set, MINICELERY_WORKER__IDLE_BLOCK_MAX="5"))
        pool.wait_ready(worker)
        assert app.tasks["echo"]("before").start().result(timeout=30) == "before"
        parent = app.tasks["sleep_for"](1.5)  # runs across the failover
        handle = app.tasks["echo"](parent).start()
        got: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: got.update(value=handle.result(timeout=60)))
        waiter.start()
        wait_until(lambda: handle.state in ("waiting", "ready", "running"), 10, "the child to be stored")
        old = sentinel_set.primary_port()
        sentinel_set.failover()
        moved_at = time.monotonic()
        waiter.join(timeout=60)
        assert got.get("value") == 1.5  # the waiter carried on against the new primary
        # The worker resumed on the new primary: a task sent now runs.
        assert app.tasks["echo"]("after").start().result(timeout=30) == "after"
        assert sentinel_set.primary_port() != old and worker.poll() is None
        print(f"resumed {time.monotonic() - moved_at:.2f} s after the failover")
    finally:
        pool.stop_all()
        app.broker.close()


def test_readonly_from_a_replica_counts_as_a_lost_primary(sentinel_set: SentinelSet) -> None:
    """A write that reaches a server that is (now) a replica gets READONLY: the broker reports
    it as Redis unavailable, so the worker reconnects (with sentinels, to the primary they
    name) instead of pausing on a Redis error; nothing is written. A blocking wait's UNBLOCKED
    (its server turned replica) is the same."""
    replica = sentinel_set.replica_port()
    broker = RedisBroker(JSONTransport(), url=f"redis://127.0.0.1:{replica}/0", result_ttl=60, max_block=1)
    queue = f"s-{uuid.uuid4().hex[:8]}"
    with pytest.raises(BrokerUnavailable, match=r"primary moved.*read only replica"):
        broker.enqueue(queue, "t1", b"{}")
    with pytest.raises(BrokerUnavailable, match="primary moved"):
        broker.wait_for_work([queue], "w1", 1, handoffs_lease_ms=1000, register=[queue])
    assert broker.outcome(queue, "t1") == (None, None)
    broker.close()


def test_waits_blocked_on_a_primary_made_replica_end_at_once_and_carry_on_once_it_is_primary() -> None:
    """REPLICAOF sent to a server while a worker's idle wait and a .result() waiter block on it
    (what Sentinel does to an old primary): Redis answers UNBLOCKED, and both end at once as
    Redis unavailable (the primary moved), not after their 30 s block; the same broker then
    waits again as soon as its server (with sentinels: the new one) is primary."""
    with RedisServer() as server, RedisServer() as other:
        broker = RedisBroker(JSONTransport(), url=server.url, result_ttl=60, max_block=30)
        queue = f"s-{uuid.uuid4().hex[:8]}"
        keys = QueueKeys(queue)
        ended: dict[str, BaseException | None] = {}

        def blocked(name: str, wait: Any) -> threading.Thread:
            def run() -> None:
                try:
                    wait()
                    ended[name] = None
                except BaseException as exc:
                    ended[name] = exc

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            return thread

        threads = [
            blocked("idle", lambda: broker.wait_for_work([queue], "w1", 30)),
            blocked("result", lambda: broker.wait_done(queue, "t1", 30)),
        ]
        admin = redis.Redis.from_url(server.url)
        wait_until(lambda: admin.info("clients")["blocked_clients"] == 2, 10, "both waits to block")
        admin.replicaof("127.0.0.1", other.port)
        for thread in threads:
            thread.join(timeout=10)
        assert set(ended) == {"idle", "result"}, "a wait stayed blocked on the demoted server"
        for exc in ended.values():
            assert isinstance(exc, BrokerUnavailable) and "UNBLOCKED" in str(exc), exc
        admin.replicaof("NO", "ONE")  # (with sentinels, the next connection finds the new primary)
        admin.zadd(keys.marker, {"m": 1})
        admin.rpush(keys.done("t1"), "done")
        assert broker.wait_for_work([queue], "w1", 5) is not None
        assert broker.wait_done(queue, "t1", 5)
        broker.close()
        admin.close()


def test_min_replicas_acked_waits_for_a_replica_and_says_when_none_holds_the_task(
    sentinel_set: SentinelSet,
) -> None:
    queue = f"s-{uuid.uuid4().hex[:8]}"
    app = sentinel_app(sentinel_set, queue, min_replicas_acked=1, replica_ack_timeout=0.5)
    handle = app.tasks["echo"]("held").start()
    primary = sentinel_set.primary_port()
    holding = [  # when start() returns, a replica holds the task already
        node.port
        for node in sentinel_set.nodes
        if node.port != primary and redis.Redis(port=node.port).hexists(f"minicelery:{{{queue}}}:payload", handle.id)
    ]
    assert holding
    strict = sentinel_app(sentinel_set, queue, min_replicas_acked=3, replica_ack_timeout=0.2)
    task = strict.tasks["echo"]("too few replicas")
    with pytest.raises(NotReplicated, match="of the 3 replicas required"):
        task.start()
    assert task.state == "created"  # not marked sent: start() again is safe
    assert app.handle(task.id).state == "ready"  # stored on the primary, as the error says
    app.broker.close()
    strict.broker.close()


def replica_holds(cluster: SentinelSet, key: str, field: str) -> list[int]:
    """The replicas (ports) that hold this hash field now."""
    primary = cluster.primary_port()
    return [n.port for n in cluster.nodes if n.port != primary and redis.Redis(port=n.port).hexists(key, field)]


def test_replicate_results_returns_once_a_replica_holds_the_result_and_only_warns_when_none_does(
    sentinel_set: SentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    """With replicate_results, a finish returns once min_replicas_acked replicas hold the
    result. When too few do (the replicas stopped), the finish still records the result on the
    primary and says so, naming the task, and counts it; it does not fail the task. A worker
    counts such results in minicelery_results_unreplicated_total."""
    wait_until(lambda: sentinel_set.replicas_online() >= 1, 30, "a replica in sync (after an earlier failover)")
    queue = f"s-{uuid.uuid4().hex[:8]}"
    keys = QueueKeys(queue)
    app = sentinel_app(sentinel_set, queue, min_replicas_acked=1, replica_ack_timeout=0.5, replicate_results=True)
    broker = app.broker
    shortfalls: list[int] = []
    broker.on_unreplicated = shortfalls.append
    broker.enqueue(queue, "kept", b"{}")
    broker.enqueue(queue, "short", b"{}")
    (kept,) = broker.claim(queue, "w:1", 5000, "w")  # type: ignore[misc]
    (short,) = broker.claim(queue, "w:2", 5000, "w")  # type: ignore[misc]
    item = FinishItem(queue, kept.id, kept.token, True, b'{"ok":true,"value":1}', None)
    assert broker.finish_many([item])[0] == [ScriptStatus.OK]
    assert replica_holds(sentinel_set, keys.result, kept.id)  # already, as the finish returned
    assert shortfalls == []

    handle = app.tasks["echo"]("by a worker").start()  # (for the worker below; the enqueue WAITs too)
    primary = sentinel_set.primary_port()
    replicas = [node.process for node in sentinel_set.nodes if node.port != primary and node.process is not None]
    for process in replicas:
        process.send_signal(signal.SIGSTOP)  # WAIT now gets none of the 1 replica asked for
    try:
        item = FinishItem(queue, short.id, short.token, True, b'{"ok":true,"value":2}', None)
        with caplog.at_level(logging.WARNING, logger="minicelery.broker"):
            assert broker.finish_many([item])[0] == [ScriptStatus.OK]
        assert shortfalls == [1]
        worker = drain(app)  # (in this process; it sets the broker's on_unreplicated to its metric)
    finally:
        for process in replicas:
            process.send_signal(signal.SIGCONT)
    assert worker.metrics.registry.get_sample_value("minicelery_results_unreplicated_total") == 1
    assert handle.result(timeout=5) == "by a worker"
    assert "0 of the 1 replicas required" in caplog.text and f"run again: {short.id}" in caplog.text
    assert app.handle(short.id).result(timeout=5) == 2  # the result is stored (on the primary)
    with pytest.raises(ValueError, match="replicate_results needs min_replicas_acked"):
        sentinel_app(sentinel_set, queue, replicate_results=True)
    broker.close()


def test_a_hand_off_lost_in_a_failover_never_reissues_its_fencing_token(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    """A failover to a replica that missed the last writes loses a hand-off, with its
    increment of the token counter. The task is handed again (here: its parent's finish is
    redone): the new token differs, so the first holder's finish is late and cannot settle
    the task the second holder runs."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=60, max_block=1)
    keys = QueueKeys(queue)
    broker.enqueue(queue, "parent", b"{}")
    broker.enqueue(queue, "child", b"{}", parents=["parent"])
    (parent,) = broker.claim(queue, "wx:1", 5000, "wx")  # type: ignore[misc]
    replica = {key: r.dump(key) for key in r.scan_iter(match=keys.all_keys_pattern())}

    def hand_child_to(worker: str) -> Any:
        seconds, micros = r.time()
        r.zadd(keys.workers, {worker: seconds * 1000 + micros // 1000})
        assert broker.wait_for_work([queue], worker, 0.001, handoffs_lease_ms=5000, register=[queue]) is None
        assert broker.finish(queue, "parent", parent.token, succeeded=True, envelope=b"{}") == "ok"
        wake = broker.wait_for_work([queue], worker, 1, handoffs_lease_ms=5000)
        assert wake is not None and wake.handed is not None and wake.handed.id == "child"
        return wake.handed

    first = hand_child_to("w1")
    r.delete(*r.scan_iter(match=keys.all_keys_pattern()))  # the failover: the replica's copy
    for key, value in replica.items():
        r.restore(key, 0, value)
    second = hand_child_to("w2")
    assert first.token != second.token
    assert broker.finish(queue, "child", first.token, succeeded=True, envelope=b"{}") == "late"
    assert broker.finish(queue, "child", second.token, succeeded=True, envelope=b"{}") == "ok"
    broker.close()


def test_an_enqueue_or_finish_sent_again_after_a_lost_reply_changes_nothing(
    redis_url: str, queue: str, r: redis.Redis
) -> None:
    """What a client resends when a failover swallowed the reply: the enqueue finds its task
    id stored ("exists"), the finish finds its token spent ("late", nothing written), and the
    worker counts that finish as its own (`landed`), not as a lost lease."""
    broker = RedisBroker(JSONTransport(), url=redis_url, result_ttl=60, max_block=1)
    keys = QueueKeys(queue)
    broker.enqueue(queue, "p", b"{}")
    broker.enqueue(queue, "c", b"{}", parents=["p"])
    assert broker.enqueue(queue, "p", b'{"other": 1}').status == "exists"
    assert stored_payload(r.hget(keys.payload, "p")) == b"{}" and r.llen(keys.ready) == 1
    (claim,) = broker.claim(queue, "w:1", 5000, "w")  # type: ignore[misc]
    item = FinishItem(queue, "p", claim.token, True, b'{"ok":true,"value":1}', None)
    assert broker.finish_many([item])[0] == [ScriptStatus.OK]
    again, _ = broker.finish_many([item])
    assert again == [ScriptStatus.LATE] and broker.landed([item], again) == [ScriptStatus.OK]
    other = FinishItem(queue, "p", claim.token, True, b'{"ok":true,"value":2}', None)
    assert broker.landed([other], [ScriptStatus.LATE]) == [ScriptStatus.LATE]  # not its outcome
    assert r.hget(keys.result, "p") == b'{"ok":true,"value":1}'
    assert r.lrange(keys.ready, 0, -1) == [b"c"]  # the child released once
    broker.close()
