"""Redis bytes per task, by state, and where minicelery spends them (`make bench`).

    .venv/bin/python bench/memory.py [--tasks 100000] [--only minicelery,huey] [--no-peers]

On a private Redis, for one-argument tasks: used_memory before and after N tasks pending
(ready), N scheduled an hour ahead, and N finished with and without their results kept (a
worker drains them in this process). For each, every key of the queue with its type, its
encoding (OBJECT ENCODING), its size (MEMORY USAGE ... SAMPLES 0) and that size per task:
what the bytes are spent on. Then the peers' figures for the same pending and scheduled tasks,
each in its own venv (bench/peers/scenario.py's `memory` scenario; see bench/compare.py).
Writes bench/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

import redis

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.keys import QueueKeys
from minicelery.redis_server import RedisServer
from minicelery.settings import load_settings
from minicelery.worker import Worker

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
QUEUE = "mem"
HOUR_MS = 3_600_000
CHUNK = 5_000  # tasks per pipelined round trip


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def breakdown(r: redis.Redis, tasks: int) -> list[dict[str, Any]]:
    """Every key of the queue: type, encoding, elements, bytes, bytes per task."""
    rows = []
    for key in sorted(r.scan_iter(match=QueueKeys(QUEUE).all_keys_pattern(), count=1000)):
        kind = r.type(key).decode()
        size = {"hash": r.hlen, "list": r.llen, "zset": r.zcard, "set": r.scard}.get(kind, lambda _k: 1)(key)
        usage = int(r.memory_usage(key, samples=0) or 0)
        rows.append({
            "key": key.decode().removeprefix(QueueKeys(QUEUE).prefix), "type": kind,
            "encoding": r.object("encoding", key).decode(), "elements": size, "bytes": usage,
            "bytes per task": usage / tasks,
        })  # fmt: skip
    return rows


def minicelery_figures(url: str, tasks: int, states: list[str] | None = None) -> dict[str, dict[str, Any]]:
    r = redis.Redis.from_url(url)
    broker = RedisBroker(JSONTransport(), url=url, max_block=1)
    app = Client(broker, default_queue=QUEUE)

    @app.task
    def touch(n: int) -> int:
        return n

    @app.task(store_result=False)
    def touch_and_forget(n: int) -> int:
        return n

    def send(task: Any, delay_ms: int | None) -> None:
        for start in range(0, tasks, CHUNK):
            handles = [task(n) for n in range(start, min(tasks, start + CHUNK))]
            keys = QueueKeys(QUEUE).as_list()
            calls = [
                (
                    "enqueue",
                    keys,
                    broker._enqueue_args(h.id, broker.transport.dumps_message(h.message), delay_ms=delay_ms),
                )
                for h in handles
            ]
            broker._pipelined("enqueue", calls)

    def drain() -> None:
        settings = load_settings(worker={"queues": [QUEUE], "idle_block_max": 1}, metrics={"enabled": False})
        Worker(app, settings).run(burst=True, install_signals=False)

    out: dict[str, dict[str, Any]] = {}
    plans = {
        "pending": (touch, None, False),
        "scheduled": (touch, HOUR_MS, False),
        "finished, result kept": (touch, None, True),
        "finished, result not kept": (touch_and_forget, None, True),
    }
    for state, (task, delay_ms, drained) in plans.items():
        if states and state.split(",")[0] not in states:
            continue
        r.flushall()
        gc.collect()
        before = used(r)
        send(task, delay_ms)
        if drained:
            drain()
        after = used(r)
        out[state] = {"bytes per task": (after - before) / tasks, "keys": breakdown(r, tasks)}
        print(f"minicelery {state}: {out[state]['bytes per task']:.1f} bytes per task", flush=True)
    r.flushall()
    broker.close()
    Client.instances.remove(app)
    return out


def side_by_side(url: str, names: list[str], tasks: int) -> dict[str, dict[str, float]]:
    """Bytes per pending and per scheduled task for each contender, the same way for all:
    bench/peers/scenario.py's `memory` scenario in its own venv (one-argument tasks, sent one
    call each), and bytes left per finished task from its `drain` scenario (20,000 at most)."""
    sys.path.insert(0, str(BENCH))
    import compare

    out = {}
    for name in names:
        python = Path(sys.executable) if name in compare.OURS else compare.peer_python(name)
        figures = compare.run_scenario(python, name, url, "memory", tasks)
        drained = compare.run_scenario(python, name, url, "drain", min(tasks, 20_000), 1)
        figures["redis bytes per finished task"] = drained.get("redis bytes left per finished task", float("nan"))
        print(f"{name}: {figures}", flush=True)
        out[name] = figures
    return out


def markdown(tasks: int, own: dict[str, dict[str, Any]], contenders: dict[str, dict[str, float]]) -> str:
    lines = []
    if contenders:
        lines += [f"**Redis bytes per task, side by side ({tasks:,} pending, {tasks:,} scheduled; finished: "
                  f"{min(tasks, 20_000):,} drained)**", ""]  # fmt: skip
        names = list(contenders)
        lines += ["| figure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|", ""]
        figures = sorted({f for per in contenders.values() for f in per})
        for figure in figures:
            cells = [f"{contenders[n][figure]:,.0f}" if figure in contenders[n] else "n/a" for n in names]
            lines.insert(-1, f"| {figure} | " + " | ".join(cells) + " |")
    lines += [f"**minicelery's own, {tasks:,} one-argument tasks (enqueued in pipelines of {CHUNK:,})**", "",
              "| state | bytes per task |", "|---|---|"]  # fmt: skip
    lines += [f"| {state} | {figures['bytes per task']:,.1f} |" for state, figures in own.items()]
    for state, figures in own.items():
        lines += ["", f"**minicelery, {state}: where the bytes go**", "",
                  "| key | type | encoding | elements | bytes per task |", "|---|---|---|---|---|"]  # fmt: skip
        for row in figures["keys"]:
            cells = [row["key"], row["type"], row["encoding"], f"{row['elements']:,}", f"{row['bytes per task']:,.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--only", help="comma-separated peers (default: every peer of bench/compare.py)")
    parser.add_argument("--no-peers", action="store_true", help="minicelery's own figures only (no side by side)")
    parser.add_argument("--states", help="comma-separated: pending, scheduled, finished (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(BENCH))
    import compare

    names = [] if args.no_peers else [*compare.OURS, *(args.only.split(",") if args.only else compare.PEERS)]
    with RedisServer() as server:
        own = minicelery_figures(server.url, args.tasks, args.states.split(",") if args.states else None)
        contenders = side_by_side(server.url, names, args.tasks)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(
        json.dumps({"tasks": args.tasks, "minicelery": own, "side by side": contenders}, indent=2)
    )
    text = markdown(args.tasks, own, contenders)
    (RESULTS / "memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
