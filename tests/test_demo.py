"""`make demo` (`minicelery demo`): the README's first command must keep working."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_demo_runs_the_original_readme_graph_and_every_process_exits_0() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICELERY_")}
    run = subprocess.run(
        [sys.executable, "-m", "minicelery", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=110
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Hello World!!" in run.stdout
    assert "36 + 49 + 64 + 81 = 230" in run.stdout
    assert "workers exited [0, 0, 0]" in run.stdout
    assert "Traceback" not in run.stderr


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
