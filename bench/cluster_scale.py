"""Scale-out on Redis Cluster: aggregate drain with the queues spread over 1, 2 and 3 primaries,
against one plain Redis with the same queues and workers, side by side in one run.

    .venv/bin/python bench/cluster_scale.py [--queues 6] [--tasks 30000] [--runs 5] [--primaries 1 2 3]

One queue lives in one slot, so on one primary: a cluster scales by spreading many queues.
A real 6-node cluster (tests/clusterkit.py: 3 primaries, 3 replicas; needs redis-cli and the
test extras) and a plain Redis; `--queues` queues placed by slot so that each primary in use
holds the same number (6: 6 on one, 3 + 3, or 2 + 2 + 2), one `minicelery worker` process per
queue (metrics off, batch 16), tasks with an empty body (what is measured is the queue's own
work: enqueue, claim, finish, result kept). Start-up and enqueueing are never timed: the
workers are stopped (SIGSTOP) while the tasks are sent, and timing starts at SIGCONT and ends
when every queue is empty. The setups alternate within each run, so drift hits all.

Per setup: tasks/s, and Redis CPU per task (used_cpu_sys + used_cpu_user from INFO before and
after, summed over the primaries, and over the replicas apart) for the enqueue and the drain,
the workers' CPU per task, and how busy the busiest Redis was during the drain (CPU seconds /
wall seconds: near 1.0 is a saturated Redis, which is single-threaded). From the CPU per task:
what one primary sustains on one core (1 / its CPU per task, enqueue + drain), for sizing a
cluster, and this box's ceiling (its cores / the CPU of everything a drained task costs:
worker, primary, replica), which says whether the box or Redis capped the drain.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.keys import QueueKeys
from minicelery.redis_server import RedisServer

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))  # clusterkit

SINGLE = "single Redis"


def setup_name(primaries: int) -> str:
    return f"cluster, {primaries} primar{'y' if primaries == 1 else 'ies'}"


# The workers import this module for its task (MINICELERY_TASKS = ["cluster_scale"]).
app = Client(RedisBroker(JSONTransport()))


@app.task
def noop() -> None:
    """An empty body: the drain measures the queue's own work."""


class Target:
    """Where one setup's queues live: the plain Redis or the cluster, and which nodes count."""

    def __init__(self, url: str, cluster: bool, primaries: list[int], replicas: list[int], queues: list[str]):
        self.url, self.cluster, self.queues = url, cluster, queues
        self.primaries, self.replicas = primaries, replicas

    def cpu(self) -> dict[int, float]:
        """port -> CPU seconds its redis-server used so far."""
        used = {}
        for port in self.primaries + self.replicas:
            info = redis.Redis(port=port).info("cpu")
            used[port] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        return used

    def flush(self) -> None:
        for port in self.primaries:
            redis.Redis(port=port).flushall()
        if self.cluster:  # a replica has the flush once its link caught up
            for port in self.replicas:
                while redis.Redis(port=port).dbsize():
                    time.sleep(0.01)


