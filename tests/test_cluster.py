"""Redis Cluster against a real 6-node cluster (tests/clusterkit.py): queues on different
primaries, the idle wait per queue, slots that move (MOVED, ASK), the CLI, and the broker-level
test modules run again on the cluster (where a cross-slot access fails loudly)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterkit import LONG_BLOCKS, RedisCluster, cluster_app, idle_on, slot_of_queue, start_worker
from conftest import TESTS, Workers, wait_until
from helpers import drain

from minicelery import Client, RedisBroker
from minicelery.errors import ConfigError
from minicelery.keys import QueueKeys
from minicelery.settings import load_settings


@pytest.fixture
def spread(cluster: RedisCluster) -> list[str]:
    """Three queue names this test alone uses, each held by a different primary."""
    return cluster.queues_on_distinct_primaries(f"c{uuid.uuid4().hex[:8]}")


@pytest.fixture
def apps(cluster: RedisCluster, spread: list[str]) -> Iterator[list[Client]]:
    """A producer per queue of `spread` (a task's queue is its definition's)."""
    made = [cluster_app(cluster, queue) for queue in spread]
    yield made
    for app in made:
        app.broker.close()
        Client.instances.remove(app)


@pytest.fixture
def cluster_workers(cluster: RedisCluster, spread: list[str], tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(cluster.url, spread[0], tmp_path, cluster=True)
    yield pool
    pool.stop_all()


def test_cluster_settings_are_checked_and_each_problem_names_the_setting() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cluster": True, "sentinels": ["a:1"], "sentinel_master": "m"}, "cannot be used together"),
        ({"cluster_nodes": ["a:1"]}, "redis.cluster is not true"),
        ({"cluster": True, "cluster_nodes": ["a"]}, "host:port"),
        ({"cluster": True, "url": "unix:///run/redis.sock"}, "cannot be unix://"),
        ({"cluster": True, "url": "redis://a:1/3"}, "database 0"),
    ]
    for redis_settings, blamed in cases:
        with pytest.raises(ConfigError, match=blamed):
            load_settings(redis=redis_settings)
    with pytest.raises(ValueError, match="cannot be used together"):
        RedisBroker(url="redis://a:1/0", result_ttl=1, max_block=1, cluster=True, sentinels=["a:1"], sentinel_master="")


def test_a_worker_on_queues_of_three_primaries_runs_each_queues_task_graph(
    cluster: RedisCluster, spread: list[str], apps: list[Client], cluster_workers: Workers
) -> None:
    assert len({cluster.node_of_queue(queue) for queue in spread}) == 3
    proc = start_worker(cluster_workers, spread)
    wait_until(lambda: idle_on(cluster, spread), 20, "the worker idle on all three queues")
    totals = []
    for number, app in enumerate(apps):
        echo, add = app.tasks["echo"], app.tasks["add"]
        first = echo(number)
        totals.append(add(add(first, 10), echo(100)).start())  # handed to the idle worker
    assert [total.result(timeout=20) for total in totals] == [110, 111, 112]
    log = cluster_workers.log(proc)
    assert "CROSSSLOT" not in log and "Traceback" not in log, log


def test_an_idle_worker_on_three_primaries_wakes_for_each_queue_and_stops_at_once_on_sigterm(
    cluster: RedisCluster, spread: list[str], apps: list[Client], cluster_workers: Workers
) -> None:
    """Blocks of 300 s: only a wake-up can make it run a task or stop within the test's wait."""
    proc = start_worker(cluster_workers, spread, **LONG_BLOCKS)
    for app in reversed(apps):
        wait_until(lambda: idle_on(cluster, spread), 20, "the worker idle on all three queues")
        assert app.tasks["echo"](app.default_queue).start().result(timeout=20) == app.default_queue
    wait_until(lambda: idle_on(cluster, spread), 20, "the worker idle again")
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: proc.poll() is not None, 20, "the idle worker to stop on SIGTERM")
    assert proc.returncode == 0, cluster_workers.log(proc)


