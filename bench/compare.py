"""Drain throughput side by side: minicelery and its peers, same machine, same run, same Redis,
same task body (one Redis INCR), one worker process each. Each peer gets its own virtualenv
under bench/.venvs/ with its latest release (their redis-py pins clash).

    .venv/bin/python bench/compare.py [--tasks 20000] [--runs 3]

Prints each run, then medians and the ratio of each to the best peer. Only the drain scenario
is compared so far; arq, SAQ and taskiq (asyncio APIs) are not wired in yet.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import venv
from pathlib import Path

from minicelery.redis_server import RedisServer

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
# peer -> (module in bench/peers, pip requirements, configuration as written in the module)
PEERS = {
    "rq": ("rq_peer", ["rq", "redis", "hiredis"]),
    "huey": ("huey_peer", ["huey", "redis", "hiredis"]),
    "celery": ("celery_peer", ["celery[redis]", "packaging"]),
    "dramatiq": ("dramatiq_peer", ["dramatiq[redis]", "hiredis"]),
}


def peer_python(name: str, requirements: list[str]) -> Path:
    """The peer's own venv, made and filled on first use."""
    home = VENVS / name
    python = home / "bin" / "python"
    if not (home / ".installed").exists():
        venv.create(home, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", *requirements], check=True)
        (home / ".installed").touch()
    return python


def drain(python: Path, module: str, url: str, tasks: int) -> tuple[float, float]:
    out = subprocess.run(
        [str(python), str(BENCH / "peers" / "drain.py"), str(python.parent), module, url, str(tasks)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{module}: {out.stderr[-1000:]}")
    enqueue_rate, drain_rate = out.stdout.split()[-2:]
    return float(enqueue_rate), float(drain_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    contenders = {"minicelery": (Path(sys.executable), "minicelery_peer")}
    for name, (module, requirements) in PEERS.items():
        contenders[name] = (peer_python(name, requirements), module)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    with RedisServer() as server:
        for run in range(args.runs):
            for name, (python, module) in contenders.items():  # interleaved: drift hits everyone
                _enqueue, rate = drain(python, module, server.url, args.tasks)
                rates[name].append(rate)
                print(f"run {run + 1}: {name:<11} {rate:7.0f} tasks/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    best_peer = max((n for n in medians if n != "minicelery"), key=medians.__getitem__)
    print(f"\nmedians of {args.runs}, ratio to the best peer ({best_peer}):")
    for name, median in sorted(medians.items(), key=lambda item: -item[1]):
        print(f"  {name:<11} {median:7.0f} tasks/s  {median / medians[best_peer]:5.2f}x")


if __name__ == "__main__":
    main()
