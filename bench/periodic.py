"""Lateness of periodic slots (@app.periodic / [[schedules]]) with 1 and 4 worker processes.

    .venv/bin/python bench/periodic.py [--seconds 15] [--every 0.1] [--runs 3]

A private Redis; worker processes that all declare one schedule running `stamp` (it returns
time.time() when it starts) every `--every` seconds. Lateness of a slot = when its run
started - the slot's time (the slot is in the occurrence id, on the Redis clock; Redis runs on
this machine, so both clocks are the same). The first two slots after start-up are left out.
Worker counts alternate run by run, so drift hits both; prints each run, then the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import Bench, wait_for  # noqa: E402  (bench/ is not a package)

from minicelery.keys import QueueKeys  # noqa: E402
from minicelery.redis_server import RedisServer  # noqa: E402
from minicelery.schedules import parse_occurrence  # noqa: E402


def periodic(bench: Bench, workers: int, seconds: float, every: float) -> dict[str, float]:
    queue = bench.queue(f"periodic{workers}")
    keys = QueueKeys(queue)
    schedule = json.dumps([{"task": "stamp", "every": every}])
    with bench.workers(queue, workers, MINICELERY_SCHEDULES=schedule):
        bench.wait_ready(queue, workers)
        wanted = int(seconds / every)
        wait_for(lambda: bench.r.zcard(keys.expiry) >= wanted + 2, seconds * 3 + 30, poll=0.1)
    late = []
    for task_id, envelope in bench.r.hscan_iter(keys.result, count=1000):
        parsed = parse_occurrence(task_id.decode())
        body = json.loads(envelope)
        if parsed is not None and body.get("ok"):
            late.append((parsed[1], body["value"] * 1000 - parsed[1]))
    late.sort()
    gaps = [ms for _, ms in late[2:]]  # not the first slots, which start-up may hold up
    slots = [slot for slot, _ in late]
    every_ms = round(every * 1000)
    expected = set(range(slots[0], slots[-1] + 1, every_ms))
    return {
        "slots": float(len(gaps)),
        "p50 ms": statistics.median(gaps),
        "p99 ms": statistics.quantiles(gaps, n=100, method="inclusive")[98],
        "max ms": max(gaps),
        # slots with no run of their own: a run started over a slot late, and catch-up "one"
        # (the default) let it stand for the next (counted in minicelery_schedule_missed_slots)
        "slots collapsed": float(len(expected - set(slots))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--every", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[int, list[dict[str, float]]] = {1: [], 4: []}
    with RedisServer() as server:
        bench = Bench(server)
        for run in range(1, args.runs + 1):
            for workers in (1, 4):
                figures = periodic(bench, workers, args.seconds, args.every)
                results[workers].append(figures)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
                print(f"run {run}, {workers} worker(s): {shown}", flush=True)
    print(f"\nperiodic every {args.every:g} s for {args.seconds:g} s, medians of {args.runs} runs:")
    for workers, runs in results.items():
        p50 = statistics.median(r["p50 ms"] for r in runs)
        p99 = statistics.median(r["p99 ms"] for r in runs)
        collapsed = sum(r["slots collapsed"] for r in runs)
        print(f"  {workers} worker(s): lateness p50 {p50:.2f} ms, p99 {p99:.2f} ms; slots collapsed {collapsed:g}")


if __name__ == "__main__":
    main()
