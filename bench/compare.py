"""minicelery and its peers side by side: same machine, same run, same Redis, same task bodies.

    .venv/bin/python bench/compare.py [--tasks 20000] [--runs 3] [--only minicelery,huey]
                                      [--scenarios drain,latency] [--quick]

Each peer gets its own virtualenv under bench/.venvs/ with its latest release (their redis-py
pins clash), made on first use; each is configured as written at the top of its
bench/peers/*_peer.py. Every scenario runs as bench/peers/scenario.py inside the peer's venv;
runs are interleaved (run 1 of every peer, then run 2...) so drift hits everyone. Prints every
figure's median over the runs, the best peer's, and minicelery's ratio to it, and writes the
whole table as JSON to bench/results/compare.json (compare-<kinds>.json for a --scenarios run).
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
    "celery": ["celery[redis]", "packaging", "hiredis"],
    "rq": ["rq", "redis", "hiredis"],
    "dramatiq": ["dramatiq[redis]", "hiredis"],
    "arq": ["arq", "hiredis"],
    "huey": ["huey", "redis", "hiredis"],
    "saq": ["saq[hiredis]", "typing_extensions"],
    "taskiq": ["taskiq", "taskiq-redis", "hiredis"],
}
# minicelery as it ships (results kept), and with results off like every peer (store_results false)
OURS = ("minicelery", "minicelery_forget")
# Which way is better, by the figure's unit.
LOWER_IS_BETTER = ("ms", "per task", "per worker", "MB", "completion s", "bytes")
NOT_SCORED = ("processes",)  # a fact about the mode, shown without a ratio


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


def scenarios(tasks: int, scale: int) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """name -> (scenario.py scenario, its sizes, whether every run repeats it). The idle
    figures are counts of commands and a memory size, not timings: measured in the first run."""
    groups, samples = 2000 // scale, 200 // scale  # groups of 5: a 10,000-task DAG
    return {
        f"drain {tasks:,} tasks, 1 worker process": ("drain", (tasks, 1), True),
        f"drain {tasks:,} tasks, 2 worker processes": ("drain", (tasks, 2), True),
        f"latency, idle worker, {samples} tasks one at a time": ("latency", (samples,), True),
        f"scheduled, {samples} tasks due 0.5-3 s ahead": ("scheduled", (samples,), True),
        f"dependencies, {groups:,} groups of 5 (chains and fan-in)": ("dependencies", (groups,), True),
        f"concurrency 2, each one's own multi-process mode: drain {tasks:,} tasks, then {samples} idle pings": (
            "pool",
            (tasks, samples),
            True,
        ),
        "idle, 1 worker": ("idle", (1,), False),
        "idle, 8 workers": ("idle", (8,), False),
    }


def better(figure: str, a: float, b: float) -> bool:
    if "lateness" in figure:  # early is as wrong as late
        return abs(a) < abs(b)
    lower = any(unit in figure for unit in LOWER_IS_BETTER)
    return a < b if lower else a > b


def best_peer(figure: str, values: dict[str, float]) -> str | None:
    if figure in NOT_SCORED:
        return None
    best = None
    for name, value in values.items():
        if name not in OURS and (best is None or better(figure, value, values[best])):
            best = name
    return best


def markdown(table: dict[str, dict[str, dict[str, float]]], names: list[str]) -> str:
    """One table per scenario: a row per figure, a column per contender, and minicelery's
    ratio to the best peer (as in bench/README.md)."""
    out = []
    for scenario, by_name in table.items():
        figures = sorted({f for per in by_name.values() for f in per})
        if not figures:
            continue
        shown = [n for n in names if by_name.get(n)]
        ours = [n for n in OURS if n in shown]
        out += [f"**{scenario}**", "", "| figure | " + " | ".join(shown) + " | "
                + " | ".join(f"{n} / best peer" for n in ours) + " |",
                "|---" * (len(shown) + 1 + len(ours)) + "|"]  # fmt: skip
        for figure in figures:
            values = {n: by_name[n][figure] for n in shown if figure in by_name[n]}
            best = best_peer(figure, values)
            cells = [f"{values[n]:,.2f}" if n in values else "n/a" for n in shown]
            ratios = []
            for own in ours:
                ratio = "-"
                if best is not None and own in values:
                    best_value = values[best]
                    ratio = f"{values[own] / best_value:.2f}x {best}" if best_value > 0 else f"best: {best} (<= 0)"
                ratios.append(ratio)
            out.append(f"| {figure} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        out.append("")
    return "\n".join(out)


# Figures whose run-by-run ratios are printed too (timings: a shared VM drifts between runs).
RUN_BY_RUN = ("drain tasks/s", "p50 ms", "p99 ms", "idle p50 ms", "idle p99 ms")


def ratios_per_peer(samples: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """minicelery / each peer, run by run (the runs are interleaved, so run i of each met the
    same load), and the median of those ratios."""
    out = []
    for scenario, by_name in samples.items():
        mine = by_name.get("minicelery", {})
        lines = []
        for figure in RUN_BY_RUN:
            for name, figures in by_name.items():
                if name in OURS or figure not in mine or figure not in figures:
                    continue
                ratios = [a / b for a, b in zip(mine[figure], figures[figure], strict=False) if b > 0]
                if ratios:
                    shown = ", ".join(f"{x:.2f}x" for x in ratios)
                    lines.append(f"- {figure}, minicelery / {name}: {shown} (median {statistics.median(ratios):.2f}x)")
        if lines:
            out += [f"**{scenario}, run by run**", "", *lines, ""]
    return "\n".join(out)


def ratios_over_best_peer(samples: dict[str, dict[str, dict[str, list[float]]]], figure: str = "drain tasks/s") -> str:
    """Each of our variants' drain rate over the best peer's of the same run, run by run: the
    ratio that counts on a machine whose speed drifts (medians of ratios, not ratios of medians)."""
    out = []
    for scenario, by_name in samples.items():
        peers = {n: f[figure] for n, f in by_name.items() if n not in OURS and f.get(figure)}
        for own in OURS:
            mine = by_name.get(own, {}).get(figure)
            if not mine or not peers:
                continue
            ratios = []
            for run, value in enumerate(mine):
                best = max((v[run], n) for n, v in peers.items() if run < len(v))
                ratios.append(f"{value / best[0]:.2f}x {best[1]}")
            out.append(f"- {scenario}, {own}: " + ", ".join(ratios))
    return (
        ("\n**Run by run** (" + figure + ", over the best peer of that run)\n\n" + "\n".join(out) + "\n") if out else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", help="comma-separated contenders (default: minicelery and every peer)")
    parser.add_argument(
        "--scenarios",
        help="comma-separated kinds: drain, latency, scheduled, dependencies, pool, idle (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes, one run: a smoke test")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    runs = 1 if args.quick else args.runs
    names = args.only.split(",") if args.only else [*OURS, *PEERS]
    plan = scenarios(args.tasks // scale, scale)
    if args.scenarios:
        kinds = set(args.scenarios.split(","))
        unknown = kinds - {kind for kind, _sizes, _repeated in plan.values()}
        if unknown:
            parser.error(f"unknown scenario kind(s): {', '.join(sorted(unknown))}")
        plan = {title: spec for title, spec in plan.items() if spec[0] in kinds}
    # A partial run keeps its own files: it must not overwrite the last full table.
    stem = "compare" + ("-" + "-".join(sorted(kinds)) if args.scenarios else "")
    pythons = {name: Path(sys.executable) if name in OURS else peer_python(name) for name in names}
    samples: dict[str, dict[str, dict[str, list[float]]]] = {s: {n: {} for n in names} for s in plan}
    with RedisServer() as server:
        for run in range(runs):
            for scenario, (kind, sizes, repeated) in plan.items():
                if run > 0 and not repeated:
                    continue
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
    (RESULTS / f"{stem}.json").write_text(json.dumps({**table, "runs": samples}, indent=2))
    by_run = ratios_per_peer(samples)
    (RESULTS / f"{stem}.md").write_text(markdown(table, names) + ratios_over_best_peer(samples) + "\n" + by_run)
    print(f"\nmedians of {runs} run(s); ratio = minicelery / best peer (for 'lower is better' figures < 1 wins)")
    for scenario, by_name in table.items():
        print(f"\n{scenario}")
        figures = sorted({f for per in by_name.values() for f in per})
        for figure in figures:
            values = {name: per[figure] for name, per in by_name.items() if figure in per}
            best = best_peer(figure, values)
            row = "  ".join(f"{n} {v:,.2f}" for n, v in values.items())
            ratio = ""
            for own in OURS:
                if best is not None and own in values and values[best] > 0:
                    ratio += f"  -> {own} {values[own] / values[best]:.2f}x {best}"
            print(f"  {figure}: {row}{ratio}")
    print("\n" + by_run)


if __name__ == "__main__":
    main()
