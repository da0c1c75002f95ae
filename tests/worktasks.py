"""Tasks the tests run in real worker processes (and send from the test process).

`register(app)` puts them on any Client, so the test process and the workers share names.
Executions are recorded in Redis (the worker's own connection) so tests can count them.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import time
import uuid
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from minicelery import Client, JSONTransport, RedisBroker

RUNS_KEY = "test:runs"  # hash: tag -> how many times a task with that tag ran
_redis: redis.Redis | None = None


def _r() -> redis.Redis:
    global _redis
    if _redis is None:
        # The tasks' own bookkeeping client retries a connection that a fault test broke, so a
        # count is never what fails (the worker's behaviour is what those tests look at).
        on_cluster = os.environ.get("MINICELERY_REDIS__CLUSTER") == "true"
        _redis = (redis.RedisCluster if on_cluster else redis.Redis).from_url(  # type: ignore[attr-defined]
            os.environ["MINICELERY_REDIS__URL"],
            retry=Retry(ExponentialBackoff(cap=1.0), 10),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
    return _redis


_held: list[bytes] = []  # memory a task keeps (hold_memory)
EXECUTIONS_KEY = "test:executions"  # set of "tag|execution id": one member per run of a task


def _count_execution(tag: str) -> None:
    """SADD of a fresh id per run: idempotent, so the client's own retry after a connection
    broken mid-reply cannot count one run twice (an INCR could)."""
    _r().sadd(EXECUTIONS_KEY, f"{tag}|{uuid.uuid4().hex}")


def executions(client: redis.Redis) -> dict[str, int]:
    """tag -> how many times a task counted by _count_execution ran."""
    counts: dict[str, int] = {}
    for member in client.sscan_iter(EXECUTIONS_KEY, count=10_000):
        tag = member.decode().rsplit("|", 1)[0]
        counts[tag] = counts.get(tag, 0) + 1
    return counts


class CustomError(Exception):
    pass


class _CustomBase(BaseException):
    pass


def _running_task_id() -> str:
    """The id of the task this call runs in, found in the runner's frame (tests only: the
    schedule tests record the slot each run was for, and the slot is in the occurrence id)."""
    frame = sys._getframe(1)
    while frame is not None:
        claim = frame.f_locals.get("claim")
        if claim is not None and hasattr(claim, "token"):
            return str(claim.id)
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def register(app: Client) -> None:
    @app.task
    def echo(value: Any) -> Any:
        return value

    @app.task
    def add(*numbers: int) -> int:
        return sum(numbers)

    @app.task
    def boom(message: str = "boom") -> None:
        raise ValueError(message)

    @app.task
    def custom_boom(message: str) -> None:
        raise CustomError(message)

    @app.task
    def count_run(tag: str, *inputs: Any) -> str:
        """Counts its own executions in Redis (fault tests compare them with claims)."""
        _count_execution(tag)
        return tag

    @app.task
    def slow_count(tag: str, seconds: float) -> str:
        """count_run that takes a while: counts, then is still running when a fault begins (so
        its lease renewals and its finish meet the fault, not its own Redis call)."""
        _count_execution(tag)
        time.sleep(seconds)
        return tag

    @app.task
    def pid_after(seconds: float) -> int:
        """Sleeps, then says which process ran it: tells a late finish from the one that counts."""
        time.sleep(seconds)
        return os.getpid()

    @app.task
    def kill_my_worker(how: str = "sigkill") -> None:
        """A task that ends the process running it, every time: SIGKILL (a segfaulting C
        extension) or os._exit (no cleanup, nothing catchable)."""
        if how == "os_exit":
            os._exit(3)
        os.kill(os.getpid(), 9)

    @app.task
    def repeat(text: str, times: int) -> str:
        return text * times

    @app.task
    def describe(value: Any) -> str:
        """Says what it received, so a test can see an exception arrive as an argument."""
        if isinstance(value, BaseException):
            return f"error:{type(value).__name__}:{value}"
        return f"value:{value!r}"

    @app.task
    def node(tag: str, *parents: int) -> int:
        """A DAG node: counts its runs, returns 1 + the sum of its parents' results."""
        _r().hincrby(RUNS_KEY + ":" + os.environ.get("MINICELERY_WORKER__QUEUES", ""), tag, 1)
        return 1 + sum(parents)

    @app.task
    def redis_time() -> float:
        seconds, micros = _r().time()
        return seconds + micros / 1e6

    @app.task
    def sleep_for(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @app.task
    def spin(seconds: float) -> int:
        """Busy CPU in pure Python (holds the GIL the way real work does)."""
        end, count = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            count += 1
        return count

    @app.task
    def stubborn(seconds: float) -> str:
        """Swallows its time-limit error and keeps going: a worker stuck past the limit."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                time.sleep(end - time.monotonic())
            except Exception:
                continue
        return "finally"

    @app.task
    def swallow_all(seconds: float) -> str:
        """Catches everything, its time limit included, and keeps going: only ending the
        process stops it."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                time.sleep(end - time.monotonic())
            except BaseException:
                continue
        return "finally"

    @app.task
    def hold_gil(seconds: int, tag: str = "") -> str:
        """Stuck in C code that never returns to Python and holds the GIL (a C extension in a
        tight loop): neither a signal handler nor the heartbeat thread can run meanwhile.
        Records `tag` in Redis just before it goes in."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        if tag:
            _r().set(f"test:in_c:{tag}", 1)
        ctypes.PyDLL(None).sleep(seconds)  # PyDLL: the call keeps the GIL
        return "done"

    @app.task
    def exit_now(code: Any) -> None:
        sys.exit(code)

    @app.task
    def raise_base(kind: str) -> None:
        """Raises a BaseException that is not an Exception, as task code might."""
        errors: dict[str, BaseException] = {
            "KeyboardInterrupt": KeyboardInterrupt(),
            "GeneratorExit": GeneratorExit(),
            "custom": _CustomBase("custom base"),
        }
        raise errors[kind]

    @app.task
    async def async_add(a: int, b: int) -> int:
        await asyncio.sleep(0.01)
        return a + b

    @app.task
    async def async_sleep(seconds: float, tag: str) -> str:
        """Sleeps at an await; records that its `finally` ran when cancelled."""
        try:
            await asyncio.sleep(seconds)
        finally:
            _r().incr(f"test:async_finally:{tag}")
        return "slept"

    @app.task
    async def async_block(seconds: float) -> str:
        """Never awaits: blocks the event loop in plain Python (time.sleep)."""
        time.sleep(seconds)
        return "blocked"

    @app.task
    def gate(tag: str) -> str:
        """Waits until the test opens it: each RPUSH to test:gate:<tag> lets one run through
        (at most 30 s, in 1 s blocking calls: below the client's socket timeout)."""
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if _r().blpop([f"test:gate:{tag}"], timeout=1):
                return tag
        raise TimeoutError(f"gate {tag} was never opened")

    @app.task
    def slot_run(tag: str, seconds: float = 0.0) -> str:
        """Records each run's task id (a schedule's occurrence names its slot) when it starts
        (test:slot_starts:<tag>) and when it ends (test:slot_ends:<tag>), and which process runs
        it meanwhile (test:slot_pid:<tag>), so a test can kill that worker mid-run."""
        task_id = _running_task_id()
        r = _r()
        r.hincrby(f"test:slot_starts:{tag}", task_id, 1)
        r.set(f"test:slot_pid:{tag}", f"{os.getpid()} {task_id}")
        time.sleep(seconds)
        r.hincrby(f"test:slot_ends:{tag}", task_id, 1)
        return task_id

    @app.task(store_result=False)
    def forget_echo(value: Any) -> Any:
        """Fire-and-forget: its children get the value, nothing else keeps it."""
        return value

    @app.task(store_result=False)
    def forget_boom(message: str) -> None:
        raise LookupError(message)

    @app.task(store_result=True)
    def keep_echo(value: Any) -> Any:
        """Keeps its result even on a worker whose store_results is false."""
        return value

    @app.task
    def hold_memory(mib: int, tag: str) -> int:
        """Keeps `mib` MiB in use (in its process, for good) and waits until the test opens
        test:gate:<tag> (at most 30 s); counts its run; returns its PID."""
        _count_execution(tag)
        _held.append(b"x" * (mib * 2**20))  # bytes filled in: resident, not just reserved
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if _r().blpop([f"test:gate:{tag}"], timeout=1):
                return os.getpid()
        raise TimeoutError(f"gate {tag} was never opened")

    @app.task
    def note_run(tag: str, seconds: float) -> str:
        """Appends its tag to `runs` in the worker's $RUNTIME_DIRECTORY, then sleeps: counts runs
        where a worker has no Redis client of its own (under systemd's sandbox, with the password
        in a credential)."""
        with open(os.path.join(os.environ["RUNTIME_DIRECTORY"], "runs"), "a") as runs:
            runs.write(tag + "\n")  # one short write in append mode: lines from children never mix
        time.sleep(seconds)
        return tag

    @app.task
    def marked_sleep(tag: str, seconds: float) -> str:
        """Records that it started, then sleeps: lets a test signal a worker mid-task."""
        _r().hincrby("test:started", tag, 1)
        time.sleep(seconds)
        _r().hincrby("test:finished", tag, 1)
        return tag

    @app.task
    def stamp_run(tag: str, *inputs: Any) -> str:
        """count_run that also records which process ran it and when (test:stamps, pid|tag ->
        time), so the failover suite sees when each worker resumed."""
        _count_execution(tag)
        _r().zadd(STAMPS_KEY, {f"{os.getpid()}|{tag}": time.time()})
        return tag


STAMPS_KEY = "test:stamps"
app = Client(RedisBroker(JSONTransport()))
register(app)
