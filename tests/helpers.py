"""Small helpers for tests that run a worker inside the test process."""

from __future__ import annotations

from typing import Any

from minicelery import Client
from minicelery.settings import load_settings
from minicelery.worker import Worker


def make_worker(app: Client, **worker_settings: Any) -> Worker:
    options = {"queues": [app.default_queue], "idle_block_max": 1, "lease_seconds": 5, **worker_settings}
    return Worker(app, load_settings(worker=options, metrics={"enabled": False}))


def drain(app: Client, **worker_settings: Any) -> Worker:
    """Run a worker in this process until no task is ready (burst mode, no signal handlers)."""
    worker = make_worker(app, **worker_settings)
    worker.run(burst=True, install_signals=False)
    return worker
