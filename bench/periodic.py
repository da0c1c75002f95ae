"""Lateness of periodic slots (@app.periodic / [[schedules]]) with 1 and 4 worker processes,
beside one-off scheduled tasks due on the same grid.

    .venv/bin/python bench/periodic.py [--seconds 15] [--every 0.1] [--runs 3]

A private Redis; worker processes that all declare one schedule running `stamp` (it returns
time.time() when it starts) every `--every` seconds. Lateness of a slot = when its run
started - the slot's time (the slot is in the occurrence id, on the Redis clock; Redis runs on
this machine, so both clocks are the same). The first two slots after start-up are left out.
"one-off": the same workers without a schedule, and `stamp` sent with `start_at` for each
slot of the same grid (the issue's yardstick: "the same as any scheduled task").
"sleep floor": 1 or 4 processes that only sleep to each slot (no Redis): the machine's own
scheduling delay, which no task queue can go below.
"celery beat" and "rq cron": the peers' own scheduler process and workers, in their venvs
under bench/.venvs/ (made on first use, as compare.py does), on the same Redis; each run's
lateness is its start minus the time the peer had it due (bench/peers/periodic_peers.py).
`--peers ""` leaves them out.
Kinds and worker counts alternate within each run, so drift hits all; prints each run, then
the medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import peer_python  # noqa: E402  (bench/ is not a package)
from run import Bench, wait_for  # noqa: E402

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


def one_off(bench: Bench, workers: int, seconds: float, every: float) -> dict[str, float]:
    queue = bench.queue(f"oneoff{workers}")
    app = bench.app(queue)
    every_ms = round(every * 1000)
    with bench.workers(queue, workers):
        bench.wait_ready(queue, workers)
        first = (int(time.time() * 1000) // every_ms + 10) * every_ms  # a second ahead at 0.1 s
        slots = [first + i * every_ms for i in range(int(seconds / every))]
        sent = [(slot, app.tasks["stamp"]().start_at(dt.datetime.fromtimestamp(slot / 1000, dt.UTC))) for slot in slots]
        late = [handle.result(timeout=seconds + 60) * 1000 - slot for slot, handle in sent]
    return {
        "slots": float(len(late)),
        "p50 ms": statistics.median(late),
        "p99 ms": statistics.quantiles(late, n=100, method="inclusive")[98],
        "max ms": max(late),
    }


SLEEPER = """
import sys, time
every, count, late = float(sys.argv[1]), int(sys.argv[2]), []
slot = (time.time() // every + 2) * every
for _ in range(count):
    time.sleep(max(0.0, slot - time.time()))
    late.append((time.time() - slot) * 1000)
    slot += every
print(" ".join(map(str, late)))
"""


def sleep_floor(bench: Bench, workers: int, seconds: float, every: float) -> dict[str, float]:
    """A process that only sleeps to each slot of the grid: what this machine's scheduler alone
    costs any periodic run (no Redis, no task queue). `workers` such processes at once."""
    count = int(seconds / every)
    command = [sys.executable, "-c", SLEEPER, str(every), str(count)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    late = sorted(float(ms) for proc in procs for ms in proc.communicate(timeout=seconds + 30)[0].split())
    return {
        "slots": float(len(late)),
        "p50 ms": statistics.median(late),
        "p99 ms": statistics.quantiles(late, n=100, method="inclusive")[98],
        "max ms": max(late),
    }


def peer(name: str) -> Callable[[Bench, int, float, float], dict[str, float]]:
    def scenario(bench: Bench, workers: int, seconds: float, every: float) -> dict[str, float]:
        bench.r.flushdb()
        script = BENCH / "peers" / "periodic_peers.py"
        command = [str(peer_python(name)), str(script), name, bench.url, str(seconds), str(every), str(workers)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 3 + 120, check=True)
        return dict(json.loads(out.stdout))

    return scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--every", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peers", default="celery,rq", help="comma-separated, of celery and rq; '' for none")
    args = parser.parse_args()
    kinds = {"periodic": periodic, "one-off": one_off, "sleep floor": sleep_floor}
    names = {"celery": "celery beat", "rq": "rq cron"}
    kinds.update({names[p]: peer(p) for p in filter(None, args.peers.split(","))})
    results: dict[tuple[str, int], list[dict[str, float]]] = {(k, w): [] for k in kinds for w in (1, 4)}
    with RedisServer() as server:
        bench = Bench(server)
        for run in range(1, args.runs + 1):
            for kind, workers in results:
                figures = kinds[kind](bench, workers, args.seconds, args.every)
                results[kind, workers].append(figures)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
                print(f"run {run}, {kind}, {workers} worker(s): {shown}", flush=True)
    print(f"\nevery {args.every:g} s for {args.seconds:g} s, medians of {args.runs} runs:")
    for (kind, workers), runs in results.items():
        p50 = statistics.median(r["p50 ms"] for r in runs)
        p99 = statistics.median(r["p99 ms"] for r in runs)
        collapsed = sum(r.get("slots collapsed", 0) for r in runs)
        extra = f"; slots collapsed {collapsed:g}" if kind == "periodic" else ""
        print(f"  {kind:11s} {workers} worker(s): lateness p50 {p50:.2f} ms, p99 {p99:.2f} ms{extra}")


if __name__ == "__main__":
    main()
