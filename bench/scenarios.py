"""The tasks the benchmark's worker processes import (MINICELERY_TASKS='["scenarios"]')."""

from __future__ import annotations

import time

from minicelery import Client, JSONTransport, RedisBroker

app = Client(RedisBroker(JSONTransport()))


@app.task
def noop() -> None:
    return None


@app.task
def stamp() -> float:
    """When it started, on this machine's clock (the producer shares it)."""
    return time.time()


@app.task
def node(*inputs: object) -> int:
    return len(inputs)
