"""How long Redis Cluster itself refuses the slots of the primaries that did not fail, after a
`kill -9` of one primary: the part of a worker's pause on its other queues that is Redis's own.

    .venv/bin/python bench/cluster_down_window.py [--runs 3] [--node-timeout-ms 2000]

A real 6-node cluster (tests/clusterkit.py; needs redis-cli and the test extras). Per run and
per `cluster-require-full-coverage` setting (yes, Redis's default, and no): a client writes a
key of another primary every 5 ms, one primary is SIGKILLed, and the window in which that
other primary answered CLUSTERDOWN is reported (from the first to the last refusal, in seconds
after the kill). The killed node is started again and the cluster settles before the next.

With `yes`, once the cluster marks the dead primary FAIL (about cluster-node-timeout after the
kill) every node refuses every slot until the dead primary's replica is elected; with `no`,
the other primaries go on serving.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # clusterkit

from clusterkit import RedisCluster


def refused_window(cluster: RedisCluster, coverage: str, watch_seconds: float = 8.0) -> tuple[float, float] | None:
    """(first, last) CLUSTERDOWN reply from a surviving primary, in seconds after the kill."""
    for port in cluster.live_ports():
        cluster.ask(port, "CONFIG", "SET", "cluster-require-full-coverage", coverage)
    victim, other = cluster.primaries()[:2]
    key = next(k for k in (f"k{i}" for i in range(100_000)) if cluster.primary_of_slot(_slot(cluster, k)) == other)
    client = redis.Redis(port=other, socket_timeout=1)
    killed = time.monotonic()
    cluster.stop_node(victim)
    refused = []
    while (elapsed := time.monotonic() - killed) < watch_seconds:
        try:
            client.set(key, 1)
        except redis.exceptions.ClusterDownError:
            refused.append(elapsed)
        time.sleep(0.005)
    client.close()
    cluster.restart(victim)
    cluster.wait_ok(60, replicas=3)
    return (refused[0], refused[-1]) if refused else None


def _slot(cluster: RedisCluster, key: str) -> int:
    return int(cluster.ask(cluster.live_ports()[0], "CLUSTER", "KEYSLOT", key))  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--node-timeout-ms", type=int, default=2000)
    args = parser.parse_args()
    cluster = RedisCluster(Path(tempfile.mkdtemp(prefix="cluster-down-")), node_timeout_ms=args.node_timeout_ms)
    cluster.start()
    try:
        print(f"cluster-node-timeout {args.node_timeout_ms} ms; a surviving primary's CLUSTERDOWN after a kill -9:")
        for run in range(1, args.runs + 1):
            for coverage in ("yes", "no"):
                window = refused_window(cluster, coverage)
                said = "never refused" if window is None else (
                    f"refused from {window[0]:.2f} s to {window[1]:.2f} s ({window[1] - window[0]:.2f} s)"
                )  # fmt: skip
                print(f"run {run}, cluster-require-full-coverage {coverage}: {said}", flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
