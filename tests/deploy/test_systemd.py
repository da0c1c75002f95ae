"""deploy/systemd/minicelery@.service, checked statically and then run under a real systemd.

The real one: a Debian rootfs booted with systemd-nspawn, the project installed into
/opt/minicelery from wheels, the unit installed as shipped, and a Redis (with a password, given
as a systemd credential) on host loopback.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool, wait_until
from deploytools import REPO, Machine, config_from_example, documented_blocks, documented_commands

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.redis_server import RedisServer, free_port
from minicelery.task import Task

# Building the rootfs (debootstrap, once per machine) and the image take minutes, not seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

UNIT = REPO / "deploy" / "systemd" / "minicelery@.service"
EXAMPLE_CONFIG = REPO / "config" / "tasks.toml"
PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]
GUIDE = REPO / "deploy" / "systemd" / "README.md"
# The credential drop-in exactly as the guide gives it.
(CREDENTIAL_DROP_IN,) = documented_blocks(GUIDE, "Redis password", "ini")
# The container's systemd gives up on a start after this (the default is 90 s): a short default
# proves the unit's own TimeoutStartSec= in seconds rather than minutes.
DEFAULT_TIMEOUT_START = 5


def test_unit_passes_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "apt-get install systemd")
    # verify wants ExecStart= to exist: check a copy that runs this checkout's installed command.
    minicelery = str(Path(sys.executable).with_name("minicelery"))
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/minicelery/bin/minicelery", minicelery))
    verify = subprocess.run(
        [analyze, "verify", str(tmp_path / "minicelery@tasks.service")], capture_output=True, text=True
    )
    # verify exits 0 on unknown keys and bad values: any output at all is a finding.
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=15", str(UNIT)], capture_output=True, text=True
    )
    assert security.returncode == 0, security.stdout + security.stderr
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert score and float(score.group(1)) <= 1.5, security.stdout[-500:]


@pytest.fixture(scope="module")
def machine(rootfs: Path, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    root = tmp_path_factory.mktemp("machine") / "root"
    subprocess.run(["cp", "-a", str(rootfs), str(root)], check=True)
    nspawn = require_tool("systemd-nspawn", "apt-get install systemd-container")
    # The guide's offline install, with the wheels directory bound at /wheels.
    (pip,) = [c for c in documented_commands(GUIDE, "Install", "/opt/minicelery/bin/pip") if "--no-index" in c]
    venv = ["python3", "-m", "venv", "/opt/minicelery"]
    assert venv in documented_commands(GUIDE, "Install", "python3")
    install = f"{shlex.join(venv)} && {shlex.join(pip).replace('--find-links wheels', '--find-links /wheels')} -q"
    subprocess.run(
        [nspawn, "-q", "-D", str(root), "--register=no", "--keep-unit", f"--bind-ro={wheelhouse}:/wheels",
         "/bin/sh", "-c", install],
        check=True,
    )  # fmt: skip
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    (root / "etc/systemd/system.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/system.conf.d/minicelery-test.conf").write_text(
        f"[Manager]\nDefaultTimeoutStartSec={DEFAULT_TIMEOUT_START}s\n"
    )
    (root / "srv/minicelery").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "worktasks.py", root / "srv/minicelery/worktasks.py")
    booted = Machine(root, f"mc-{uuid.uuid4().hex[:6]}", tmp_path_factory.mktemp("logs") / "nspawn.log")
    try:
        yield booted
    finally:
        booted.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def stop_drains(machine: Machine, unit: str, running: dict[Task, object]) -> float:
    """`systemctl stop` while the `running` tasks run: each still finishes with its value, the
    unit ends inactive, success, exit 0, with no traceback in its journal. Returns the stop's
    seconds."""
    began = time.monotonic()
    stop = machine.run("systemctl", "stop", unit)
    took = time.monotonic() - began
    assert stop.returncode == 0, stop.stderr
    assert {handle: handle.result(timeout=1) for handle in running} == running
    final = machine.show(unit, "ActiveState", "Result", "ExecMainStatus")
    assert final == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, final
    assert "Traceback" not in machine.journal(unit)
    return took


def install_instance(machine: Machine, name: str, redis_port: int, queue: str, **settings: object) -> int:
    """/etc/minicelery/NAME.toml from the example, the password credential; returns its metrics port."""
    metrics_port = free_port()
    machine.write(
        f"/etc/minicelery/{name}.toml",
        config_from_example(tasks=["worktasks"], url=f"redis://127.0.0.1:{redis_port}/0", queues=[queue],
                            port=metrics_port, **settings),
    )  # fmt: skip
    machine.write(f"/etc/minicelery/{name}.redis-password", PASSWORD + "\n")
    (machine.root / f"etc/minicelery/{name}.redis-password").chmod(0o600)
    machine.write(f"/etc/systemd/system/minicelery@{name}.service.d/credential.conf", CREDENTIAL_DROP_IN)
    assert machine.run("systemctl", "daemon-reload").returncode == 0
    return metrics_port


def client_for(server: RedisServer, queue: str) -> Client:
    app = Client(RedisBroker(JSONTransport(), url=server.url, result_ttl=600, max_block=1), default_queue=queue)
    import worktasks

    worktasks.register(app)
    Client.instances.remove(app)
    return app


def test_start_waits_for_redis_runs_tasks_reports_status_and_stop_drains(machine: Machine) -> None:
    unit, queue, port = "minicelery@tasks.service", f"q-{uuid.uuid4().hex[:8]}", free_port()
    install_instance(machine, "tasks", port, queue)
    # A short watchdog for this instance: waiting for Redis must keep feeding it (60 s as shipped).
    machine.write(f"/etc/systemd/system/{unit}.d/watchdog.conf", "[Service]\nWatchdogSec=4\n")
    assert machine.run("systemctl", "daemon-reload").returncode == 0
    # Redis is not there yet: the unit must stay "activating" (no READY=1) while it waits, past
    # the manager's start timeout (5 s here, 90 s by default): the unit says TimeoutStartSec=infinity.
    manager = machine.run("systemctl", "show", "-p", "DefaultTimeoutStartUSec").stdout.strip()
    assert manager == f"DefaultTimeoutStartUSec={DEFAULT_TIMEOUT_START}s", manager
    began = time.monotonic()
    assert machine.run("systemctl", "start", "--no-block", unit).returncode == 0
    wait_until(lambda: "waiting for Redis" in machine.journal(unit), 30, "the worker to wait for Redis")
    time.sleep(max(0.0, DEFAULT_TIMEOUT_START + 4 - (time.monotonic() - began)))  # past both
    waiting = machine.show(unit, "ActiveState", "SubState", "NRestarts", "TimeoutStartUSec", "StatusText")
    assert waiting.pop("StatusText").startswith("waiting for Redis"), waiting
    assert waiting == {"ActiveState": "activating", "SubState": "start", "NRestarts": "0",
                       "TimeoutStartUSec": "infinity"}, waiting  # fmt: skip
    with RedisServer(port, password=PASSWORD) as server:
        redis_up = time.monotonic()
        wait_until(lambda: machine.show(unit, "ActiveState")["ActiveState"] == "active", 60, "READY=1")
        print(f"\nsystemd: active {time.monotonic() - redis_up:.2f} s after Redis came up")
        app = client_for(server, queue)
        assert app.tasks["add"](2, 3).start().result(timeout=30) == 5
        wait_until(lambda: "1 done" in machine.show(unit, "StatusText")["StatusText"], 30, "STATUS= with the count")
        props = machine.show(unit, "StatusText", "MainPID", "User", "NRestarts")
        assert props["NRestarts"] == "0"
        # The guide's check-config and host command line, with the installed config.
        (check,) = documented_commands(GUIDE, "Install", "PYTHONPATH=/srv/minicelery")
        run = machine.run("env", *check)
        assert run.returncode == 0 and '"worktasks"' in run.stdout, run.stdout + run.stderr
        (cli,) = documented_commands(
            GUIDE, "Redis password", "MINICELERY_REDIS__PASSWORD_FILE=/etc/minicelery/tasks.redis-password"
        )
        run = machine.run("env", *cli)
        assert run.returncode == 0 and queue in run.stdout, run.stdout + run.stderr
        assert machine.run(*cli[1:]).returncode != 0  # without the password file: refused

        # `systemctl stop` while a 12 s task runs (longer than Podman's and many tools' 10 s): it
        # finishes within shutdown_grace, the worker exits 0, nothing is lost.
        slow = app.tasks["sleep_for"](12).start()
        wait_until(lambda: slow.state == "running", 30, "the slow task to start")
        took = stop_drains(machine, unit, {slow: 12})
        print(f"systemd: stop with a running 12 s task took {took:.2f} s")
        app.broker.close()


def test_a_hung_worker_is_killed_by_the_watchdog_and_restarted(machine: Machine) -> None:
    unit, queue = "minicelery@hang.service", f"q-{uuid.uuid4().hex[:8]}"
    with RedisServer(password=PASSWORD) as server:
        # A task stuck in C code that holds the GIL: nothing in the worker runs, so it stops
        # pinging at once; WatchdogSec=3 s later systemd kills it. (A task that merely swallows
        # its time limit is ended by the worker itself: tests/test_misbehaving_tasks.py.)
        install_instance(machine, "hang", server.port, queue, lease_seconds=2.0, idle_block_max=1.0,
                         default_time_limit=1.0, shutdown_grace=1.0)  # fmt: skip
        machine.write(f"/etc/systemd/system/{unit}.d/watchdog.conf", "[Service]\nWatchdogSec=3\n")
        assert machine.run("systemctl", "daemon-reload").returncode == 0
        assert machine.run("systemctl", "start", unit).returncode == 0
        first_pid = machine.show(unit, "MainPID")["MainPID"]
        app = client_for(server, queue)
        app.tasks["hold_gil"](600).start()
        wait_until(lambda: "Failed with result 'watchdog'" in machine.journal(unit), 60, "the watchdog to fire")
        assert "Watchdog timeout" in machine.journal(unit)
        wait_until(lambda: machine.show(unit, "NRestarts")["NRestarts"] != "0", 30, "a restart")
        wait_until(lambda: machine.show(unit, "ActiveState")["ActiveState"] == "active", 30, "the new worker")
        assert machine.show(unit, "MainPID")["MainPID"] != first_pid
        app.broker.purge(queue)  # or the stuck task hangs the next worker too (until dead-lettered)
        machine.run("systemctl", "stop", unit)
        app.broker.close()


def test_a_config_error_exits_78_and_is_not_restarted(machine: Machine) -> None:
    unit = "minicelery@bad.service"
    machine.write("/etc/minicelery/bad.toml", EXAMPLE_CONFIG.read_text().replace("lease_seconds", "lease_secs"))
    start = machine.run("systemctl", "start", unit)
    assert start.returncode != 0
    props = machine.show(unit, "ActiveState", "SubState", "ExecMainStatus", "NRestarts", "Result")
    # SubState "failed", not "auto-restart": systemd has decided not to try again.
    assert props == {"ActiveState": "failed", "SubState": "failed", "ExecMainStatus": "78", "NRestarts": "0",
                     "Result": "exit-code"}, props  # fmt: skip
    assert "lease_secs" in machine.journal(unit)


def test_a_missing_credential_file_fails_the_unit_once_with_a_clear_reason(machine: Machine) -> None:
    """The credential drop-in, but no password file: failed, not restarting in a loop."""
    unit = "minicelery@nocred.service"
    machine.write("/etc/minicelery/nocred.toml", EXAMPLE_CONFIG.read_text())
    machine.write(f"/etc/systemd/system/{unit}.d/credential.conf", CREDENTIAL_DROP_IN)
    assert machine.run("systemctl", "daemon-reload").returncode == 0
    start = machine.run("systemctl", "start", unit)
    assert start.returncode != 0
    time.sleep(3)  # longer than RestartSec=2: a restart would have happened by now
    props = machine.show(unit, "ActiveState", "SubState", "NRestarts", "Result")
    print(f"\nmissing credential: {start.stderr.strip()} {props}")
    assert props == {"ActiveState": "failed", "SubState": "failed", "NRestarts": "0", "Result": "exit-code"}, props
    assert "status=243/CREDENTIALS" in machine.run("systemctl", "status", unit).stdout
    assert "Failed to set up credentials" in machine.journal(unit)


def test_concurrency_3_starts_three_children_survives_a_killed_one_reloads_and_stop_drains(machine: Machine) -> None:
    """The shipped unit with `concurrency = 3` under a real systemd: READY=1 once three children
    are ready; kill -9 of a child gets a new one while the unit stays active (no restart);
    `systemctl reload` during a stream of tasks replaces every child with no task lost or run twice;
    `systemctl stop` drains them all and the unit ends `success`."""
    unit, queue, port = "minicelery@pool.service", f"q-{uuid.uuid4().hex[:8]}", free_port()
    install_instance(machine, "pool", port, queue, concurrency=3, batch_size=1)
    with RedisServer(port, password=PASSWORD) as server:
        assert machine.run("systemctl", "start", unit).returncode == 0  # returns on READY=1
        main = int(machine.show(unit, "MainPID")["MainPID"])

        def children() -> set[int]:
            return {int(pid) for pid in machine.run("cat", f"/proc/{main}/task/{main}/children").stdout.split()}

        first = children()
        assert len(first) == 3 and machine.show(unit, "ActiveState")["ActiveState"] == "active"
        app = client_for(server, queue)
        assert sorted(h.result(timeout=30) for h in app.start_many([app.tasks["add"](i, 1) for i in range(30)])) == [
            i + 1 for i in range(30)
        ]
        victim = min(first)
        assert machine.run("/bin/sh", "-c", f"kill -9 {victim}").returncode == 0  # (minbase: no /bin/kill)
        wait_until(lambda: len(children()) == 3 and victim not in children(), 30, "a new child")
        wait_until(lambda: "3/3 children ready" in machine.show(unit, "StatusText")["StatusText"], 30, "3 ready")
        assert machine.show(unit, "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}

        before = children()
        tags = [f"t{i}" for i in range(100)]
        handles = app.start_many([app.tasks["note_run"](tag, 0.05) for tag in tags])
        began = time.monotonic()
        assert machine.run("systemctl", "reload", unit).returncode == 0
        wait_until(lambda: "reload done" in machine.journal(unit), 60, "the reload to finish")
        print(f"\nsystemd: reload of 3 children took {time.monotonic() - began:.2f} s")
        assert len(children()) == 3 and not children() & before  # all replaced
        assert int(machine.show(unit, "MainPID")["MainPID"]) == main  # the same service, no restart
        assert [h.result(timeout=60) for h in handles] == tags  # none lost
        runs = machine.run("cat", "/run/minicelery-pool/runs").stdout.split()  # each run, as the task noted it
        assert sorted(runs) == sorted(tags)  # none run twice because of the reload

        slow = [app.tasks["sleep_for"](3).start() for _ in range(3)]
        wait_until(lambda: all(h.state == "running" for h in slow), 30, "a slow task in every child")
        stop_drains(machine, unit, dict.fromkeys(slow, 3))  # each child finishes its task
        app.broker.close()


def test_with_concurrency_a_hung_child_starves_the_watchdog_and_the_unit_is_restarted(machine: Machine) -> None:
    unit, queue = "minicelery@poolhang.service", f"q-{uuid.uuid4().hex[:8]}"
    with RedisServer(password=PASSWORD) as server:
        # One child holds the GIL in C code: it stops pinging its supervisor, which stops feeding
        # systemd's watchdog although the other child is fine.
        install_instance(machine, "poolhang", server.port, queue, concurrency=2, lease_seconds=2.0,
                         idle_block_max=1.0, default_time_limit=1.0, shutdown_grace=1.0)  # fmt: skip
        machine.write(f"/etc/systemd/system/{unit}.d/watchdog.conf", "[Service]\nWatchdogSec=3\n")
        assert machine.run("systemctl", "daemon-reload").returncode == 0
        assert machine.run("systemctl", "start", unit).returncode == 0
        first_pid = machine.show(unit, "MainPID")["MainPID"]
        app = client_for(server, queue)
        app.tasks["hold_gil"](600).start()
        wait_until(lambda: "stopped pinging" in machine.journal(unit), 60, "the supervisor to see the hang")
        wait_until(lambda: "Failed with result 'watchdog'" in machine.journal(unit), 60, "the watchdog to fire")
        app.broker.purge(queue)  # or the stuck task hangs the next pool too (until dead-lettered)
        wait_until(lambda: machine.show(unit, "NRestarts")["NRestarts"] != "0", 30, "a restart")
        wait_until(lambda: machine.show(unit, "ActiveState")["ActiveState"] == "active", 60, "the new pool")
        assert machine.show(unit, "MainPID")["MainPID"] != first_pid
        machine.run("systemctl", "stop", unit)
        app.broker.close()
