"""Peer drain throughput: 20,000 tasks whose body is one Redis INCR, one worker process.

    python bench/peers/drain.py PEER_VENV_BIN PEER_MODULE REDIS_URL [N]

Run by bench/compare.py inside each peer's own virtualenv. Enqueue first (bulk where the
library has it), then start one worker and time from the first completed task to the last
(worker start-up is not counted). Prints "enqueue_per_s drain_per_s".
"""

import importlib
import os
import subprocess
import sys
import time

import redis

venv_bin, module_name, url = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 20_000
os.environ["BENCH_REDIS_URL"] = url
r = redis.Redis.from_url(url)
r.flushdb()
peer = importlib.import_module(module_name)
began = time.perf_counter()
peer.enqueue(n)
enqueue_rate = n / (time.perf_counter() - began)
env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "PYTHONPATH": os.path.dirname(__file__)}
worker = subprocess.Popen(peer.WORKER, env=env, cwd=os.path.dirname(__file__),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
try:
    deadline = time.perf_counter() + 600
    while int(r.get("bench:done") or 0) < 1:
        assert worker.poll() is None and time.perf_counter() < deadline, "worker exited or hung"
        time.sleep(0.002)
    first = time.perf_counter()
    while int(r.get("bench:done") or 0) < n:
        assert worker.poll() is None and time.perf_counter() < deadline, "worker exited or hung"
        time.sleep(0.002)
    last = time.perf_counter()
finally:
    worker.terminate()
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()
print(f"{enqueue_rate:.0f} {(n - 1) / (last - first):.0f}")
