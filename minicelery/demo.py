"""`minicelery demo`: the original README's demo, end to end, on a private Redis.

Starts a Redis server on a free port, the workers (examples/worker.py) and the producer
(examples/producer.py), lets their output through as it happens, then stops everything.

Every way out stops what the demo started, in order (producer, workers, Redis): the producer
finishing, SIGINT (Ctrl-C), SIGTERM, SIGHUP or an exception. The children run in their own
process groups, so a terminal's Ctrl-C reaches only the demo, which then stops them in order,
instead of reaching every process at once (Redis going first, under workers still running).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from .redis_server import RedisServer

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A worker stopped by SIGTERM hands its running task back after its shutdown grace; the demo
# kills it only past STOP_BOUND, so a well-behaved worker always exits on its own.
WORKER_GRACE = 5.0
STOP_BOUND = 10.0


class Interrupted(Exception):
    """The demo got a stop signal; it exits 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class _StopSignals:
    """SIGINT/SIGTERM/SIGHUP raise Interrupted, but only inside `interruptible()`.

    A signal that arrives while a process is being started or stopped is only noted: raising
    there could leave a child started but not yet recorded, or half stopped. It is acted on at
    the next `check()` or `interruptible()`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._raising = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        if self._raising:
            self._raising = False
            raise Interrupted(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self._raising = True
        try:
            self.check()
            yield
        finally:
            self._raising = False


def find_examples() -> Path:
    for candidate in (Path.cwd() / "examples", Path(__file__).resolve().parent.parent / "examples"):
        if (candidate / "demo_tasks.py").is_file():
            return candidate
    raise FileNotFoundError("examples/demo_tasks.py not found: run the demo from the minicelery checkout")


def run_demo(workers: int = 3) -> int:
    """Run the demo; 0 if the producer and every worker exited 0, 128 + N after signal N."""
    if workers < 1:
        raise ValueError("the demo needs at least one worker")
    examples = find_examples()
    try:
        with _StopSignals() as signals, RedisServer(own_process_group=True) as server:
            return _run(examples, server, workers, signals)
    except Interrupted as exc:
        print(f"demo: stopped by {exc}; every process it started has exited", flush=True)
        return 128 + exc.signum


def _run(examples: Path, server: RedisServer, workers: int, signals: _StopSignals) -> int:
    print(f"demo: private Redis on {server.url}, {workers} workers", flush=True)
    env = {
        **os.environ,
        "MINICELERY_REDIS__URL": server.url,
        "MINICELERY_LOGGING__LEVEL": "WARNING",
        "MINICELERY_METRICS__PORT": "0",  # several workers on one host: each takes a free port
        "MINICELERY_WORKER__SHUTDOWN_GRACE": str(WORKER_GRACE),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(examples), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MINICELERY_CONFIG", None)

    def spawn(script: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, str(examples / script)], env=env, process_group=0)

    procs: list[subprocess.Popen[bytes]] = []  # stopped in this order: the producer first
    try:
        for _ in range(workers):
            signals.check()
            procs.append(spawn("worker.py"))
        signals.check()
        producer = spawn("producer.py")
        procs.insert(0, producer)
        with signals.interruptible():
            producer.wait()
    finally:
        codes = stop_all(procs)
    print(f"demo: producer exited {codes[0]}; workers exited {codes[1:]}", flush=True)
    return 0 if not any(codes) else 1


def stop_all(procs: list[subprocess.Popen[bytes]], bound: float = STOP_BOUND) -> list[int]:
    """SIGTERM each process still running, wait up to `bound` seconds in all, then SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + bound
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return [proc.returncode for proc in procs]
