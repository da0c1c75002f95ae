"""Workers started by `app.start()` in scripts of one's own, as the original README runs them."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import Workers

SCRIPT = """
import sys
from worktasks import app

app.start(queues=[sys.argv[1]])
"""


def _start_script(workers: Workers, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python worker.py QUEUE` (app.start()), logging to a file; stopped with the pool."""
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    log_path = tmp_path / f"app-start-{len(workers.procs)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), workers.queue],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    workers.procs.append(proc)
    return proc


def _default_metrics_env(workers: Workers) -> dict[str, str]:
    """The pool's environment with no metrics setting at all: every worker wants port 9808."""
    env = workers.env()
    del env["MINICELERY_METRICS__ENABLED"]
    return env


def test_three_app_start_workers_with_default_settings_all_start_on_one_host(workers: Workers, tmp_path: Path) -> None:
    env = _default_metrics_env(workers)
    procs = [_start_script(workers, tmp_path, env) for _ in range(3)]
    urls = []
    for proc in procs:
        workers.wait_ready(proc)
        found = re.search(r"metrics on (http://\S+)/metrics", workers.log(proc))
        assert found, workers.log(proc)
        urls.append(found[1])
    assert len(set(urls)) == 3, urls
    for url in urls:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            assert response.status == 200


def test_an_explicit_metrics_port_that_is_taken_exits_78_in_one_line(workers: Workers, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**_default_metrics_env(workers), "MINICELERY_METRICS__PORT": str(port)}
        script = tmp_path / "worker.py"
        script.write_text(SCRIPT)
        result = subprocess.run(
            [sys.executable, str(script), workers.queue], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("minicelery: ")]
    assert len(errors) == 1 and f"metrics.port: cannot listen on 127.0.0.1:{port}" in errors[0], result.stderr


def test_app_start_settings_reach_the_broker_the_task_module_made(workers: Workers, tmp_path: Path) -> None:
    """app.start(result_ttl=...) keeps results that long, though the module's RedisBroker()
    was made (with the default day) before start() saw the override."""
    import redis

    from minicelery import Client, JSONTransport, RedisBroker
    from minicelery.keys import QueueKeys

    script = tmp_path / "worker.py"
    script.write_text("import sys\nfrom worktasks import app\n\napp.start(queues=[sys.argv[1]], result_ttl=60)\n")
    with open(tmp_path / "ttl.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), workers.queue], env=workers.env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    proc.log_path = tmp_path / "ttl.log"  # type: ignore[attr-defined]
    workers.procs.append(proc)
    producer = Client(RedisBroker(JSONTransport(), url=workers.redis_url, max_block=1), default_queue=workers.queue)
    Client.instances.remove(producer)
    echo = producer.task(name="echo")(lambda value: value)
    handle = echo("kept a minute").start()
    assert handle.result(timeout=30) == "kept a minute"
    r = redis.Redis.from_url(workers.redis_url)
    seconds, micros = r.time()
    expires_in = float(r.zscore(QueueKeys(workers.queue).expiry, handle.id) or 0) / 1000 - (seconds + micros / 1e6)
    assert 0 < expires_in <= 60  # not the day the broker was made with
    producer.broker.close()
