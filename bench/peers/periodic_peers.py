"""A peer's periodic scheduler, for bench/periodic.py; run inside the peer's own venv:

    periodic_peers.py PEER REDIS_URL SECONDS EVERY WORKERS

PEER is celery (beat) or rq (`rq cron`): bench/peers/periodic_<peer>.py says how each sends
a run its due time. Starts WORKERS workers, then the peer's one scheduler process, lets it run
for SECONDS, stops them and prints the runs' lateness (start - due, ms) as JSON, the first
two runs left out as in minicelery's figures.
"""

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    peer, url, seconds, every, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    os.environ.update(BENCH_REDIS_URL=url, BENCH_EVERY=every)
    sys.path.insert(0, str(HERE))
    module = importlib.import_module(f"periodic_{peer}")
    from scenario import stop  # (this folder, on sys.path now)

    module.r.delete("bench:late")
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], "PYTHONPATH": path}
    quiet = {"env": env, "cwd": HERE, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen(module.WORKER, **quiet) for _ in range(count)]  # type: ignore[call-overload]
    time.sleep(3)  # worker start-up is not timed: the scheduler starts once they are up
    procs.append(subprocess.Popen(module.SCHEDULER, **quiet))  # type: ignore[call-overload]
    wanted = int(seconds / float(every)) + 2
    deadline = time.monotonic() + seconds * 3 + 30
    while module.r.llen("bench:late") < wanted and time.monotonic() < deadline:
        time.sleep(0.2)
    stop(procs[::-1])  # the scheduler first
    late = [float(v) for v in module.r.lrange("bench:late", 0, -1)][2:wanted]
    print(json.dumps({
        "slots": float(len(late)),
        "p50 ms": statistics.median(late),
        "p99 ms": statistics.quantiles(late, n=100, method="inclusive")[98],
        "max ms": max(late),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
