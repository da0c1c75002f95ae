"""`worker -c N` with metrics on (children's files summed, served by the supervisor, scraped every
second) against metrics off: the cost per task of the pool's metrics.

    .venv/bin/python bench/pool_metrics.py [--tasks 20000] [--runs 3] [--children 2,4]

A private Redis; the peers' minicelery task module (one Redis INCR per task); real `minicelery
worker -c N` processes. For each N the two modes alternate within each run, so drift hits both.
Start-up and enqueueing are never timed: the pool is frozen (SIGSTOP) while the tasks are sent,
and timing starts as it thaws. Prints per run: tasks/s, CPU time per task of the whole pool
(supervisor and children, user + system, from /proc/PID/stat; Redis and the scraper excluded)
and the median scrape time; then the on/off ratios, run by run and of the medians. CPU time is
the steadier figure on a shared VM.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import redis
from pool import HERE, family, wait_for

from minicelery.redis_server import RedisServer, free_port

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system time of these processes so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / TICKS


def scrape(port: int) -> float:
    """Seconds one GET /metrics took."""
    began = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        response.read()
    return time.perf_counter() - began


def run(url: str, r: redis.Redis, n: int, metrics_on: bool, tasks: int, logs: Path) -> dict[str, float]:
    import minicelery_peer as peer

    r.flushdb()
    port = free_port()
    path = os.pathsep.join(filter(None, [str(HERE / "peers"), os.environ.get("PYTHONPATH")]))  # (an A/B tree)
    env = {**os.environ, "PYTHONPATH": path, "MINICELERY_TASKS": '["minicelery_peer"]'}
    env.update({"MINICELERY_METRICS__ENABLED": str(metrics_on).lower(), "MINICELERY_METRICS__PORT": str(port)})
    with open(logs / f"c{n}-{'on' if metrics_on else 'off'}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minicelery", "worker", "-c", str(n)], env=env, stdout=log, stderr=log
        )
    try:
        wait_for(lambda: r.zcard("minicelery:{default}:workers") >= n)
        if metrics_on:
            wait_for(lambda: _answers(port))  # the server starts once the children are forked
        everyone = family(proc)
        for pid in everyone:
            os.kill(pid, signal.SIGSTOP)
        peer.app.start_many([peer.bump() for _ in range(tasks)])
        cpu, began = cpu_seconds(everyone), time.perf_counter()
        for pid in everyone:
            os.kill(pid, signal.SIGCONT)
        drained, scrapes = threading.Event(), []

        def scraper() -> None:  # a Prometheus with scrape_interval 1s, until the drain ends
            while not drained.wait(1.0):
                scrapes.append(scrape(port))

        thread = threading.Thread(target=scraper)
        if metrics_on:
            thread.start()
        wait_for(lambda: int(r.get("bench:done") or 0) >= tasks, 300)
        elapsed, cpu = time.perf_counter() - began, cpu_seconds(everyone) - cpu
        drained.set()
        if metrics_on:
            thread.join()
            scrapes.append(scrape(port))  # one more, with every task's series in the files
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {
        "tasks/s": tasks / elapsed,
        "CPU µs/task": cpu / tasks * 1e6,
        "scrape ms": statistics.median(scrapes) * 1000 if scrapes else 0.0,
    }


def _answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--children", default="2,4", help="comma-separated values of -c")
    args = parser.parse_args()
    sizes = [int(n) for n in args.children.split(",")]
    results: dict[tuple[int, bool], list[dict[str, float]]] = {(n, on): [] for n in sizes for on in (False, True)}
    with RedisServer() as server, tempfile.TemporaryDirectory() as logs:
        sys.path.insert(0, str(HERE / "peers"))
        os.environ["BENCH_REDIS_URL"] = server.url
        r = redis.Redis.from_url(server.url)
        for i in range(args.runs):
            for n in sizes:
                for on in (False, True):
                    figures = run(server.url, r, n, on, args.tasks, Path(logs))
                    results[(n, on)].append(figures)
                    shown = "  ".join(f"{k} {v:,.1f}" for k, v in figures.items())
                    print(f"run {i + 1} -c {n} metrics {'on ' if on else 'off'}  {shown}", flush=True)
    print(f"\n{args.tasks} tasks per drain, medians of {args.runs} runs; on/off run by run in brackets")
    print("| -c | metrics | tasks/s | CPU µs/task | scrape ms | tasks/s on/off | CPU/task on/off |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        off, on = results[(n, False)], results[(n, True)]
        for mode, runs in (("off", off), ("on", on)):
            med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            ratios = ""
            if mode == "on":
                rate = [a["tasks/s"] / b["tasks/s"] for a, b in zip(on, off, strict=True)]
                cpu = [a["CPU µs/task"] / b["CPU µs/task"] for a, b in zip(on, off, strict=True)]
                ratios = (
                    f"{statistics.median(rate):.3f} ({', '.join(f'{x:.2f}' for x in rate)}) | "
                    f"{statistics.median(cpu):.3f} ({', '.join(f'{x:.2f}' for x in cpu)})"
                )
            else:
                ratios = "- | -"
            scrape_ms = f"{med['scrape ms']:.1f}" if mode == "on" else "-"
            print(f"| {n} | {mode} | {med['tasks/s']:,.0f} | {med['CPU µs/task']:.1f} | {scrape_ms} | {ratios} |")


if __name__ == "__main__":
    main()
