"""minicelery and its peers side by side: same machine, same run, same Redis, same task bodies.

    .venv/bin/python bench/compare.py [--tasks 20000] [--runs 3] [--only minicelery,huey] [--quick]

Each peer gets its own virtualenv under bench/.venvs/ with its latest release (their redis-py
pins clash), made on first use; each is configured as written at the top of its
bench/peers/*_peer.py. Every scenario runs as bench/peers/scenario.py inside the peer's venv;
runs are interleaved (run 1 of every peer, then run 2...) so drift hits everyone. Prints every
figure's median over the runs, the best peer's, and minicelery's ratio to it, and writes the
whole table as JSON to bench/results/compare.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import venv
from pathlib import Path

from minicelery.redis_server import RedisServer

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"
# peer -> pip requirements; the module is bench/peers/<peer>_peer.py
PEERS = {
    "celery": ["celery[redis]", "packaging"],
    "rq": ["rq", "redis", "hiredis"],
    "dramatiq": ["dramatiq[redis]", "hiredis"],
    "arq": ["arq", "hiredis"],
    "huey": ["huey", "redis", "hiredis"],
    "saq": ["saq[hiredis]", "typing_extensions"],
    "taskiq": ["taskiq", "taskiq-redis", "hiredis"],
}
# Which way is better, by the figure's unit.
LOWER_IS_BETTER = ("ms", "per task", "per worker", "MB", "completion s")


def peer_python(name: str) -> Path:
    """The peer's own venv, made and filled on first use."""
    home = VENVS / name
    python = home / "bin" / "python"
    if not (home / ".installed").exists():
        venv.create(home, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", *PEERS[name]], check=True)
        (home / ".installed").touch()
    return python


def run_scenario(python: Path, name: str, url: str, scenario: str, *args: int) -> dict[str, float]:
    out = subprocess.run(
        [str(python), str(BENCH / "peers" / "scenario.py"), str(python.parent), f"{name}_peer", url, scenario,
         *map(str, args)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if out.returncode != 0:
        print(f"  {name} {scenario}: failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {}
    figures: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return figures


def scenarios(tasks: int, scale: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        "drain, 1 worker process": ("drain", (tasks, 1)),
        "drain, 2 worker processes": ("drain", (tasks, 2)),
        "latency, idle worker": ("latency", (200 // scale,)),
        "scheduled, 200 due 0.5-3 s ahead": ("scheduled", (200 // scale,)),
        "dependencies, 2,000 groups of 5": ("dependencies", (2000 // scale,)),
        "idle, 1 worker": ("idle", (1,)),
        "idle, 8 workers": ("idle", (8,)),
    }


def better(figure: str, a: float, b: float) -> bool:
    lower = any(unit in figure for unit in LOWER_IS_BETTER)
    return a < b if lower else a > b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", help="comma-separated contenders (default: minicelery and every peer)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes, one run: a smoke test")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    runs = 1 if args.quick else args.runs
    names = args.only.split(",") if args.only else ["minicelery", *PEERS]
    pythons = {name: Path(sys.executable) if name == "minicelery" else peer_python(name) for name in names}
    plan = scenarios(args.tasks // scale, scale)
    samples: dict[str, dict[str, dict[str, list[float]]]] = {s: {n: {} for n in names} for s in plan}
    with RedisServer() as server:
        for run in range(runs):
            for scenario, (kind, sizes) in plan.items():
                for name in names:  # interleaved: drift hits everyone
                    figures = run_scenario(pythons[name], name, server.url, kind, *sizes)
                    for figure, value in figures.items():
                        samples[scenario][name].setdefault(figure, []).append(value)
                    shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items()) or "n/a"
                    print(f"run {run + 1} | {scenario} | {name}: {shown}", flush=True)
    table = {
        scenario: {name: {f: statistics.median(v) for f, v in figures.items()} for name, figures in by_name.items()}
        for scenario, by_name in samples.items()
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compare.json").write_text(json.dumps(table, indent=2))
    print(f"\nmedians of {runs} run(s); ratio = minicelery / best peer (for 'lower is better' figures < 1 wins)")
    for scenario, by_name in table.items():
        print(f"\n{scenario}")
        figures = sorted({f for per in by_name.values() for f in per})
        for figure in figures:
            values = {name: per[figure] for name, per in by_name.items() if figure in per}
            peers = {n: v for n, v in values.items() if n != "minicelery"}
            best = None
            for n, v in peers.items():
                if best is None or better(figure, v, peers[best]):
                    best = n
            row = "  ".join(f"{n} {v:,.2f}" for n, v in values.items())
            ratio = ""
            if best is not None and "minicelery" in values and peers[best]:
                ratio = f"  -> {values['minicelery'] / peers[best]:.2f}x {best}"
            print(f"  {figure}: {row}{ratio}")


if __name__ == "__main__":
    main()
