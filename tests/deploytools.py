"""What the deploy tests share: a Debian rootfs made by debootstrap, a wheelhouse of the
project, and a systemd machine booted from that rootfs with systemd-nspawn.

The rootfs is built once per machine (cached in $MINICELERY_ROOTFS, default
/var/tmp/minicelery-rootfs) and used read-only: the systemd tests boot a copy, the container
tests import it as the image's base.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import require_tool, wait_until

REPO = Path(__file__).resolve().parent.parent
ROOTFS = Path(os.environ.get("MINICELERY_ROOTFS", "/var/tmp/minicelery-rootfs"))
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv"
COMPLETE = ".minicelery-rootfs-complete"


def debian_mirror() -> str:
    """The mirror apt already uses (only it is reachable on CI machines)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        if line.startswith("deb ") and "security" not in line:
            return line.split()[1]
    raise RuntimeError("no Debian mirror found in the apt sources")


@contextlib.contextmanager
def _one_at_a_time(what: str) -> Iterator[None]:
    """Across processes: the test run's workers (pytest -n) share the rootfs and the checkout's
    build/ folder; the first builds, the others wait for it."""
    with open(f"/var/tmp/minicelery-{what}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def debian_rootfs() -> Path:
    """A minimal Debian with systemd and python3, built on first use."""
    with _one_at_a_time("rootfs"):
        return _debian_rootfs()


def _debian_rootfs() -> Path:
    if (ROOTFS / COMPLETE).is_file():
        return ROOTFS
    debootstrap = require_tool("debootstrap", "apt-get install debootstrap")
    partial = ROOTFS.with_name(ROOTFS.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(
        [debootstrap, "--variant=minbase", f"--include={PACKAGES}", SUITE, str(partial), debian_mirror()],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    (partial / COMPLETE).touch()
    shutil.rmtree(ROOTFS, ignore_errors=True)
    partial.rename(ROOTFS)
    return ROOTFS


def build_wheelhouse(dest: Path) -> Path:
    """Wheels of the project and everything it needs, for installs that cannot reach PyPI
    (pip inside the rootfs cannot verify PyPI's certificate here)."""
    with _one_at_a_time("wheelhouse"):
        return _build_wheelhouse(dest)


def _build_wheelhouse(dest: Path) -> Path:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # setuptools builds in the checkout's build/ and keeps what an earlier build left there: a
    # module since deleted or moved (worker.py became worker/) would ship in the wheel.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    subprocess.run([*pip, "wheel", "--wheel-dir", str(dest), str(REPO)], check=True)
    # setuptools: to build the project from source (the Containerfile does). async-timeout:
    # redis-py needs it below Python 3.11.3, and Debian 12 has 3.11.2 while this host may not.
    extra = ["setuptools>=77", "async-timeout>=4.0.3"]
    subprocess.run([*pip, "download", "--dest", str(dest), *extra], check=True)
    return dest


class Machine:
    """A Debian rootfs booted with systemd-nspawn; commands run inside with nsenter.

    It shares the host's network, so a Redis on host loopback is reachable from inside.
    """

    def __init__(self, root: Path, name: str, log: Path) -> None:
        self.root, self.name = root, name
        nspawn = require_tool("systemd-nspawn", "apt-get install systemd-container")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [nspawn, "-D", str(root), "--boot", "--register=no", "--keep-unit", "--console=passive", "-q",
                 "-M", name],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self.pid = int(wait_until(self._init_pid, 30, "the container's systemd"))  # type: ignore[arg-type]
            wait_until(self._booted, 60, "the container to finish booting")
        except BaseException:
            self.shutdown()  # or the machine outlives the test
            raise

    def _init_pid(self) -> int | None:
        """The container's PID 1. nspawn's first child may still be its short-lived helper that
        forks the container's init: only a process that is PID 1 in its own namespace will do."""
        assert self.proc.poll() is None, "systemd-nspawn exited"
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspids = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspids) > 1 and nspids[-1] == "1":
                return int(pid)
        return None

    def _booted(self) -> bool:
        state = self.run("systemctl", "is-system-running").stdout.strip()
        return state in ("running", "degraded")

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-n", "-p", "--", *command],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def config_from_example(example: Path | None = None, **settings: object) -> str:
    """config/tasks.toml (or `example`) with some `key = value` lines replaced (each key appears
    once in it), so a test runs the annotated example with only what it must change."""
    example = example or REPO / "config" / "tasks.toml"
    text = example.read_text()
    for key, value in settings.items():
        literal = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value
        if isinstance(value, list):
            literal = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {literal}", text)
        assert count == 1, f"{key} is not in {example}"
    return text


def documented_blocks(document: Path, section: str, language: str) -> list[str]:
    """The ```language blocks of a Markdown document under the heading `section` (up to the next
    heading of the same or a higher level)."""
    blocks: list[str] = []
    level, fence, lines = 0, None, []
    for line in document.read_text().splitlines():
        if fence is not None:
            if line.startswith("```"):
                if level and fence == language:
                    blocks.append("\n".join(lines) + "\n")
                fence, lines = None, []
            else:
                lines.append(line)
        elif line.startswith("```"):
            fence = line[3:].strip()
        elif heading := re.match(r"(#+) (.*)", line):
            if level and len(heading.group(1)) <= level:
                level = 0
            if heading.group(2).strip() == section:
                level = len(heading.group(1))
    assert blocks, f"no {language} block under {section!r} in {document}"
    return blocks


def documented_commands(document: Path, section: str, *program: str) -> list[list[str]]:
    """The commands a document's ```sh blocks give under the heading `section` that start with
    `program` (e.g. "podman", "run"), as argv lists: continuation lines joined, comments
    dropped, a pipeline split into its commands. The tests run these, so the docs cannot drift."""
    found = []
    for block in documented_blocks(document, section, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv:
                command, argv = (argv[: argv.index("|")], argv[argv.index("|") + 1 :]) if "|" in argv else (argv, [])
                if tuple(command[: len(program)]) == program:
                    found.append(command)
    return found


def substituted(argv: list[str], replace: dict[str, str]) -> list[str]:
    """argv with whole words replaced (a name, a path, the image); every one must be there."""
    missing = set(replace) - set(argv)
    assert not missing, f"the documented command {argv} no longer has {missing}"
    return [replace.get(word, word) for word in argv]


def kube_manifests() -> dict[str, dict[str, Any]]:
    """kind/name -> resource, for every resource deploy/kubernetes/kustomization.yaml lists."""
    import yaml  # the deploy extra (yamllint) brings it; only the Kubernetes tests need it

    kube = REPO / "deploy" / "kubernetes"
    found = {}
    for name in yaml.safe_load((kube / "kustomization.yaml").read_text())["resources"]:
        for doc in yaml.safe_load_all((kube / name).read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def kubelet_secret_file(pod: dict[str, Any], volume_name: str) -> tuple[int, int, int]:
    """(uid, gid, mode) of each file of a Secret volume as the kubelet writes it: root-owned,
    `defaultMode` (0644 if unset); with the pod's `fsGroup`, group fsGroup and the group read bits
    added (kubelet's SetVolumeOwnership: secret volumes are read-only, so mode |= 0440)."""
    (volume,) = [v for v in pod["volumes"] if v["name"] == volume_name]
    mode = volume["secret"].get("defaultMode", 0o644)
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    if fs_group is None:
        return 0, 0, mode
    return 0, fs_group, mode | 0o440