def place(cluster: Any, used: int, queues: int) -> list[str]:
    """`queues` queue names, queues / used on each of the first `used` primaries (by slot)."""
    from clusterkit import slot_of_queue

    owners = {port: [] for port in cluster.primaries()[:used]}  # type: ignore[var-annotated]
    ranges = [(a, b, int(n["port"])) for n in cluster._nodes() if n["primary"] for a, b in n["slots"]]
    number = 0
    while any(len(names) < queues // used for names in owners.values()):
        name = f"scale-{number}"
        number += 1
        slot = slot_of_queue(name)
        port = next(p for a, b, p in ranges if a <= slot <= b)
        if port in owners and len(owners[port]) < queues // used:
            owners[port].append(name)
    return [name for names in owners.values() for name in names]


@contextmanager
def targets(queues: int, spreads: list[int]) -> Iterator[dict[str, Target]]:
    """The plain Redis and the cluster, with the queues of each setup placed."""
    from clusterkit import RedisCluster

    with ExitStack() as stack, tempfile.TemporaryDirectory() as directory:
        single = stack.enter_context(RedisServer())
        cluster = RedisCluster(Path(directory)).start()
        stack.callback(cluster.stop)
        found = {SINGLE: Target(single.url, False, [single.port], [], place(cluster, 1, queues))}
        for used in spreads:
            names = place(cluster, used, queues)
            hosting = sorted({cluster.node_of_queue(q) for q in names})
            feeding = [cluster.replica_of(p) for p in hosting]
            found[setup_name(used)] = Target(cluster.url, True, hosting, feeding, names)
        yield found


def process_cpu(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds the processes used so far (utime + stime from /proc)."""
    ticks = 0
    for proc in procs:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_workers(target: Target, logs: Path) -> list[subprocess.Popen[bytes]]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MINICELERY_")}
    env.update(
        {
            "PYTHONPATH": str(BENCH),
            "MINICELERY_TASKS": '["cluster_scale"]',
            "MINICELERY_REDIS__URL": target.url,
            "MINICELERY_REDIS__CLUSTER": "true" if target.cluster else "false",
            "MINICELERY_METRICS__ENABLED": "false",
            "MINICELERY_LOGGING__LEVEL": "WARNING",
        }
    )
    procs = []
    for queue in target.queues:
        log = open(logs / f"{queue}.log", "ab")  # noqa: SIM115 (the child keeps it)
        env["MINICELERY_WORKER__QUEUES"] = f'["{queue}"]'
        procs.append(subprocess.Popen([sys.executable, "-m", "minicelery", "worker"], env=env, stdout=log, stderr=log))
    return procs


def wait_for(condition: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not met")
        time.sleep(0.02)


def run_setup(target: Target, tasks: int, logs: Path) -> dict[str, float]:
    """One drain of `tasks` tasks spread evenly over the setup's queues."""
    target.flush()
    reader: Any = redis.RedisCluster.from_url(target.url) if target.cluster else redis.Redis.from_url(target.url)
    procs = start_workers(target, logs)
    try:
        wait_for(lambda: all(reader.zcard(QueueKeys(q).workers) for q in target.queues))
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        broker = RedisBroker(JSONTransport(), url=target.url, cluster=target.cluster)
        before_enqueue = target.cpu()
        for queue in target.queues:
            client = Client(broker, default_queue=queue)
            Client.instances.remove(client)
            task = client.task(noop.fn)  # on this queue
            client.start_many([task() for _ in range(tasks // len(target.queues))])
        broker.close()
        before, workers_before = target.cpu(), process_cpu(procs)
        started = time.perf_counter()
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: all(not reader.llen(QueueKeys(q).ready) and not reader.zcard(QueueKeys(q).running)
                             for q in target.queues))  # fmt: skip
        elapsed = time.perf_counter() - started
        after, workers_after = target.cpu(), process_cpu(procs)
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.close()
    done = tasks // len(target.queues) * len(target.queues)

    def per_task(ports: list[int], start: dict[int, float], end: dict[int, float]) -> float:
        return sum(end[p] - start[p] for p in ports) / done * 1e6

    drain_cpu = {
        "worker": (workers_after - workers_before) / done * 1e6,
        "primary": per_task(target.primaries, before, after),
        "replica": per_task(target.replicas, before, after),
    }
    return {
        "tasks/s": done / elapsed,
        "primary CPU us/task, enqueue": per_task(target.primaries, before_enqueue, before),
        "primary CPU us/task, drain": drain_cpu["primary"],
        "replica CPU us/task": per_task(target.replicas, before_enqueue, after),
        "worker CPU us/task": drain_cpu["worker"],
        "busiest Redis CPU/wall, drain": max(after[p] - before[p] for p in target.primaries) / elapsed,
        # this box's cores over everything a drained task costs them: its drain's ceiling here
        "box ceiling tasks/s": (os.cpu_count() or 1) * 1e6 / sum(drain_cpu.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queues", type=int, default=6, help="a multiple of 6 spreads evenly over 1, 2 and 3")
    parser.add_argument("--tasks", type=int, default=30_000, help="per drain, over all queues")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--primaries", type=int, nargs="+", default=[1, 2, 3], help="the spreads to run (1 to 3)")
    args = parser.parse_args()
    if any(not 1 <= used <= 3 or args.queues % used for used in args.primaries):
        parser.error("--primaries: each 1 to 3, and each must divide --queues")
    logging.basicConfig(level=logging.ERROR)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the workers and servers
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")
    setups = [SINGLE, *(setup_name(used) for used in args.primaries)]
    samples: dict[str, list[dict[str, float]]] = {setup: [] for setup in setups}
    with targets(args.queues, args.primaries) as places, tempfile.TemporaryDirectory() as logs:
        for run in range(args.runs):
            for setup in setups:
                figures = run_setup(places[setup], args.tasks, Path(logs))
                samples[setup].append(figures)
                shown = "  ".join(f"{k} {v:,.2f}" for k, v in figures.items())
                print(f"run {run + 1} | {setup:<20} | {shown}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")
    print(report(samples, args))


def report(samples: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    """The markdown table of medians, and the run-by-run ratios to the single Redis."""
    single = [s["tasks/s"] for s in samples[SINGLE]]
    lines = [
        f"\nmedians of {args.runs} runs, {args.tasks:,} tasks over {args.queues} queues, 1 worker process per queue",
        "",
        "| setup | drain tasks/s | / single Redis (run by run) | primary CPU µs/task (enqueue + drain) "
        "| replica CPU µs/task | worker CPU µs/task | busiest Redis CPU/wall | this box's ceiling, tasks/s "
        "| one primary's core sustains, tasks/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setup, runs in samples.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        ratios = [r["tasks/s"] / s for r, s in zip(runs, single, strict=True)]
        cpu = med["primary CPU us/task, enqueue"] + med["primary CPU us/task, drain"]
        lines.append(
            f"| {setup} | {med['tasks/s']:,.0f} | {statistics.median(ratios):.2f}x "
            f"({', '.join(f'{x:.2f}' for x in ratios)}) | {cpu:.0f} ({med['primary CPU us/task, enqueue']:.0f} + "
            f"{med['primary CPU us/task, drain']:.0f}) | {med['replica CPU us/task']:.0f} "
            f"| {med['worker CPU us/task']:.0f} | {med['busiest Redis CPU/wall, drain']:.2f} "
            f"| {med['box ceiling tasks/s']:,.0f} | {1e6 / cpu:,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