def test_a_slot_moved_by_hand_is_followed_by_producer_and_idle_worker(
    cluster: RedisCluster, spread: list[str], apps: list[Client], cluster_workers: Workers
) -> None:
    """MOVED: the producer's slot map is stale after the migration; the worker's blocked call
    (of up to 300 s) sits on the old owner, which answers it MOVED once the slot is gone
    (redis #2379). Both end up on the new owner; nothing is lost."""
    queue, app = spread[0], apps[0]
    proc = start_worker(cluster_workers, [queue], **LONG_BLOCKS)
    assert app.tasks["echo"](1).start().result(timeout=20) == 1  # keys now exist on the owner
    wait_until(lambda: idle_on(cluster, [queue]), 20, "the worker idle")
    source = cluster.node_of_queue(queue)
    target = next(port for port in cluster.primaries() if port != source)
    cluster.migrate_slot(slot_of_queue(queue), target)
    try:
        assert cluster.node_of_queue(queue) == target
        assert app.broker.depths(queue)["finished"] == 1  # a plain read follows MOVED too
        handles = [app.tasks["echo"](n).start() for n in range(5)]
        assert [handle.result(timeout=20) for handle in handles] == list(range(5))
        assert "Traceback" not in cluster_workers.log(proc)
    finally:
        cluster.migrate_slot(slot_of_queue(queue), source)


def tryagains(cluster: RedisCluster, port: int) -> int:
    stats: Any = cluster.ask(port, "INFO", "errorstats")
    return int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))


def test_an_enqueue_during_a_migration_follows_ask_and_waits_out_tryagain(
    cluster: RedisCluster, spread: list[str]
) -> None:
    """A queue's slot is migrating: the old owner answers ASK (the keys are not there), the
    importing node TRYAGAIN (a script's keys are split between the two nodes until the slot is
    handed over). The enqueue goes on retrying and lands once the migration ends."""
    queue = spread[0]
    app = cluster_app(cluster, queue)
    slot = slot_of_queue(queue)
    source = cluster.node_of_queue(queue)
    target = next(port for port in cluster.primaries() if port != source)
    before = tryagains(cluster, target)
    cluster.begin_migration(slot, target)
    sent: list[Any] = []
    try:
        sender = threading.Thread(target=lambda: sent.append(app.tasks["add"](app.tasks["echo"](2), 3).start()))
        sender.start()
        wait_until(lambda: tryagains(cluster, target) > before, 5, "the importing node to answer TRYAGAIN")
        assert not sent  # still retrying
        cluster.move_keys(slot, source, target)
    finally:
        cluster.end_migration(slot, source, target)
    sender.join(10)
    (total,) = sent
    drain(app)
    assert total.result(timeout=5) == 5
    assert cluster.ask(target, "HEXISTS", QueueKeys(queue).result, total.id) == 1  # a success: its result, no state
    app.broker.close()
    Client.instances.remove(app)


