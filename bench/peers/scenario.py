"""One benchmark scenario for one task queue, run inside that queue's own virtualenv.

    python bench/peers/scenario.py VENV_BIN PEER_MODULE REDIS_URL SCENARIO [SIZE [PROCESSES | SAMPLES]]

bench/compare.py runs this once per (peer, scenario, run) and reads the JSON line it prints.
It needs only redis-py, so it works in every peer's venv. A peer module (bench/peers/*_peer.py)
gives, each with that library's own API:

    WORKER              the command line of one worker process
    SCHEDULER_WORKER    optional: the command line when a scheduler must run too (RQ)
    enqueue(n)          n tasks whose body is `INCR bench:done` (bulk API where there is one)
    send_stamp()        one task whose body pushes (start time - send time) onto bench:out
    schedule(due)       optional: one task due at `due` (epoch s) that pushes (start - due)
    dag(groups)         optional: groups of 5 tasks, a -> b -> c, d after a, e after c and d;
                        each e pushes onto bench:out
    POOL_WORKER         optional: the command line of the library's own multi-process mode
                        with 2 processes under one command (the `pool` scenario)

Every scenario starts from an empty Redis database and real worker processes, and times
only what it names: worker start-up is never counted.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
OUT = "bench:out"


def wait_for(condition: Callable[[], bool], timeout: float, workers: list[subprocess.Popen[bytes]]) -> float:
    deadline = time.perf_counter() + timeout
    while not condition():
        if any(w.poll() is not None for w in workers):
            raise RuntimeError("a worker exited")
        if time.perf_counter() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(0.002)
    return time.perf_counter()


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then wait for each; one that outlasts 20 s is killed."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


class Scenario:
    def __init__(self, venv_bin: str, module: str, url: str) -> None:
        self.venv_bin = venv_bin
        os.environ["BENCH_REDIS_URL"] = url
        self.r = redis.Redis.from_url(url)
        self.r.flushdb()
        self.peer: Any = importlib.import_module(module)

    @contextmanager
    def workers(self, count: int, command: list[str] | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
        # An outer PYTHONPATH stays, after this folder: an A/B run can put another tree's
        # minicelery in front of the installed one, for the workers too.
        path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PATH": self.venv_bin + os.pathsep + os.environ["PATH"], "PYTHONPATH": path}
        procs = [
            subprocess.Popen(
                command or self.peer.WORKER, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for _ in range(count)
        ]
        try:
            yield procs
        finally:
            stop(procs)

    def commands(self) -> int:
        return int(self.r.info("stats")["total_commands_processed"])

    def warm_up(self, workers: list[subprocess.Popen[bytes]]) -> None:
        """One task through each worker start: afterwards every worker is up and idle."""
        for _ in workers:
            self.peer.send_stamp()
        wait_for(lambda: self.r.llen(OUT) >= len(workers), 120, workers)
        self.r.delete(OUT)

    def next_out(self, workers: list[subprocess.Popen[bytes]], timeout: float = 30) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            popped = self.r.blpop([OUT], timeout=1)
            if popped:
                return float(popped[1])
            if any(w.poll() is not None for w in workers):
                raise RuntimeError("a worker exited")
        raise TimeoutError("no result")

    def drain(self, tasks: int, processes: int) -> dict[str, float]:
        baseline = int(self.r.info("memory")["used_memory"])
        calls = self.commands()
        began = time.perf_counter()
        self.peer.enqueue(tasks)
        enqueue_rate = tasks / (time.perf_counter() - began)
        enqueue_calls = self.commands() - calls
        done = lambda: int(self.r.get("bench:done") or 0)  # noqa: E731
        with self.workers(processes) as procs:
            first = wait_for(lambda: done() >= 1, 120, procs)
            calls = self.commands()
            last = wait_for(lambda: done() >= tasks, 1200, procs)
            drain_calls = self.commands() - calls
        left = int(self.r.info("memory")["used_memory"]) - baseline
        return {
            "enqueue tasks/s": enqueue_rate,
            "drain tasks/s": (tasks - 1) / (last - first),
            "redis commands per task, enqueue": enqueue_calls / tasks,
            "redis commands per task, drain": drain_calls / tasks,
            "redis bytes left per finished task": left / tasks,
        }

    def latency(self, samples: int) -> dict[str, float]:
        with self.workers(1) as procs:
            self.warm_up(procs)
            return self.pings(procs, samples)

    def pings(self, procs: list[subprocess.Popen[bytes]], samples: int) -> dict[str, float]:
        gaps = []
        for _ in range(samples):
            time.sleep(random.uniform(0.01, 0.02))  # the worker is idle, blocked or polling
            self.peer.send_stamp()
            gaps.append(self.next_out(procs) * 1000)
        return {"p50 ms": statistics.median(gaps), "p99 ms": statistics.quantiles(gaps, n=100)[98]}

    def pool(self, tasks: int, samples: int) -> dict[str, float]:
        """The library's own multi-process mode, 2 processes under one command: drain, then idle
        latency. Start-up and enqueueing are never timed: once the pool is up, every process of
        it is frozen (SIGSTOP) while the tasks are sent, and the clock starts as they thaw."""
        command = getattr(self.peer, "POOL_WORKER", None)
        if command is None:
            return {}
        with self.workers(1, command) as procs:
            self.warm_up(procs)
            time.sleep(3)  # every process of the pool up and idle (its children start after the first)
            tree = tree_pids(procs[0].pid)
            for pid in tree:
                os.kill(pid, signal.SIGSTOP)
            self.peer.enqueue(tasks)
            began = time.perf_counter()
            for pid in tree:
                os.kill(pid, signal.SIGCONT)
            last = wait_for(lambda: int(self.r.get("bench:done") or 0) >= tasks, 1200, procs)
            figures = {"drain tasks/s": tasks / (last - began), "processes": float(len(tree))}
            time.sleep(1)  # idle again: blocked or polling
            figures.update({f"idle {k}": v for k, v in self.pings(procs, samples).items()})
        return figures

    def scheduled(self, samples: int) -> dict[str, float]:
        if not hasattr(self.peer, "schedule"):
            return {}
        with self.workers(1, getattr(self.peer, "SCHEDULER_WORKER", None)) as procs:
            self.warm_up(procs)
            start = time.time()
            for i in range(samples):
                self.peer.schedule(start + 0.5 + 2.5 * i / samples)
            late = [self.next_out(procs) * 1000 for _ in range(samples)]
        return {"lateness p50 ms": statistics.median(late), "lateness p99 ms": statistics.quantiles(late, n=100)[98]}

    def dependencies(self, groups: int) -> dict[str, float]:
        if not hasattr(self.peer, "dag"):
            return {}
        with self.workers(1) as procs:
            self.warm_up(procs)
            calls = self.commands()
            began = time.perf_counter()
            self.peer.dag(groups)
            last = wait_for(lambda: self.r.llen(OUT) >= groups, 1200, procs)
            tasks = groups * 5
            return {"completion s": last - began, "redis commands per task": (self.commands() - calls) / tasks}

    def memory(self, tasks: int) -> dict[str, float]:
        """Redis bytes per task left pending (`send_stamp`: one argument, no worker running), and
        per task scheduled an hour ahead: used_memory before and after, from an empty database."""
        out = {}
        sends = {"pending": self.peer.send_stamp}
        if hasattr(self.peer, "schedule"):
            sends["scheduled"] = lambda: self.peer.schedule(time.time() + 3600)
        for state, send in sends.items():
            self.r.flushdb()
            baseline = int(self.r.info("memory")["used_memory"])
            for _ in range(tasks):
                send()
            out[f"redis bytes per {state} task"] = (int(self.r.info("memory")["used_memory"]) - baseline) / tasks
        return out

    def idle(self, count: int) -> dict[str, float]:
        with self.workers(count) as procs:
            self.warm_up(procs)
            time.sleep(5)  # let start-up traffic pass
            calls, began = self.commands(), time.perf_counter()
            time.sleep(10)
            rate = (self.commands() - calls - 1) / (time.perf_counter() - began)  # -1: our own INFO
            out = {f"{count} idle: redis commands/s per worker": rate / count}
            if count == 1:
                out["idle worker RSS MB (process tree)"] = tree_rss_kb(procs[0].pid) / 1024
            return out


def tree_pids(root: int) -> list[int]:
    """A process and all its descendants (Dramatiq and taskiq fork their workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_rss_kb(root: int) -> int:
    """RSS of a process and all its descendants."""
    total = 0
    for pid in tree_pids(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0
    return total


def main() -> None:
    venv_bin, module, url, scenario = sys.argv[1:5]
    size = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    second = int(sys.argv[6]) if len(sys.argv) > 6 else 1  # drain: processes; pool: latency samples
    bench = Scenario(venv_bin, module, url)
    runs: dict[str, Callable[[], dict[str, float]]] = {
        "drain": lambda: bench.drain(size, second),
        "latency": lambda: bench.latency(size),
        "scheduled": lambda: bench.scheduled(size),
        "dependencies": lambda: bench.dependencies(size),
        "idle": lambda: bench.idle(size),
        "pool": lambda: bench.pool(size, second),
        "memory": lambda: bench.memory(size),
    }
    print(json.dumps(runs[scenario]()))


if __name__ == "__main__":
    main()
