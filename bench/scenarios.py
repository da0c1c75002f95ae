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


@app.task
def sleep_until_cancelled(key: str) -> None:
    """Marks that it started (a Redis SET, on the worker's own settings), then sleeps: a
    cancel interrupts it; its `finally` records when it stopped."""
    import redis

    from minicelery.settings import load_settings

    client = redis.Redis.from_url(load_settings().redis.url)
    client.set(f"{key}:started", time.time())
    try:
        time.sleep(600)
    finally:
        client.set(f"{key}:stopped", time.time())
