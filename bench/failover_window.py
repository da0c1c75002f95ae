"""Enqueues a planned failover (SENTINEL FAILOVER) loses, side by side (interleaved runs,
medians): clients as they are, which stop writing to the old primary at the leader's
+selected-slave, ~0.1 s before it sends REPLICAOF NO ONE, and clients that react only at
+failover-state-wait-promotion (REPLICAOF NO ONE sent), as before. The producers enqueue as
fast as they can (min_replicas_acked = 0), so the lost count is the time the old primary still
took writes, times the rate.

    cd bench && ../.venv/bin/python failover_window.py [--runs 3] [--producers 4]
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [".", "../tests"]
from sentinelkit import MASTER, SentinelSet  # noqa: E402  (tests/ is not a package)

from minicelery import JSONTransport, RedisBroker, sentinel  # noqa: E402
from minicelery.errors import MiniceleryError  # noqa: E402
from minicelery.keys import QueueKeys  # noqa: E402

VARIANTS = {  # name: the announcements after which connections wait for the promoted replica
    "+selected-slave": (sentinel.SELECTED_CHANNEL, sentinel.PROMOTING_CHANNEL),
    "wait-promotion only": (sentinel.PROMOTING_CHANNEL,),
}


def producer(cluster: SentinelSet, queue: str, stop: threading.Event, accepted: list[str]) -> None:
    broker = RedisBroker(
        JSONTransport(), url="redis://ignored:1/0", result_ttl=600, max_block=1,
        sentinels=cluster.addresses, sentinel_master=MASTER,
        connection_options={"socket_timeout": 2.0, "socket_connect_timeout": 2.0},
    )  # fmt: skip
    broker.follow_failovers()
    number = 0
    while not stop.is_set():
        task_id = f"{threading.get_ident()}-{number}"
        number += 1
        try:
            broker.enqueue(queue, task_id, b"{}")
        except MiniceleryError:
            continue  # not accepted
        accepted.append(task_id)
    broker.close()


def run(cluster: SentinelSet, producers: int) -> tuple[int, int]:
    """(lost, accepted) over one planned failover."""
    queue = f"fw-{time.monotonic_ns()}"
    stop = threading.Event()
    accepted: list[str] = []
    threads = [threading.Thread(target=producer, args=(cluster, queue, stop, accepted)) for _ in range(producers)]
    for thread in threads:
        thread.start()
    time.sleep(1)  # a steady stream before the failover (a pace, not a synchronisation)
    cluster.failover()
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join()
    cluster.wait_quiet()
    primary = cluster.client()
    held = primary.hmget(QueueKeys(queue).payload, accepted) if accepted else []
    primary.close()
    return sum(1 for value in held if value is None), len(accepted)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--producers", type=int, default=4)
    args = parser.parse_args()
    cluster = SentinelSet(Path(tempfile.mkdtemp(prefix="failover-window-"))).start()
    lost: dict[str, list[int]] = {name: [] for name in VARIANTS}
    try:
        for number in range(args.runs):
            for name, channels in VARIANTS.items():
                sentinel.PROMOTING_CHANNELS = channels  # read as each broker subscribes
                while cluster.replicas_online() != 2:
                    time.sleep(0.1)
                missing, total = run(cluster, args.producers)
                lost[name].append(missing)
                print(f"run {number + 1} {name}: lost {missing} of {total} accepted")
    finally:
        cluster.stop()
    for name, counts in lost.items():
        print(f"median {name}: {statistics.median(counts):g} lost per planned failover ({counts})")


if __name__ == "__main__":
    main()
