"""Builds deploy/grafana/minicelery.json, the Grafana dashboard for minicelery workers.

Edit the panels here, then regenerate:  python deploy/grafana/dashboard.py > deploy/grafana/minicelery.json
(tests/test_prometheus.py fails while the JSON is stale, and sends every panel's query to a
live Prometheus scraping a real worker, so a renamed metric cannot slip through.)
"""

from __future__ import annotations

import json
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
TASK = 'task=~"$task"'
QUEUE = 'queue=~"$queue"'


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def quantiles(metric: str, selector: str, by: str) -> list[dict[str, Any]]:
    """p50/p95/p99 of a histogram, one line per `by` group."""
    group = f"le, {by}" if by else "le"
    return [
        target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
            ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


def panel(
    title: str,
    targets: list[dict[str, Any]],
    unit: str,
    x: int,
    y: int,
    *,
    w: int = 12,
    kind: str = "timeseries",
    description: str = "",
    stack: bool = False,
) -> dict[str, Any]:
    custom: dict[str, Any] = {"fillOpacity": 10, "lineWidth": 1}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": 8 if kind == "timeseries" else 4},
        "fieldConfig": {
            "defaults": {"unit": unit, **({"custom": custom} if kind == "timeseries" else {})},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
        "targets": targets,
    }


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,  # on time range change: new tasks and queues appear without a reload
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    panels = [
        panel(
            "Workers up",
            [target("count(minicelery_worker_start_time_seconds)", "workers")],
            "none",
            0,
            0,
            w=6,
            kind="stat",
            description="Workers whose metrics Prometheus scraped recently.",
        ),
        panel(
            "Tasks in progress",
            [target("sum(minicelery_tasks_in_progress)", "running")],
            "none",
            6,
            0,
            w=6,
            kind="stat",
            description="Tasks running in all workers now.",
        ),
        panel(
            "Ready backlog",
            [target(f'sum(max by (queue) (minicelery_queue_depth{{{QUEUE}, state="ready"}}))', "ready")],
            "none",
            12,
            0,
            w=6,
            kind="stat",
            description="Tasks due and waiting for a worker.",
        ),
        panel(
            "Dead letters",
            [target(f'sum(max by (queue) (minicelery_queue_depth{{{QUEUE}, state="dead"}}))', "dead")],
            "none",
            18,
            0,
            w=6,
            kind="stat",
            description="Tasks that gave up; see `minicelery inspect`.",
        ),
        panel(
            "Throughput by outcome",
            [target(f"sum by (outcome) (rate(minicelery_task_outcomes_total{{{TASK}}}[{RATE}]))", "{{outcome}}")],
            "ops",
            0,
            4,
            stack=True,
            description="Finished task runs per second.",
        ),
        panel(
            "Queue latency (due → started)",
            quantiles("minicelery_queue_latency_seconds", f"{QUEUE}, {TASK}", ""),
            "s",
            12,
            4,
            description="From when a task became due (enqueued, its time came, or its last parent "
            "finished) to when a worker started it.",
        ),
        panel(
            "Run time",
            quantiles("minicelery_task_run_seconds", TASK, "task"),
            "s",
            0,
            12,
            description="How long task functions ran.",
        ),
        panel(
            "Failures by exception",
            [
                target(
                    f"sum by (task, exception) (rate(minicelery_task_failures_total{{{TASK}}}[{RATE}]))",
                    "{{task}}: {{exception}}",
                )
            ],
            "ops",
            12,
            12,
            description="Failed runs per second by the exception they raised.",
        ),
        panel(
            "Queue depth by state",
            [target(f"max by (queue, state) (minicelery_queue_depth{{{QUEUE}}})", "{{queue}} {{state}}")],
            "none",
            0,
            20,
            description="Read from Redis at scrape time; every worker reports the same value, hence max.",
        ),
        panel(
            "Hand-offs and claim contention",
            [
                target(f"sum by (kind) (rate(minicelery_claim_contention_total[{RATE}]))", "{{kind}}"),
                target(
                    f"sum by (queue) (rate(minicelery_handoffs_total{{{QUEUE}}}[{RATE}]))", "handed off {{queue}}", "B"
                ),
            ],
            "ops",
            12,
            20,
            description="handed off: tasks given straight to an idle worker (no claim); wakeup: a "
            "worker woke and found the task gone; late_finish: a result rejected because the lease "
            "had been reclaimed.",
        ),
        panel(
            "Redis errors and reconnects",
            [
                target(f"sum by (instance) (rate(minicelery_redis_errors_total[{RATE}]))", "errors {{instance}}"),
                target(
                    f"sum by (instance) (rate(minicelery_redis_reconnects_total[{RATE}]))",
                    "reconnects {{instance}}",
                    "B",
                ),
            ],
            "ops",
            0,
            28,
            description="Failed Redis calls and regained connections per second, by worker.",
        ),
        panel(
            "Workers by version and host",
            [target("count by (version, hostname) (minicelery_worker_info)", "{{hostname}} {{version}}")],
            "none",
            12,
            28,
            description="Handy during a rolling upgrade.",
        ),
        panel(
            "Schedule lag (slot → started)",
            quantiles("minicelery_schedule_lag_seconds", "", "schedule"),
            "s",
            0,
            36,
            description="Periodic tasks: from a slot's time to the start of its run. A run held back by "
            "the schedule's previous run (no overlap) or replayed by catch-up shows here.",
        ),
        panel(
            "Time since each schedule last ran",
            [
                target(
                    f"time() - max by (queue, schedule) (minicelery_schedule_last_start_timestamp_seconds{{{QUEUE}}})",
                    "{{schedule}} ({{queue}})",
                ),
                target(
                    f"max by (queue, schedule) (minicelery_schedule_interval_seconds{{{QUEUE}}})",
                    "interval {{schedule}}",
                    "B",
                ),
                target(
                    f"sum by (schedule) (increase(minicelery_schedule_missed_slots_total[{RATE}]))",
                    "missed slots {{schedule}}",
                    "C",
                ),
            ],
            "s",
            12,
            36,
            description="Seconds since each schedule's last run started, against its interval (the alert "
            "MiniceleryScheduleNotRunning fires past twice the interval), and slots given up by catch-up.",
        ),
    ]
    for number, each in enumerate(panels, start=1):
        each["id"] = number
    return {
        "uid": "minicelery-workers",
        "title": "minicelery workers",
        "description": "Throughput, latency, failures and queue depth of minicelery workers.",
        "tags": ["minicelery", "task-queue"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("queue", "Queue", "label_values(minicelery_queue_depth, queue)"),
                variable("task", "Task", "label_values(minicelery_task_outcomes_total, task)"),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=2))
