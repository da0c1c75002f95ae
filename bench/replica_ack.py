"""What min_replicas_acked costs an enqueue: start() rate and latency with N = 0 and N = 1, side
by side (interleaved runs, medians), against a private primary with one replica on loopback;
and what replicate_results costs a worker's finish (one task per finish, its p50 latency).

    cd bench && ../.venv/bin/python replica_ack.py [--tasks 2000] [--runs 3]
"""

import argparse
import statistics
import sys
import time

sys.path.insert(0, ".")
import redis

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.records import FinishItem
from minicelery.redis_server import RedisServer


def run(url: str, acked: int, tasks: int) -> tuple[float, float, float]:
    """(enqueues per second, p50 ms, p99 ms) of `tasks` start() calls one after the other."""
    broker = RedisBroker(JSONTransport(), url=url, result_ttl=600, max_block=1, min_replicas_acked=acked)
    app = Client(broker, default_queue=f"ack{acked}-{time.monotonic_ns()}")
    Client.instances.remove(app)

    @app.task
    def noop() -> None:
        return None

    took = []
    began = time.perf_counter()
    for _ in range(tasks):
        start = time.perf_counter()
        noop().start()
        took.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - began
    broker.close()
    took.sort()
    return tasks / elapsed, took[len(took) // 2] * 1000, took[int(len(took) * 0.99)] * 1000


def finish_p50(url: str, acked: int, tasks: int) -> float:
    """p50 ms of `tasks` finishes (claimed one by one), replicate_results with N = `acked`."""
    broker = RedisBroker(
        JSONTransport(), url=url, result_ttl=600, max_block=1,
        min_replicas_acked=acked, replicate_results=acked > 0,
    )  # fmt: skip
    queue = f"fin{acked}-{time.monotonic_ns()}"
    broker.enqueue_many(queue, [(f"t{i}", b"{}") for i in range(tasks)])
    took = []
    for number in range(tasks):
        (claim,) = broker.claim(queue, f"w:{number}", 60000, "w")  # type: ignore[misc]
        item = FinishItem(queue, claim.id, claim.token, True, b'{"ok":true,"value":null}', None)
        start = time.perf_counter()
        broker.finish_many([item])
        took.append(time.perf_counter() - start)
    broker.close()
    return statistics.median(took) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with RedisServer() as primary, RedisServer(extra_args=("--replicaof", "127.0.0.1", "0")) as replica:
        redis.Redis(port=replica.port).replicaof("127.0.0.1", primary.port)
        client = redis.Redis(port=primary.port)
        while client.info("replication").get("slave0", {}).get("state") != "online":
            time.sleep(0.05)
        figures: dict[int, list[tuple[float, float, float]]] = {0: [], 1: []}
        for number in range(args.runs):
            for acked in (0, 1):
                figures[acked].append(run(primary.url, acked, args.tasks))
                rate, p50, p99 = figures[acked][-1]
                print(f"run {number + 1} min_replicas_acked={acked}: {rate:.0f}/s p50 {p50:.3f} ms p99 {p99:.3f} ms")
        medians = {a: [statistics.median(f[i] for f in figures[a]) for i in range(3)] for a in (0, 1)}
        for acked, (rate, p50, p99) in medians.items():
            print(f"median min_replicas_acked={acked}: {rate:.0f} enqueues/s, p50 {p50:.3f} ms, p99 {p99:.3f} ms")
        print(f"N=1 / N=0: rate {medians[1][0] / medians[0][0]:.2f}, p50 latency {medians[1][1] / medians[0][1]:.2f}")
        finishes: dict[int, list[float]] = {0: [], 1: []}
        for number in range(args.runs):
            for acked in (0, 1):
                finishes[acked].append(finish_p50(primary.url, acked, args.tasks // 2))
                print(f"run {number + 1} replicate_results N={acked}: finish p50 {finishes[acked][-1]:.3f} ms")
        off, on = (statistics.median(finishes[a]) for a in (0, 1))
        print(f"median finish p50: off {off:.3f} ms, replicate_results N=1 {on:.3f} ms ({on / off:.2f}x)")


if __name__ == "__main__":
    main()
