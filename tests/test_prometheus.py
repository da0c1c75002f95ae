"""A real Prometheus scrapes a real worker: alert rules, the dashboard's queries and the exposition format.

promtool and prometheus come from Debian's `prometheus` package (.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Workers, require_tool, wait_until
from test_metrics import _get

from minicelery import Client
from minicelery.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "minicelery.json"


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    checks = (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
        ["check", "config", "prometheus.yml"],
    )
    for args in checks:
        run = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_dashboard_json_is_generated_from_dashboard_py() -> None:
    generated = subprocess.run(
        [sys.executable, str(DASHBOARD.with_name("dashboard.py"))], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(generated) == json.loads(DASHBOARD.read_text()), "regenerate deploy/grafana/minicelery.json"


def _dashboard_queries(queue: str) -> list[tuple[str, str]]:
    """(panel title, query) for every target, with the dashboard's variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "queue", "task"} <= names
    out = []
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$queue", queue).replace("$task", ".*")
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            out.append((panel["title"], expr))
    return out


class Prometheus:
    """A Prometheus server on loopback scraping the given target every second."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{PROMETHEUS_DIR / 'alerts.yml'}']\n"
            "scrape_configs:\n"
            f"  - job_name: minicelery\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.log = tmp_path / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [require_tool("prometheus", "apt-get install prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]  # type: ignore[no-any-return]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def scraped(self) -> bool:
        """True once a scrape's samples can be queried.

        The targets API says "up" as soon as the HTTP scrape returns, before the samples are
        committed; the `up` series is committed together with them, so a query for it is the
        condition a test can rely on (asking the targets API made the first query flaky in CI).
        """
        with contextlib.suppress(OSError):
            return self.value('up{job="minicelery"}') == 1
        return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def scraped_worker(app: Client, workers: Workers, tmp_path: Path) -> Iterator[Prometheus]:
    port = free_port()
    schedule = json.dumps([{"task": "add", "every": 3, "args": [1, 2], "queue": workers.queue}])  # for the panels
    worker = workers.start(
        MINICELERY_METRICS__ENABLED="true", MINICELERY_METRICS__PORT=str(port), MINICELERY_SCHEDULES=schedule
    )
    wait_until(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 20, "worker /readyz")
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{port}")
    try:
        wait_until(prometheus.scraped, 30, "Prometheus to store a scrape of the worker")
        yield prometheus
    finally:
        prometheus.stop()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0


@pytest.mark.slow
def test_prometheus_scrapes_the_worker_and_every_dashboard_query_and_alert_works(
    app: Client, scraped_worker: Prometheus
) -> None:
    prometheus = scraped_worker
    succeeded = 'sum(minicelery_task_outcomes_total{job="minicelery", task="echo", outcome="succeeded"})'
    failed_runs = 'sum(minicelery_task_outcomes_total{task="boom", outcome="failed"})'
    assert prometheus.value(succeeded) == 0  # every registered task's outcomes start at 0, not missing
    # Two rounds of work, each seen by a scrape: a series born in the first round (histograms
    # appear with their first observation) has grown by the next, so every rate() is real.
    for first, total in ((0, 1), (1, 7)):
        done = [app.tasks["echo"](i).start() for i in range(first, total)]
        failed = app.tasks["boom"]("m").start()
        for handle in done:
            assert handle.result(timeout=30) is not None
        with pytest.raises(ValueError):
            failed.result(timeout=30)
        seen, failures = total, first + 1  # bound per round (a lambda would see the loop variable change)
        wait_until(
            lambda n=seen, f=failures: prometheus.value(succeeded) == n and prometheus.value(failed_runs) == f,
            30,
            "Prometheus to see the tasks",
        )
    app.tasks["echo"]("later").wait(3600)
    wait_until(lambda: prometheus.value('minicelery_queue_depth{state="scheduled"}') == 1, 30, "a scheduled task")
    assert prometheus.value('sum(minicelery_task_outcomes_total{task="boom", outcome="failed"})') == 2
    assert prometheus.value('sum(minicelery_task_failures_total{task="boom", exception="ValueError"})') == 2
    assert prometheus.value('sum(minicelery_queue_latency_seconds_count{task="echo"})') == 7
    assert prometheus.value("minicelery_tasks_in_progress") == 0
    assert prometheus.value("minicelery_redis_errors_total") == 0
    started = prometheus.value("minicelery_worker_start_time_seconds")
    assert started is not None and started > 1.7e9  # a Unix time, in seconds
    # p99 queue latency of an idle worker picking up tasks: well under the 30 s alert threshold
    p99 = prometheus.value("histogram_quantile(0.99, sum by (le) (rate(minicelery_queue_latency_seconds_bucket[1m])))")
    assert p99 is not None and 0 <= p99 < 30

    wait_until(
        lambda: (prometheus.value("sum(minicelery_schedule_lag_seconds_count)") or 0) >= 2, 30, "two scheduled runs"
    )
    empty = [(title, expr) for title, expr in _dashboard_queries(app.default_queue) if not prometheus.query(expr)]
    assert not empty, f"dashboard panels with no data: {empty}"

    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == 8 and all(rule["health"] == "ok" for rule in rules), rules
    # Every run of `boom` failed and left a dead letter: those two alerts evaluate on the real
    # series and go pending (they fire after their `for:`); nothing else about this worker is wrong.
    expected = {"MiniceleryFailureRatioHigh", "MiniceleryDeadLettersGrowing"}
    wait_until(lambda: all(_alert_states(prometheus).get(a) == "pending" for a in expected), 30, "pending alerts")
    assert {name for name, state in _alert_states(prometheus).items() if state != "inactive"} == expected


def _alert_states(prometheus: Prometheus) -> dict[str, str]:
    return {rule["name"]: rule["state"] for group in prometheus.api("rules")["groups"] for rule in group["rules"]}


def test_promtool_accepts_a_real_scrape(app: Client, workers: Workers) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    port = free_port()
    worker = workers.start(MINICELERY_METRICS__ENABLED="true", MINICELERY_METRICS__PORT=str(port))
    wait_until(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 20, "worker /readyz")
    app.tasks["echo"](1).start().result(timeout=30)
    with pytest.raises(ValueError):
        app.tasks["boom"]("x").start().result(timeout=30)

    def failure_recorded() -> str | None:  # the worker records a run just after storing its result
        status, scrape = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        return scrape if re.search(r'minicelery_task_outcomes_total\{.*outcome="failed".*\} 1\.0', scrape) else None

    scrape = str(wait_until(failure_recorded, 20, "the failed run in the scrape"))
    lint = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint.stdout + lint.stderr
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
