"""`make demo` (`minicelery demo`): the README's first command must keep working, and every way
out of it must stop what it started."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import wait_until

from minicelery import demo

REPO = Path(__file__).resolve().parent.parent

# A producer that never finishes on its own: it waits until a worker has run a task (so the
# whole demo is up), says so, and blocks. Only a signal to the demo can end this demo.
BLOCKING_PRODUCER = """
import threading
from demo_tasks import world
print("producer: a worker ran", world().start().result(timeout=60), flush=True)
threading.Event().wait()
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MINICELERY_")}


@pytest.fixture(scope="module")
def demo_run() -> subprocess.CompletedProcess[str]:
    """One full `minicelery demo`, shared by the tests that read its output."""
    return subprocess.run(
        [sys.executable, "-m", "minicelery", "demo"],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=110,
    )


@pytest.mark.slow
def test_the_demo_runs_the_original_readme_graph_and_every_process_exits_0(
    demo_run: subprocess.CompletedProcess[str],
) -> None:
    run = demo_run
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Hello World!!" in run.stdout
    assert "36 + 49 + 64 + 81 = 230" in run.stdout
    assert "workers exited [0, 0, 0]" in run.stdout
    assert "Traceback" not in run.stderr
    url = re.search(r"private Redis on (\S+),", run.stdout)
    assert url is not None, run.stdout
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url.group(1), socket_connect_timeout=5).ping()  # its Redis is gone


@pytest.mark.slow
def test_a_successful_demo_prints_no_warning_or_error_lines(demo_run: subprocess.CompletedProcess[str]) -> None:
    output = demo_run.stdout + demo_run.stderr
    assert demo_run.returncode == 0, output[-2000:]
    noisy = [line for line in output.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]
    assert noisy == []


def _process(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a live process from /proc/PID/stat, or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and ")"
    return int(fields[1]), fields[0], fields[19]


def _descendants(root: int) -> dict[int, str]:
    """Every live descendant of `root`: pid -> start time (so a reused pid does not count)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _process(int(entry.name))) is not None:
            table[int(entry.name)] = info
    found: dict[int, str] = {}
    parents = [root]
    while parents:
        parent = parents.pop()
        for pid, (ppid, state, started) in table.items():
            if ppid == parent and state != "Z":
                found[pid] = started
                parents.append(pid)
    return found


def _alive(pid: int, started: str) -> bool:
    info = _process(pid)
    return info is not None and info[2] == started and info[1] != "Z"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_stop_signal_to_the_demo_stops_its_workers_producer_and_redis_and_exits_128_plus_the_signal(
    tmp_path: Path, signum: int, exit_code: int
) -> None:
    examples = tmp_path / "examples"  # the demo takes ./examples first
    examples.mkdir()
    for name in ("demo_tasks.py", "worker.py"):
        shutil.copy(REPO / "examples" / name, examples / name)
    (examples / "producer.py").write_text(BLOCKING_PRODUCER)
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minicelery", "demo", "--workers", "2"],
            cwd=tmp_path,
            env=_clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    started: dict[int, str] = {}
    try:
        wait_until(
            lambda: "producer: a worker ran World!" in log_path.read_text() or proc.poll() is not None,
            60,
            "the demo's producer to see a task run",
        )
        assert proc.poll() is None, log_path.read_text()
        started.update(_descendants(proc.pid))
        commands = [_command(pid) for pid in started]
        assert sum("redis-server" in c or "valkey" in c for c in commands) == 1, commands
        assert sum(c.endswith("worker.py ") for c in commands) == 2, commands
        assert sum(c.endswith("producer.py ") for c in commands) == 1, commands

        proc.send_signal(signum)
        assert proc.wait(timeout=60) == exit_code, log_path.read_text()
        wait_until(
            lambda: not any(_alive(pid, t) for pid, t in started.items()), 30, "every process the demo started to exit"
        )
        output = log_path.read_text()
        assert f"demo: stopped by {signal.Signals(signum).name}" in output
        assert "Traceback" not in output, output
    finally:  # a failing test must not leak them either
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, t in started.items():
            if _alive(pid, t):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_the_demo_refuses_a_worker_count_below_one_with_a_usage_error(workers: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "minicelery", "demo", "--workers", workers],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.splitlines()[-1].startswith("minicelery demo: error: argument --workers:")
    assert "Traceback" not in run.stderr


def test_an_exception_in_the_demo_stops_the_workers_and_redis_it_had_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any error while the demo runs (here: its second worker cannot start) still stops its children."""
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        if str(args[-1]).endswith("worker.py") and len(started) == 2:  # redis-server and one worker run
            raise OSError("no second worker today")
        child = real_popen(args, **kwargs)  # type: ignore[call-overload]
        started.append(child)
        return child

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.chdir(REPO)
    for key in [k for k in os.environ if k.startswith("MINICELERY_")]:
        monkeypatch.delenv(key)
    try:
        with pytest.raises(OSError, match="no second worker today"):
            demo.run_demo(workers=2)
        assert [child.poll() is not None for child in started] == [True, True]
    finally:
        for child in started:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert signal.getsignal(signal.SIGTERM) == handler  # the demo's handlers are gone again


def test_a_child_that_ignores_sigterm_is_killed_once_the_stop_bound_has_passed() -> None:
    with (
        subprocess.Popen([sys.executable, "-c", STUBBORN_CHILD], stdout=subprocess.PIPE, text=True) as stubborn,
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as polite,
    ):
        try:
            assert stubborn.stdout is not None and stubborn.stdout.readline() == "ignoring SIGTERM\n"
            assert demo.stop_all([stubborn, polite], bound=0.5) == [-signal.SIGKILL, -signal.SIGTERM]
        finally:
            for child in (stubborn, polite):
                if child.poll() is None:
                    child.kill()


STUBBORN_CHILD = """
import signal, threading
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
threading.Event().wait()
"""


def _pip_installs(target: str, venv: Path) -> list[str]:
    """The `pip install -e` specs `make TARGET` would run in a venv that does not exist yet."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    plan = subprocess.run(
        [make, "--dry-run", "--always-make", f"VENV={venv}", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return re.findall(r"pip install .*-e '([^']+)'", plan)


def test_make_demo_on_a_fresh_machine_installs_only_the_runtime_and_the_embedded_redis(tmp_path: Path) -> None:
    assert _pip_installs("demo", tmp_path / "venv") == [".[embedded]"]


def test_make_test_and_make_lint_still_install_the_test_and_deploy_tools(tmp_path: Path) -> None:
    for target in ("test", "lint"):
        assert _pip_installs(target, tmp_path / "venv")[-1] == ".[test,embedded,deploy]"
