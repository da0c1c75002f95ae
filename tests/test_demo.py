"""`make demo` (`minicelery demo`): the README's first command must keep working."""

from __future__ import annotations

import os
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
