"""deploy/podman/minicelery@.container: accepted by Podman's quadlet generator (which rejects
unknown keys), and what it generates passes `systemd-analyze verify` with no output at all."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

from conftest import require_tool
from deploytools import REPO

PODMAN_DIR = REPO / "deploy" / "podman"


def test_quadlet_generates_a_notify_service_that_systemd_accepts(tmp_path: Path) -> None:
    quadlet = require_tool("quadlet", "bash .ci/install-quadlet (Podman 5's generator; bookworm's podman has none)")
    analyze = require_tool("systemd-analyze", "apt-get install systemd")
    require_tool("podman", "apt-get install podman")  # the generated ExecStart= runs it: verify wants it to exist
    run = subprocess.run(
        [quadlet, "-dryrun"], env={**os.environ, "QUADLET_UNIT_DIRS": str(PODMAN_DIR)}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    units = dict(re.findall(r"(?ms)^---(\S+)---\n(.*?)(?=^---\S+---\n|\Z)", run.stdout))
    assert set(units) == {"minicelery@.service"}, run.stdout
    service = units["minicelery@.service"]
    for line in ("Type=notify", "NotifyAccess=all", "RestartPreventExitStatus=78", "WatchdogSec=60"):
        assert line in service.splitlines(), line
    assert "--sdnotify=container" in service
    # The worker learns the watchdog interval only from this variable: it must match WatchdogSec.
    assert "--env WATCHDOG_USEC=60000000" in service
    # Stopping waits longer than the worker's shutdown grace, and systemd longer than Podman.
    grace = tomllib.loads((REPO / "config" / "tasks.toml").read_text())["worker"]["shutdown_grace"]
    stop_timeout = int(re.search(r"--stop-timeout (\d+)", service).group(1))  # type: ignore[union-attr]
    timeout_stop = int(re.search(r"(?m)^TimeoutStopSec=(\d+)$", service).group(1))  # type: ignore[union-attr]
    assert grace < stop_timeout < timeout_stop, (grace, stop_timeout, timeout_stop)
    assert "TimeoutStartSec=infinity" in service.splitlines()  # waits for Redis, like the plain unit

    (tmp_path / "minicelery@.service").write_text(service)
    verify = subprocess.run(
        [analyze, "verify", str(tmp_path / "minicelery@tasks.service")], capture_output=True, text=True
    )
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr


def test_quadlet_rejects_what_it_does_not_know(tmp_path: Path) -> None:
    """The check above means something: a misspelt key fails the generator."""
    quadlet = require_tool("quadlet", "bash .ci/install-quadlet")
    bad = (PODMAN_DIR / "minicelery@.container").read_text().replace("Notify=true", "Notfy=true")
    (tmp_path / "minicelery@.container").write_text(bad)
    run = subprocess.run(
        [quadlet, "-dryrun"], env={**os.environ, "QUADLET_UNIT_DIRS": str(tmp_path)}, capture_output=True, text=True
    )
    assert run.returncode != 0 and "Notfy" in run.stderr
