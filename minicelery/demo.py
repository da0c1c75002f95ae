"""`minicelery demo`: the original README's demo, end to end, on a private Redis.

Starts a Redis server on a free port, three workers (examples/worker.py) and the producer
(examples/producer.py), lets their output through as it happens, then stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .redis_server import RedisServer


def find_examples() -> Path:
    for candidate in (Path.cwd() / "examples", Path(__file__).resolve().parent.parent / "examples"):
        if (candidate / "demo_tasks.py").is_file():
            return candidate
    raise FileNotFoundError("examples/demo_tasks.py not found: run the demo from the minicelery checkout")


def run_demo(workers: int = 3) -> int:
    examples = find_examples()
    with RedisServer() as server:
        print(f"demo: private Redis on {server.url}, {workers} workers", flush=True)
        env = {
            **os.environ,
            "MINICELERY_REDIS__URL": server.url,
            "MINICELERY_LOGGING__LEVEL": "WARNING",
            "MINICELERY_METRICS__PORT": "0",  # three workers on one host: each takes a free port
            "PYTHONPATH": os.pathsep.join(filter(None, [str(examples), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("MINICELERY_CONFIG", None)
        procs = [subprocess.Popen([sys.executable, str(examples / "worker.py")], env=env) for _ in range(workers)]
        try:
            producer = subprocess.run([sys.executable, str(examples / "producer.py")], env=env, check=False)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(timeout=60) for proc in procs]
        print(f"demo: producer exited {producer.returncode}; workers exited {codes}", flush=True)
        return 0 if producer.returncode == 0 and not any(codes) else 1
