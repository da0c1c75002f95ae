"""Log formats: JSON lines for shippers, no timestamps under journald."""

from __future__ import annotations

import json
import logging
import signal

import pytest
from conftest import Workers

from minicelery.logs import configure_logging


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def _format(message: str) -> str:
    record = logging.LogRecord("minicelery.worker", logging.INFO, __file__, 1, message, (), None)
    return logging.getLogger().handlers[0].format(record)


def test_json_format_emits_one_object_per_line() -> None:
    configure_logging("INFO", "json")
    entry = json.loads(_format("task abc name=x outcome=succeeded"))
    assert entry["level"] == "INFO" and entry["logger"] == "minicelery.worker"
    assert entry["message"] == "task abc name=x outcome=succeeded" and "time" in entry


def test_text_format_drops_timestamps_under_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    configure_logging("INFO", "text")
    assert _format("hello") == "INFO minicelery.worker: hello"
    monkeypatch.delenv("JOURNAL_STREAM")
    configure_logging("INFO", "text")
    assert _format("hello").endswith("INFO minicelery.worker: hello") and _format("hello")[:4].isdigit()


def test_a_worker_asked_to_stop_logs_stop_requested_at_info_not_as_a_warning(workers: Workers) -> None:
    proc = workers.start()
    workers.wait_ready(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    lines = [line for line in workers.log(proc).splitlines() if "stop requested" in line]
    assert len(lines) == 1 and " INFO minicelery.heartbeat: stop requested" in lines[0], lines
