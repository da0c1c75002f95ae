"""minicelery's own figures on a private Redis (`make bench`), beyond what bench/compare.py
measures side by side with the peers: the floor (one Redis round trip here), the worker's Redis
commands per task, wasted wake-ups with 8 idle workers, and Redis memory after 100,000
finished tasks and after their result TTL. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.keys import QueueKeys
from minicelery.redis_server import RedisServer

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def wait_for(condition: Callable[[], object], timeout: float, poll: float = 0.005) -> float:
    """Poll until true; returns the time it became true (perf_counter)."""
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(poll)
    return time.perf_counter()


class Bench:
    def __init__(self, server: RedisServer) -> None:
        self.url = server.url
        self.port = server.port
        self.r = redis.Redis.from_url(self.url)
        self.runs = 0

    def app(self, queue: str) -> Client:
        import scenarios

        app = Client(RedisBroker(JSONTransport(), url=self.url, max_block=1), default_queue=queue)
        Client.instances.remove(app)
        for name in ("noop", "stamp", "node", "sleep_until_cancelled"):
            definition = scenarios.app.tasks[name]
            app.task(name=name)(definition.fn)
        return app

    @contextmanager
    def workers(self, queue: str, count: int, **settings: str) -> Iterator[list[subprocess.Popen[bytes]]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINICELERY_")}
        env.update({
            "PYTHONPATH": str(BENCH), "MINICELERY_REDIS__URL": self.url, "MINICELERY_TASKS": '["scenarios"]',
            "MINICELERY_WORKER__QUEUES": f'["{queue}"]', "MINICELERY_METRICS__ENABLED": "false",
            "MINICELERY_LOGGING__LEVEL": "WARNING", **settings,
        })  # fmt: skip
        procs = [
            subprocess.Popen([sys.executable, "-m", "minicelery", "worker"], env=env, stderr=subprocess.PIPE)
            for _ in range(count)
        ]
        try:
            yield procs
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=30)

    def queue(self, name: str) -> str:
        self.runs += 1
        return f"{name}-{self.runs}"

    def commands(self) -> int:
        return sum(int(v["calls"]) for v in self.r.info("commandstats").values())

    def wait_ready(self, queue: str, count: int) -> None:
        wait_for(lambda: self.r.zcard(QueueKeys(queue).workers) >= count, 30, poll=0.05)


def floor(bench: Bench) -> dict[str, float]:
    """One Redis round trip, two ways."""
    out: dict[str, float] = {}
    rb = shutil.which("redis-benchmark")
    if rb:
        csv = subprocess.run([rb, "-p", str(bench.port), "-c", "1", "-n", "20000", "-t", "ping", "--csv"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        rps = float(re.findall(r'"([0-9.]+)"', csv.splitlines()[1])[0])
        out["redis-benchmark round trip µs"] = 1e6 / rps
    samples = []
    for _ in range(3000):
        began = time.perf_counter()
        bench.r.ping()
        samples.append(time.perf_counter() - began)
    out["redis-py round trip µs (median)"] = statistics.median(samples) * 1e6
    return out


def drain(bench: Bench, processes: int, tasks: int = 20_000) -> dict[str, float]:
    queue = bench.queue("drain")
    app = bench.app(queue)
    began = time.perf_counter()
    app.start_many([app.tasks["noop"]() for _ in range(tasks)])
    enqueue_rate = tasks / (time.perf_counter() - began)
    keys = QueueKeys(queue)
    calls = bench.commands()
    with bench.workers(queue, processes):
        first = wait_for(lambda: bench.r.zcard(keys.expiry) > 0, 60)  # worker start-up not counted
        last = wait_for(lambda: bench.r.zcard(keys.expiry) >= tasks, 300)
    done_first = bench.r.zcard(keys.expiry)
    per_task = (bench.commands() - calls) / tasks
    return {"enqueue tasks/s": enqueue_rate, "drain tasks/s": (tasks - 1) / max(last - first, 1e-9),
            "redis commands per task": per_task, "checked": float(done_first == tasks)}  # fmt: skip


def latency(bench: Bench, samples: int = 200) -> dict[str, float]:
    queue = bench.queue("latency")
    app = bench.app(queue)
    gaps = []
    with bench.workers(queue, 1):
        bench.wait_ready(queue, 1)
        for _ in range(samples):
            sent = time.time()
            started = app.tasks["stamp"]().start().result(timeout=10)
            gaps.append((started - sent) * 1000)
            time.sleep(0.01)  # an idle worker each time: the next send finds it blocked on Redis
    return {"p50 ms": statistics.median(gaps), "p99 ms": statistics.quantiles(gaps, n=100)[98]}


def scheduled(bench: Bench, samples: int = 200) -> dict[str, float]:
    queue = bench.queue("scheduled")
    app = bench.app(queue)
    with bench.workers(queue, 1):
        bench.wait_ready(queue, 1)
        plan = []
        for i in range(samples):
            delay = 0.5 + 2.5 * i / samples
            plan.append((time.time() + delay, app.tasks["stamp"]().wait(delay)))
        late = [(handle.result(timeout=30) - due) * 1000 for due, handle in plan]
    return {"lateness p50 ms": statistics.median(late), "lateness p99 ms": statistics.quantiles(late, n=100)[98]}


def dependencies(bench: Bench, groups: int = 2000) -> dict[str, float]:
    queue = bench.queue("dag")
    app = bench.app(queue)
    node = app.tasks["node"]
    calls = bench.commands()
    with bench.workers(queue, 1) as _:
        bench.wait_ready(queue, 1)
        began = time.perf_counter()
        lasts = []
        for _g in range(groups):  # a -> b -> c, d after a, e after c and d: 5 tasks
            a = node()
            c = node(node(a))
            lasts.append(node(c, node(a)).start())
        for handle in lasts:
            handle.result(timeout=120)
        elapsed = time.perf_counter() - began
    tasks = groups * 5
    return {"tasks": tasks, "completion s": elapsed, "redis commands per task": (bench.commands() - calls) / tasks}


def idle_cost(bench: Bench) -> dict[str, float]:
    out: dict[str, float] = {}
    for count in (1, 8):
        queue = bench.queue("idle")
        with bench.workers(queue, count, MINICELERY_WORKER__IDLE_BLOCK_MAX="5"):
            bench.wait_ready(queue, count)
            time.sleep(1)  # let start-up traffic pass
            calls, began = bench.commands(), time.perf_counter()
            time.sleep(10)  # the measurement window
            out[f"{count} idle: redis commands/s"] = (bench.commands() - calls - 2) / (time.perf_counter() - began)
    queue = bench.queue("wakeups")
    app = bench.app(queue)
    with bench.workers(queue, 8) as procs:
        bench.wait_ready(queue, 8)
        handles = [app.tasks["noop"]().start() for _ in range(1000)]
        handles[-1].result(timeout=60)
        wait_for(lambda: bench.r.zcard(QueueKeys(queue).expiry) >= 1000, 60)
    wasted = sum(int(m) for p in procs for m in re.findall(rb"(\d+) wasted wake-ups", p.stderr.read()))  # type: ignore[union-attr]
    out["8 idle: wasted wake-ups per task"] = wasted / 1000
    return out


def memory(bench: Bench, tasks: int = 100_000) -> dict[str, float]:
    queue = bench.queue("memory")
    app = bench.app(queue)
    keys = QueueKeys(queue)
    baseline = int(bench.r.info("memory")["used_memory"])
    # A TTL long enough that all results are still there when the last task is done.
    ttl = max(10, tasks // 1500)
    with bench.workers(queue, 1, MINICELERY_WORKER__RESULT_TTL=str(ttl)) as procs:
        bench.wait_ready(queue, 1)
        rss = int(re.findall(r"VmRSS:\s+(\d+)", Path(f"/proc/{procs[0].pid}/status").read_text())[0])
        drained = lambda: bench.r.llen(keys.ready) == 0 and bench.r.zcard(keys.running) == 0  # noqa: E731
        for _ in range(0, tasks, 5000):  # in slices, so the backlog itself does not dominate memory
            app.start_many([app.tasks["noop"]() for _ in range(5000)])
            wait_for(drained, 120, poll=0.05)
        after = int(bench.r.info("memory")["used_memory"])
        wait_for(lambda: bench.r.zcard(keys.expiry) == 0, 300, poll=0.2)
        swept = int(bench.r.info("memory")["used_memory"])
    return {"idle worker RSS MB": rss / 1024, "redis MB baseline": baseline / 2**20,
            f"redis MB after {tasks} done": after / 2**20, "redis MB after result TTL": swept / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    with RedisServer() as server:
        bench = Bench(server)
        report: dict[str, dict[str, float]] = {"floor": floor(bench)}
        for processes in (1, 2):
            runs = [drain(bench, processes, 20_000 // scale) for _ in range(3)]
            report[f"drain, {processes} process(es), median of 3"] = {
                k: statistics.median(r[k] for r in runs) for k in runs[0]
            }
        report["latency (idle worker)"] = latency(bench, 200 // scale)
        report["scheduled"] = scheduled(bench, 200 // scale)
        report["dependencies"] = dependencies(bench, 2000 // scale)
        report["idle cost"] = idle_cost(bench)
        report["memory"] = memory(bench, 100_000 // scale)
    for scenario, figures in report.items():
        print(f"\n{scenario}")
        for name, value in figures.items():
            print(f"  {name:<40} {value:12.3f}")


if __name__ == "__main__":
    main()
