"""`make bench` must keep running: minicelery's adapter to the side-by-side benchmark
(bench/peers/scenario.py, the same harness every peer runs in) on tiny sizes. The peers
themselves need their own venvs (PyPI) and minutes each, so only `make bench` runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minicelery.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_redis_url() -> object:
    with RedisServer() as server:  # its own: every scenario starts with FLUSHDB
        yield server.url


def scenario(url: str, *args: str) -> dict[str, float]:
    run = run_bench("peers/scenario.py", str(Path(sys.executable).parent), "minicelery_peer", url, *args)
    figures: dict[str, float] = json.loads(run.stdout.splitlines()[-1])
    return figures


@pytest.mark.slow
def test_minicelery_runs_every_side_by_side_scenario(bench_redis_url: str) -> None:
    drain = scenario(bench_redis_url, "drain", "300", "2")
    assert drain["drain tasks/s"] > 0 and drain["enqueue tasks/s"] > 0
    assert 0 < drain["redis commands per task, drain"] < 50
    latency = scenario(bench_redis_url, "latency", "5")
    assert 0 < latency["p50 ms"] <= latency["p99 ms"]
    scheduled = scenario(bench_redis_url, "scheduled", "4")
    assert 0 <= scheduled["lateness p50 ms"] <= scheduled["lateness p99 ms"]  # never early
    dag = scenario(bench_redis_url, "dependencies", "20")
    assert dag["completion s"] > 0
    pool = scenario(bench_redis_url, "pool", "300", "5")  # `worker -c 2`: its POOL_WORKER
    assert pool["drain tasks/s"] > 0 and pool["processes"] == 3  # the supervisor and its 2 children
    assert 0 < pool["idle p50 ms"] <= pool["idle p99 ms"]
    memory = scenario(bench_redis_url, "memory", "50")
    assert memory["redis bytes per pending task"] > 0 and memory["redis bytes per scheduled task"] > 0


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run bench/`script` with `args` to completion; it must succeed."""
    command = [sys.executable, str(REPO / "bench" / script), *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def test_the_pool_benchmark_runs_every_mode_on_tiny_sizes() -> None:
    run = run_bench("pool.py", "--tasks", "200", "--runs", "1", "--pings", "5")
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "tasks/s" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1 process", "-c 2", "2 processes"]


def test_the_pool_metrics_benchmark_runs_on_tiny_sizes() -> None:
    run = run_bench("pool_metrics.py", "--tasks", "200", "--runs", "1", "--children", "2")
    rows = [line.split("|")[1:3] for line in run.stdout.splitlines() if line.startswith("| 2 ")]
    assert [[cell.strip() for cell in row] for row in rows] == [["2", "off"], ["2", "on"]]