def run_cli(pool: Workers, queues: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    env = pool.env(MINICELERY_WORKER__QUEUES=json.dumps(queues))
    command = [sys.executable, "-m", "minicelery", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_the_cli_on_a_cluster_finds_each_queue_on_its_node(
    cluster: RedisCluster, spread: list[str], apps: list[Client], cluster_workers: Workers
) -> None:
    later, failing, done = apps
    pending = later.tasks["echo"]("later").wait(3600).start()
    dead = failing.tasks["boom"]("on purpose").start()
    ok = done.tasks["echo"]("fine").start()
    drain(failing)
    drain(done)

    checked = run_cli(cluster_workers, spread, "check-config")
    assert checked.returncode == 0 and "cluster: 3 primaries, 3 replicas" in checked.stderr, checked.stderr
    inspected = run_cli(cluster_workers, spread, "inspect")
    assert inspected.returncode == 0, inspected.stderr
    for queue in spread:  # each queue, then the node that serves it (spread: one per primary)
        where = f"  on primary 127.0.0.1:{cluster.node_of_queue(queue)} (slot {slot_of_queue(queue)})"
        assert re.search(rf"^queue {re.escape(queue)}: .*\n{re.escape(where)}$", inspected.stdout, re.M), (
            inspected.stdout
        )
    report = json.loads(run_cli(cluster_workers, spread, "inspect", "--json").stdout)
    assert {q: report[q]["node"] for q in spread} == {
        q: {"slot": slot_of_queue(q), "primary": f"127.0.0.1:{cluster.node_of_queue(q)}"} for q in spread
    }
    assert f"dead: {dead.id} boom" in inspected.stdout
    result = run_cli(cluster_workers, spread, "result", ok.id)
    assert result.returncode == 0 and "fine" in result.stdout, result
    cancelled = run_cli(cluster_workers, spread, "cancel", pending.id)
    assert cancelled.returncode == 0 and pending.state == "cancelled", cancelled
    retried = run_cli(cluster_workers, spread, "retry-dead")
    assert retried.returncode == 0 and dead.state == "ready", retried
    purged = run_cli(cluster_workers, spread, "purge", "-q", failing.default_queue, "--yes")
    assert purged.returncode == 0 and dead.state == "unknown", purged
    assert later.broker.depths(done.default_queue)["finished"] == 1  # other queues untouched

    for queue in spread:  # schedules are found on every primary (a SCAN of each)
        later.broker.schedule_upsert(queue, "nightly", '{"cron": "0 3 * * *"}', f"s-{queue}", 2**40, b"{}")
    assert set(spread) <= set(later.broker.schedule_queues())


def test_the_broker_tests_pass_on_a_cluster(tmp_path: Path) -> None:
    """test_scripts.py, test_dependencies.py, test_handoff.py (the hand-off writes an inbox
    key it reads from data; workers on two queues wait), test_cancel.py (cascades, the cancel
    and result commands over two queues) and test_fire_and_forget.py again, every broker on a
    cluster of their own (MINICELERY_TEST_CLUSTER=1, see conftest.py): a script touching a key
    outside its queue's slot, or a pipeline spanning nodes wrongly, fails there. About 40 s.
    (test_lifecycle.py is not among them: its tests restart or stop one Redis server.)"""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MINICELERY_", "PYTEST_"))}
    env["MINICELERY_TEST_CLUSTER"] = "1"
    modules = [
        str(TESTS / name)
        for name in (
            "test_scripts.py",
            "test_dependencies.py",
            "test_handoff.py",
            "test_cancel.py",
            "test_fire_and_forget.py",
        )
    ]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *modules]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout[-4000:]


def test_a_worker_or_cli_not_told_it_talks_to_a_cluster_says_so(
    cluster: RedisCluster, spread: list[str], tmp_path: Path
) -> None:
    queue = next(q for q in spread if cluster.node_of_queue(q) != cluster.live_ports()[0])  # not the url's node
    plain = Workers(cluster.url, queue, tmp_path, cluster=False)
    sent = run_cli(plain, [queue], "enqueue", "echo", '["x"]')
    assert sent.returncode != 0 and "set redis.cluster = true" in sent.stderr, sent
    # A worker whose queue lives on the url's own node would serve it and fail on the others':
    # it is refused at start instead, as a setting that retrying cannot fix.
    local = next(q for q in spread if cluster.node_of_queue(q) == cluster.live_ports()[0])
    worker = plain.start(MINICELERY_WORKER__QUEUES=json.dumps([local]))
    assert worker.wait(timeout=30) == 78, plain.log(worker)
    assert "is a Redis Cluster node: set redis.cluster = true" in plain.log(worker)


def test_cluster_set_against_a_plain_redis_is_a_configuration_error(redis_url: str, tmp_path: Path) -> None:
    """redis.cluster = true, redis.url a plain Redis: every command says so and exits 78 (EX_CONFIG),
    the worker too, rather than a traceback or waiting for a cluster forever."""
    wrong = Workers(redis_url, "q", tmp_path, cluster=True)
    for args in (["inspect"], ["check-config"], ["enqueue", "echo", '["x"]'], ["result", "someid"]):
        ran = run_cli(wrong, ["q"], *args)
        assert ran.returncode == 78 and "set redis.cluster = false" in ran.stderr, (args, ran)
        assert "Traceback" not in ran.stderr, ran.stderr
    worker = wrong.start()
    assert worker.wait(timeout=30) == 78, wrong.log(worker)
    assert "set redis.cluster = false" in wrong.log(worker)
