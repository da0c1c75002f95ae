"""`worker -c 2` against one process and against two separate processes: drain, idle latency, memory.

    .venv/bin/python bench/pool.py [--tasks 20000] [--runs 3] [--pings 200]

A private Redis; the peers' minicelery task module (bench/peers/minicelery_peer.py: one Redis
INCR per task, or an RPUSH of the latency), real `minicelery worker` processes, metrics off.
Modes alternate within each run, so drift hits all. Start-up and enqueueing are never timed:
the workers are stopped (SIGSTOP) while the tasks are sent, and timing starts at SIGCONT.

- drain: tasks/s until the last INCR;
- idle latency: one task at a time into idle workers, send -> the task's start, p50/p99 in ms;
- memory: PSS (from /proc/PID/smaps_rollup) after the drain, summed over every process of the
  mode (with -c 2 the supervisor and its children) and over the worker processes only. PSS
  splits shared pages between the processes sharing them, so the sum is what the mode costs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from minicelery.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
MODES = {"1 process": [["-c", "1"]], "-c 2": [["-c", "2"]], "2 processes": [["-c", "1"], ["-c", "1"]]}


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def family(proc: subprocess.Popen[bytes]) -> list[int]:
    """The process and its children (a supervisor's worker children)."""
    text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
    return [proc.pid, *(int(pid) for pid in text.split())]


def wait_for(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not met")
        time.sleep(0.01)


def run_mode(url: str, r: redis.Redis, mode: str, tasks: int, pings: int, logs: Path) -> dict[str, float]:
    sys.path.insert(0, str(HERE / "peers"))
    os.environ["BENCH_REDIS_URL"] = url
    import minicelery_peer as peer

    r.flushdb()
    env = {**os.environ, "PYTHONPATH": str(HERE / "peers"), "MINICELERY_TASKS": '["minicelery_peer"]'}
    procs = []
    for i, flags in enumerate(MODES[mode]):
        log = open(logs / f"{mode.replace(' ', '_')}-{i}.log", "wb")  # noqa: SIM115 (the child keeps it)
        procs.append(
            subprocess.Popen([sys.executable, "-m", "minicelery", "worker", *flags], env=env, stdout=log, stderr=log)
        )
    wait_for(lambda: r.zcard("minicelery:{default}:workers") >= (2 if mode != "1 process" else 1))
    everyone = [pid for proc in procs for pid in family(proc)]
    for pid in everyone:
        os.kill(pid, signal.SIGSTOP)
    peer.app.start_many([peer.bump() for _ in range(tasks)])
    started = time.perf_counter()
    for pid in everyone:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: int(r.get("bench:done") or 0) >= tasks, 300)
    rate = tasks / (time.perf_counter() - started)
    pss = sum(pss_kib(pid) for pid in everyone) / 1024
    supervisors = [proc.pid for proc in procs] if mode == "-c 2" else []
    workers_pss = sum(pss_kib(pid) for pid in everyone if pid not in supervisors) / 1024
    time.sleep(1.0)  # let every worker go idle (blocked on Redis) before the latency probes
    latencies = []
    for _ in range(pings):
        peer.stamp(time.time()).start()
        _, value = r.blpop("bench:out", timeout=10)  # type: ignore[misc]
        latencies.append(float(value) * 1000)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=60)
    cuts = statistics.quantiles(latencies, n=100)
    return {"drain": rate, "p50": statistics.median(latencies), "p99": cuts[98], "pss": pss, "workers": workers_pss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pings", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with RedisServer() as server, tempfile.TemporaryDirectory() as logs:
        r = redis.Redis.from_url(server.url)
        for run in range(args.runs):
            for mode in MODES:
                figures = run_mode(server.url, r, mode, args.tasks, args.pings, Path(logs))
                results[mode].append(figures)
                print(f"run {run + 1} {mode:<12} " + "  ".join(f"{k}={v:.2f}" for k, v in figures.items()), flush=True)
    print(f"\nmedians of {args.runs} runs, {args.tasks} tasks, {args.pings} idle pings")
    heads = ["mode", "drain tasks/s", "idle p50 ms", "idle p99 ms", "PSS MiB, all processes", "PSS MiB, workers only"]
    print("| " + " | ".join(heads) + " |")
    print("|---|---|---|---|---|---|")
    for mode, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"| {mode} | {med['drain']:,.0f} | {med['p50']:.2f} | {med['p99']:.2f} "
            f"| {med['pss']:.1f} | {med['workers']:.1f} |"
        )


if __name__ == "__main__":
    main()
