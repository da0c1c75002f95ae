"""`minicelery worker -c N`: a supervisor and N real worker processes, under real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import Workers, wait_until
from helpers import NotifySocket
from prometheus_client.parser import text_string_to_metric_families
from worktasks import executions

from minicelery import Client
from minicelery.redis_server import RedisServer, free_port
from minicelery.settings import usable_cpus


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def children(proc: subprocess.Popen[bytes]) -> set[int]:
    """The supervisor's child processes now."""
    try:
        text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(pid) for pid in text.split()}


def ready_children(workers: Workers, proc: subprocess.Popen[bytes]) -> set[int]:
    """Children that told the supervisor they are ready (and still run)."""
    said = {int(pid) for pid in re.findall(r"worker child (\d+) \(slot \d+\) is ready", workers.log(proc))}
    return said & children(proc)


def start_pool(workers: Workers, n: int, **settings: str) -> subprocess.Popen[bytes]:
    proc = workers.start("-c", str(n), **settings)
    wait_until(lambda: f"all {n} worker children ready" in workers.log(proc) or proc.poll() is not None, 30, "pool")
    assert proc.poll() is None, workers.log(proc)
    return proc


def start_metered_pool(
    workers: Workers, tmp_path: Path, n: int, **settings: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A pool of `n` children with metrics on a free port and its own RUNTIME_DIRECTORY (where
    the children's metric files go); returns it, the port and that directory."""
    port = free_port()
    runtime = tmp_path / "run"
    runtime.mkdir()
    metrics = {"MINICELERY_METRICS__ENABLED": "true", "MINICELERY_METRICS__PORT": str(port)}
    proc = start_pool(workers, n, **metrics, RUNTIME_DIRECTORY=str(runtime), **settings)
    return proc, port, runtime


def test_n_children_start_and_every_one_of_them_runs_tasks(app: Client, workers: Workers) -> None:
    proc = start_pool(workers, 3)
    assert len(children(proc)) == 3
    handles = app.start_many([app.tasks["pid_after"](0.05) for _ in range(60)])
    ran_in = {h.result(timeout=30) for h in handles}
    assert ran_in == children(proc)  # every child ran tasks; the supervisor ran none
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_ready_watchdog_and_status_come_from_the_supervisor_only_once_every_child_is_ready(
    tmp_path: Path, queue: str, notify: NotifySocket
) -> None:
    port = free_port()
    pool = Workers(f"redis://127.0.0.1:{port}/0", queue, tmp_path)
    try:
        proc = pool.start("-c", "2", NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
        wait_until(lambda: len(children(proc)) == 2, 20, "two children")
        wait_until(lambda: "waiting for Redis" in pool.log(proc), 20, "children to wait for Redis")
        wait_until(lambda: notify.seen("STATUS="), 10, "a status while waiting")
        assert not notify.seen("READY=1")  # no child is ready while Redis is down
        with RedisServer(port=port):
            wait_until(lambda: notify.seen("READY=1"), 20, "READY=1")
            wait_until(lambda: len(notify.seen("WATCHDOG=1")) >= 3, 10, "watchdog pings")
            senders = {pid for pid, _ in notify.drain()}
            assert senders == {proc.pid}  # NotifyAccess=main holds: children never notify
            assert f"MAINPID={proc.pid}" in [line for _, line in notify.messages]
            statuses = [line for _, line in notify.messages if line.startswith("STATUS=")]
            assert any("2/2 children ready" in line for line in statuses), statuses
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert notify.seen("STOPPING=1") == [proc.pid]
    finally:
        pool.stop_all()


def test_a_child_killed_with_sigkill_is_replaced_and_no_task_is_lost(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    proc = start_pool(workers, 2, MINICELERY_WORKER__BATCH_SIZE="1")
    first = children(proc)
    tags = [f"{app.default_queue}-{i}" for i in range(2)]
    handles = [app.tasks["slow_count"](tag, 3).start() for tag in tags]
    wait_until(lambda: all(executions(r).get(tag) for tag in tags), 20, "a task running in each child")
    victim = min(first)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    replacement = wait_until(lambda: ready_children(workers, proc) - first, 30, "a replacement child")
    print(f"killed child replaced and ready after {time.monotonic() - killed_at:.2f} s")
    assert len(children(proc)) == 2 and proc.poll() is None
    # The killed child's task is reclaimed after its lease (5 s here) and runs again.
    assert [h.result(timeout=60) for h in handles] == tags
    assert replacement and victim not in children(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_sigterm_lets_every_child_finish_its_task_then_exits_0(app: Client, workers: Workers, r: redis.Redis) -> None:
    proc = start_pool(workers, 3)
    tags = [f"{app.default_queue}-{i}" for i in range(3)]
    handles = [app.tasks["marked_sleep"](tag, 1.5).start() for tag in tags]
    wait_until(lambda: all(r.hget("test:started", tag) for tag in tags), 20, "a task in every child")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert [h.result(timeout=1) for h in handles] == tags
    assert all(r.hget("test:finished", tag) == b"1" for tag in tags)
    assert not children(proc)


def test_a_second_sigterm_makes_every_child_hand_its_task_back_and_exits_75(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    proc = start_pool(workers, 2)
    tags = [f"{app.default_queue}-{i}" for i in range(2)]
    handles = [app.tasks["marked_sleep"](tag, 60).start() for tag in tags]
    wait_until(lambda: all(r.hget("test:started", tag) for tag in tags), 20, "a task in every child")
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping 2 worker children" in workers.log(proc), 10, "the stop to be passed on")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 75
    assert all(h.state == "ready" for h in handles), [h.state for h in handles]  # back in the queue


def test_sighup_replaces_children_one_by_one_while_tasks_flow_with_none_lost_or_run_twice(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    proc = start_pool(workers, 3)
    old = children(proc)
    count_run, tags, handles = app.tasks["slow_count"], [], []
    fewest = [len(old)]
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            tag = f"{app.default_queue}-{i}"
            tags.append(tag)
            handles.append(count_run(tag, 0.02).start())
            fewest[0] = min(fewest[0], len(ready_children(workers, proc) | (children(proc) & old)))
            i += 1
            time.sleep(0.01)  # a steady stream, not a synchronisation

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(lambda: len(tags) >= 30, 20, "tasks to flow")
        started = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload done" in workers.log(proc), 60, "the reload to finish")
        took = time.monotonic() - started
        wait_until(lambda: len(tags) >= 30 + 50, 20, "tasks to flow after the reload")
    finally:
        stop.set()
        producer.join()
    new = children(proc)
    assert len(new) == 3 and not new & old  # every child replaced
    replaced = re.findall(r"worker child (\d+) \(slot (\d+)\) replaced by reload", workers.log(proc))
    assert [int(pid) for pid, _ in replaced] and {int(pid) for pid, _ in replaced} == old
    assert sorted(int(slot) for _, slot in replaced) == [0, 1, 2]  # one at a time, in turn
    assert fewest[0] >= 2  # never fewer than N-1 working
    results = [h.result(timeout=60) for h in handles]
    assert results == tags
    counts = executions(r)
    assert [counts.get(tag) for tag in tags] == [1] * len(tags)  # none lost, none run twice
    print(f"reload of 3 children: {took:.2f} s, {len(tags)} tasks, each run once")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_a_child_is_recycled_after_max_tasks_per_child_and_every_task_runs(app: Client, workers: Workers) -> None:
    proc = start_pool(workers, 2, MINICELERY_WORKER__MAX_TASKS_PER_CHILD="5", MINICELERY_WORKER__BATCH_SIZE="1")
    handles = app.start_many([app.tasks["pid_after"](0.01) for _ in range(40)])
    pids = [h.result(timeout=60) for h in handles]
    per_pid: dict[int, int] = {}
    for pid in pids:
        per_pid[pid] = per_pid.get(pid, 0) + 1  # type: ignore[index]
    assert max(per_pid.values()) <= 5 and len(per_pid) >= 8
    assert "recycled (max_tasks_per_child)" in workers.log(proc)
    wait_until(lambda: len(children(proc)) == 2, 20, "two children again")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0) or usable_cpus() < 2, reason="needs CPUs 0 and 1 usable")
def test_concurrency_auto_starts_a_child_per_usable_cpu_and_says_so(app: Client, workers: Workers) -> None:
    proc = workers.start("-c", "auto", wrapper=("taskset", "-c", "0,1"))  # 2 CPUs, on any machine
    wait_until(lambda: "all 2 worker children ready" in workers.log(proc) or proc.poll() is not None, 30, "pool")
    assert 'started 2 worker children (concurrency "auto": 2 usable CPUs)' in workers.log(proc)
    assert len(children(proc)) == 2
    assert app.tasks["echo"]("auto").start().result(timeout=30) == "auto"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    single = workers.start("-c", "auto", wrapper=("taskset", "-c", "0"))  # 1 CPU: no supervisor
    workers.wait_ready(single)
    assert 'concurrency "auto": 1 usable CPU, so one worker process' in workers.log(single)
    assert not children(single)
    single.send_signal(signal.SIGTERM)
    assert single.wait(timeout=30) == 0


def test_a_task_module_that_fails_to_import_exits_78_before_any_child_starts(workers: Workers) -> None:
    proc = workers.start("-c", "3", MINICELERY_TASKS='["no_such_module_here"]')
    assert proc.wait(timeout=30) == 78
    assert "no_such_module_here" in workers.log(proc) and "worker child" not in workers.log(proc)


def test_children_that_keep_dying_at_start_up_make_the_supervisor_give_up(tmp_path: Path, queue: str) -> None:
    with RedisServer(password="right") as server:
        pool = Workers(server.url.replace(":right@", ":wrong@"), queue, tmp_path)
        try:
            proc = pool.start("-c", "2")
            code = proc.wait(timeout=60)
        finally:
            pool.stop_all()
    assert code == 78, pool.log(proc)  # refused credentials: a config error, not restarted by systemd
    assert "died 5 times before they were ready" in pool.log(proc)


def test_children_that_keep_crashing_at_start_up_make_the_supervisor_exit_1_saying_why(
    workers: Workers, tmp_path: Path
) -> None:
    """A crash loop that is not a config error (here every child exits 3 at start-up, as one whose
    native library aborts would): the supervisor gives up and exits 1, for systemd to restart."""
    (tmp_path / "crashing_tasks.py").write_text(
        "import os\n"
        "import sys\n"
        "import worktasks  # noqa: F401  (registers the test tasks)\n"
        "if '--pool-child' in sys.argv:  # a fresh worker child dies as it imports this\n"
        "    os._exit(3)\n"
        "os.register_at_fork(after_in_child=lambda: os._exit(3))  # and so does a forked one\n"
    )
    path = os.pathsep.join([str(tmp_path), workers.env()["PYTHONPATH"]])
    proc = workers.start("-c", "2", MINICELERY_TASKS='["crashing_tasks"]', PYTHONPATH=path)
    assert proc.wait(timeout=60) == 1, workers.log(proc)
    log = workers.log(proc)
    assert "died 5 times before they were ready (the last: exit 3): a crash loop; " in log
    assert "stopping the others and exiting 1" in log
    assert not children(proc)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples(text).items() if n == name and wanted <= have)


def test_metrics_are_summed_across_children_and_kept_when_children_are_replaced(
    app: Client, workers: Workers, tmp_path: Path
) -> None:
    proc, port, runtime = start_metered_pool(
        workers, tmp_path, 2, MINICELERY_WORKER__MAX_TASKS_PER_CHILD="4", MINICELERY_WORKER__BATCH_SIZE="1"
    )
    assert scrape(port, "/readyz")[0] == 200 and scrape(port, "/healthz")[0] == 200
    handles = app.start_many([app.tasks["echo"](i) for i in range(40)])
    assert [h.result(timeout=60) for h in handles] == list(range(40))
    succeeded = {"task": "echo", "outcome": "succeeded"}
    wait_until(lambda: value(scrape(port)[1], "minicelery_task_outcomes_total", **succeeded) == 40, 20, "40 counted")
    started = time.monotonic()
    text = scrape(port)[1]
    print(f"scrape after {len(re.findall('recycled', workers.log(proc)))} recycles: {time.monotonic() - started:.4f} s")
    assert value(text, "minicelery_task_run_seconds_count", task="echo") == 40  # histograms too
    assert value(text, "minicelery_pool_child_tasks_total") == 40  # per slot, summed over replacements
    assert value(text, "minicelery_pool_child_restarts_total", reason="recycled") >= 8  # 40 tasks, 4 per child
    depth = [key for key in samples(text) if key[0] == "minicelery_queue_depth" and ("state", "ready") in key[1]]
    assert len(depth) == 1  # read once, by the supervisor, not once per child
    assert "pid=" not in text  # no per-process series piling up
    # A gone child's files are folded into one archive per type: files do not grow per respawn.
    files = sorted(p.name for p in (runtime / "metrics").iterdir())
    assert len(files) <= 2 * 2 + 2, files
    assert {"counter_archive.db", "histogram_archive.db"} <= set(files)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not (runtime / "metrics").exists()  # removed at exit


def test_a_child_above_max_memory_per_child_finishes_its_task_then_is_replaced(
    app: Client, workers: Workers, r: redis.Redis
) -> None:
    proc = start_pool(workers, 2, MINICELERY_WORKER__MAX_MEMORY_PER_CHILD="150")  # children start near 50 MiB
    first = children(proc)
    tag = f"{app.default_queue}-hog"
    handle = app.tasks["hold_memory"](200, tag).start()
    found = wait_until(
        lambda: re.search(r"worker child (\d+) \(slot \d+\) is above 150 MiB RSS", workers.log(proc)), 30, "recycle"
    )
    hog = int(found.group(1))  # type: ignore[union-attr]
    assert hog in first and hog in children(proc)  # asked to stop, it still runs its task
    r.rpush(f"test:gate:{tag}", 1)  # let the task finish
    assert handle.result(timeout=30) == hog  # finished by the child that was over the limit
    wait_until(lambda: len(ready_children(workers, proc) - {hog}) == 2, 30, "a replacement child")
    assert f"worker child {hog} (slot" in workers.log(proc) and "recycled (memory): exit 0" in workers.log(proc)
    assert hog not in children(proc) and first - {hog} <= children(proc)  # the other child untouched
    assert executions(r)[tag] == 1  # run once: not handed back, not run again
    assert app.tasks["echo"]("after").start().result(timeout=30) == "after"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_healthz_fails_and_the_watchdog_starves_while_a_child_is_stuck(workers: Workers, notify: NotifySocket) -> None:
    """A child stuck past its time limit stops pinging its supervisor (as a single worker stops
    feeding systemd's watchdog); SIGSTOP is the surest way to get a child that pings no more."""
    port = free_port()
    proc = start_pool(
        workers, 2, MINICELERY_METRICS__ENABLED="true", MINICELERY_METRICS__PORT=str(port),
        NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000",
    )  # fmt: skip
    assert scrape(port, "/healthz")[0] == 200
    stuck = min(children(proc))
    os.kill(stuck, signal.SIGSTOP)
    try:
        # (Draining the socket, as systemd does: a full socket would block the supervisor's sends.)
        wait_until(lambda: notify.drain() and scrape(port, "/healthz")[0] == 503, 30, "/healthz to fail")
        assert f"worker child {stuck} (slot " in scrape(port, "/healthz")[1]  # the body names it
        env = workers.env(MINICELERY_METRICS__ENABLED="true", MINICELERY_METRICS__PORT=str(port))
        health = subprocess.run([sys.executable, "-m", "minicelery", "health"], env=env, capture_output=True, text=True)
        assert health.returncode == 1 and f"worker child {stuck} (slot " in health.stdout, health  # as a probe says
        pings = len(notify.seen("WATCHDOG=1"))
        # Watch for two watchdog intervals (a window to see an absence in, not a synchronisation).
        window_ends = time.monotonic() + 2.0
        while time.monotonic() < window_ends:
            notify.drain()
            assert scrape(port, "/healthz")[0] == 503
        assert len(notify.seen("WATCHDOG=1")) == pings  # no ping while a child is stuck
    finally:
        os.kill(stuck, signal.SIGCONT)
    wait_until(lambda: scrape(port, "/healthz")[0] == 200, 30, "/healthz to recover")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_a_single_worker_logs_and_ignores_sighup_instead_of_dying(app: Client, workers: Workers) -> None:
    proc = workers.start()
    workers.wait_ready(proc)
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP ignored" in workers.log(proc), 10, "the warning")
    assert app.tasks["echo"]("alive").start().result(timeout=20) == "alive"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def deployed_pool(workers: Workers, tmp_path: Path, **settings: str) -> subprocess.Popen[bytes]:
    """A pool of 2 whose task module is the test's own tmp_path/deployed_tasks.py (rewritten
    between reloads, as a deploy would)."""
    path = os.pathsep.join([str(tmp_path), workers.env()["PYTHONPATH"]])
    return start_pool(workers, 2, MINICELERY_TASKS='["deployed_tasks"]', PYTHONPATH=path, **settings)


def test_a_reload_whose_fresh_child_fails_to_start_keeps_the_old_children_working(
    app: Client, workers: Workers, tmp_path: Path
) -> None:
    module = tmp_path / "deployed_tasks.py"
    module.write_text("import worktasks  # noqa: F401  (registers the test tasks)\n")
    proc = deployed_pool(workers, tmp_path)
    old = children(proc)
    module.write_text("raise RuntimeError('a broken deploy')\n")  # what the fresh child imports
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload abandoned" in workers.log(proc), 30, "the reload to give up")
    assert "a broken deploy" in workers.log(proc)
    assert children(proc) == old  # the old children keep working
    assert app.tasks["echo"]("still here").start().result(timeout=20) == "still here"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_a_sighup_during_a_reload_is_followed_by_one_more_reload_that_loads_the_latest_code(
    app: Client, workers: Workers, tmp_path: Path
) -> None:
    """Code deployed, SIGHUP; deployed again while that reload runs, SIGHUP again: the second is
    neither lost nor does it cut the first short; a second reload follows, so every child runs
    the latest code (a slot the first reload replaced may have read the code in between)."""
    module, gate = tmp_path / "deployed_tasks.py", tmp_path / "gate"

    def deploy(version: str) -> None:
        module.write_text(
            "import os, sys, time\n"
            "from worktasks import app\n"
            f"VERSION = {version!r}\n"
            "if '--pool-child' in sys.argv:  # a reload's fresh child: held until the test opens the gate\n"
            f"    open({str(gate)!r} + '.' + VERSION, 'w').close()\n"
            "    end = time.monotonic() + 60\n"
            f"    while not os.path.exists({str(gate)!r}) and time.monotonic() < end:\n"
            "        time.sleep(0.01)\n"
            "@app.task\n"
            "def deployed_version() -> list:\n"
            "    time.sleep(0.05)\n"
            "    return [VERSION, os.getpid()]\n"
        )

    deploy("a")
    proc = deployed_pool(workers, tmp_path, PYTHONDONTWRITEBYTECODE="1")
    old = children(proc)
    deploy("b")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: Path(f"{gate}.b").exists(), 30, "the first reload's fresh child to have read version b")
    deploy("c")
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGHUP)  # any number of them meanwhile make one more reload
    wait_until(lambda: "one more follows once this one is done" in workers.log(proc), 10, "the log line")
    gate.touch()
    wait_until(lambda: workers.log(proc).count("reload done") == 2, 60, "two reloads")
    log = workers.log(proc)
    assert log.count("reload: replacing 2 worker children") == 2 and log.count("one more follows") == 1
    assert len(re.findall(r"replaced by reload", log)) == 4 and not children(proc) & old
    version = app.task(name="deployed_version")(lambda: None)
    answers = [h.result(timeout=30) for h in app.start_many([version() for _ in range(40)])]
    assert {v for v, _ in answers} == {"c"}  # every child runs the latest code
    assert {pid for _, pid in answers} == children(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_a_reload_applies_a_new_concurrency_and_refuses_a_bad_config_keeping_the_children(
    app: Client, workers: Workers, tmp_path: Path
) -> None:
    config = tmp_path / "pool.toml"
    config.write_text("[worker]\nconcurrency = 2\n")
    proc = workers.start("--config", str(config))
    wait_until(lambda: "all 2 worker children ready" in workers.log(proc), 30, "2 children")
    config.write_text("[worker]\nconcurrency = 3\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "all 3 worker children ready" in workers.log(proc), 30, "a third child")
    wait_until(lambda: "reload done" in workers.log(proc), 30, "the reload")
    assert len(children(proc)) == 3 and "reload: concurrency 2 -> 3" in workers.log(proc)
    three = children(proc)

    config.write_text("[worker]\nconcurrency = 'many'\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused: the configuration is invalid" in workers.log(proc), 30, "the refusal")
    assert "worker.concurrency" in workers.log(proc) and children(proc) == three  # nothing replaced

    config.write_text("[worker]\nconcurrency = 2\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: workers.log(proc).count("reload done") == 2, 30, "the second reload")
    wait_until(lambda: len(children(proc)) == 2, 30, "the surplus child to stop")
    assert re.search(r"worker child \d+ \(slot 2\) stopped, concurrency is now 2: exit 0", workers.log(proc))
    pids = {h.result(timeout=30) for h in app.start_many([app.tasks["pid_after"](0.05) for _ in range(40)])}
    assert pids == children(proc)


def test_runs_that_end_their_child_are_counted_timed_out_or_cancelled(
    app: Client, workers: Workers, tmp_path: Path
) -> None:
    """A task that cannot be stopped ends its child (exit 70); its outcome still reaches the
    unit's counters, which outlive the child."""
    proc, port, _runtime = start_metered_pool(
        workers, tmp_path, 2, MINICELERY_WORKER__LEASE_SECONDS="2", MINICELERY_WORKER__BATCH_SIZE="1"
    )
    producer = Client(app.broker, default_queue=app.default_queue)
    Client.instances.remove(producer)
    limited = producer.task(name="swallow_all", time_limit=0.5)(app.tasks["swallow_all"].fn)
    past_limit = limited(600).start()  # catches its TimeLimitExceeded, every second
    ignores_cancel = app.tasks["swallow_all"](600).start()  # catches its Cancelled
    wait_until(lambda: ignores_cancel.state == "running", 20, "the second task to start")
    assert ignores_cancel.cancel()
    wait_until(lambda: workers.log(proc).count("exit 70") >= 2, 30, "both children to exit 70")

    def counted() -> bool:
        text = scrape(port)[1]
        return all(
            value(text, "minicelery_task_outcomes_total", task="swallow_all", outcome=kind) == 1
            for kind in ("timed_out", "dead_lettered", "cancelled")
        )

    wait_until(counted, 20, "both runs counted")
    assert past_limit.state == "failed" and ignores_cancel.state == "cancelled"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
