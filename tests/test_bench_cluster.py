"""`make bench` must keep running: the cluster scale-out benchmark on tiny sizes (a real
6-node cluster and a plain Redis; 3 queues, on 3 primaries and on the plain Redis, once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_cluster_scale_benchmark_drains_on_a_cluster_and_on_one_redis() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "bench/cluster_scale.py"), "--tasks", "60", "--runs", "1", "--queues", "3",
         "--primaries", "3"],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip("| ") for row in rows[1:]] == ["single Redis", "cluster, 3 primaries"]
    assert all(float(row[1].replace(",", "")) > 0 for row in rows[1:])  # every setup drained its tasks
