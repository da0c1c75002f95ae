"""/metrics, /healthz and /readyz served by a real worker process that ran real tasks."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

from conftest import Workers, wait_until

from minicelery import Client
from minicelery.keys import QueueKeys
from minicelery.redis_server import free_port


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in scrape")


def test_worker_serves_metrics_that_count_the_tasks_it_ran(app: Client, workers: Workers) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = workers.start(MINICELERY_METRICS__ENABLED="true", MINICELERY_METRICS__PORT=str(port))
    wait_until(lambda: _get(base + "/readyz")[0] == 200, 20, "/readyz to turn 200")
    assert _get(base + "/healthz")[0] == 200
    handles = [app.tasks["echo"](i).start() for i in range(7)] + [app.tasks["boom"]("m").start() for _ in range(2)]
    app.tasks["echo"]("later").wait(3600)
    for handle in handles:
        with contextlib.suppress(ValueError):
            handle.result(timeout=30)

    # The worker records a run just after its result is stored: wait for the last of them.
    def recorded() -> str | None:
        status, text = _get(base + "/metrics")
        assert status == 200
        # A scrape reads one series after another while the worker counts: wait until every
        # series of the last run is in (its outcome is counted before its failure).
        done = _sample(text, "minicelery_task_outcomes_total", task="echo", outcome="succeeded") == 7
        failed = _sample(text, "minicelery_task_outcomes_total", task="boom", outcome="failed") == 2
        return (
            text
            if done
            and failed
            and _sample(text, "minicelery_task_failures_total", task="boom", exception="ValueError") == 2
            else None
        )

    text = str(wait_until(recorded, 20, "the metrics of all nine runs"))
    assert _sample(text, "minicelery_task_outcomes_total", task="echo", outcome="succeeded") == 7
    assert _sample(text, "minicelery_task_outcomes_total", task="boom", outcome="failed") == 2
    assert _sample(text, "minicelery_task_failures_total", task="boom", exception="ValueError") == 2
    assert _sample(text, "minicelery_queue_latency_seconds_count", queue=app.default_queue, task="echo") == 7
    assert _sample(text, "minicelery_task_run_seconds_count", task="echo") == 7
    assert _sample(text, "minicelery_queue_depth", queue=app.default_queue, state="scheduled") == 1
    assert _sample(text, "minicelery_tasks_in_progress") == 0
    assert _sample(text, "minicelery_worker_info", queues=app.default_queue) == 1
    assert "task_id" not in text and handles[0].id not in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_a_task_handed_to_the_idle_worker_is_counted_as_a_hand_off(app: Client, workers: Workers) -> None:
    """The hand-off (an idle worker given its task with no claim) is visible to operators."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = workers.start(MINICELERY_METRICS__ENABLED="true", MINICELERY_METRICS__PORT=str(port))
    wait_until(lambda: _get(base + "/readyz")[0] == 200, 20, "/readyz to turn 200")
    assert _sample(_get(base + "/metrics")[1], "minicelery_handoffs_total", queue=app.default_queue) == 0
    idle_set = QueueKeys(app.default_queue).idle
    for value in range(3):  # each sent only once the worker waits in the queue's idle set
        wait_until(lambda: app.broker.redis.zcard(idle_set) == 1, 20, "the worker to wait idle")
        assert app.tasks["echo"](value).start().result(timeout=30) == value
    wait_until(
        lambda: _sample(_get(base + "/metrics")[1], "minicelery_handoffs_total", queue=app.default_queue) == 3,
        20,
        "three hand-offs counted",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_health_command_reports_the_local_worker(app: Client, workers: Workers) -> None:
    """`minicelery health` is the container HEALTHCHECK: 0 while the worker answers, 1 once it is gone."""
    port = free_port()
    env = workers.env(MINICELERY_METRICS__ENABLED="true", MINICELERY_METRICS__PORT=str(port),
                      MINICELERY_METRICS__BIND="0.0.0.0")  # fmt: skip
    proc = workers.start(env=env)
    wait_until(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 20, "/readyz to turn 200")
    health = [sys.executable, "-m", "minicelery", "health"]
    for args in ([], ["--ready"]):
        run = subprocess.run(health + args, env=env, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert f"127.0.0.1:{port}" in run.stdout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    run = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "Connection refused" in run.stderr and "no worker listens there" in run.stderr
    zero = subprocess.run([*health, "--timeout", "0"], env=env, capture_output=True, text=True, timeout=30)
    assert zero.returncode == 2 and "must be a number of seconds > 0" in zero.stderr, zero.stderr
