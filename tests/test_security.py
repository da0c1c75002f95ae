"""Redis ACL users and TLS, against real servers; tasks run only if registered."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import Workers, require_tool, wait_until

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.redis_server import find_server_binary, free_port

# What a worker and a producer need, and nothing else: their own keys, scripts, blocking pops.
ACL_RULES = ("~minicelery:*", "&*", "+@all", "-@dangerous", "-@admin")


def start_redis(tmp_path: Path, args: list[str], client: redis.Redis) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [find_server_binary(), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        assert proc.poll() is None, "redis-server exited"
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(answers, 20, "Redis to answer")
    return proc


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, str]]:
    port, password = free_port(), "acl-secret"
    args = ["--port", str(port), "--user", "default", "off", "--user", "worker", "on", f">{password}", *ACL_RULES]
    client = redis.Redis(port=port, username="worker", password=password)
    proc = start_redis(tmp_path, args, client)
    yield port, password
    client.close()
    proc.terminate()
    proc.wait()


def test_an_acl_user_limited_to_its_keys_runs_workers_and_producers(
    acl_redis: tuple[int, str], queue: str, tmp_path: Path
) -> None:
    port, password = acl_redis
    url = f"redis://127.0.0.1:{port}/0"
    (tmp_path / "password").write_text(password + "\n")
    workers = Workers(url, queue, tmp_path)
    env = workers.env(MINICELERY_REDIS__USERNAME="worker", MINICELERY_REDIS__PASSWORD_FILE=str(tmp_path / "password"))
    try:
        proc = workers.start(env=env)
        options = {"username": "worker", "password": password}
        app = Client(
            RedisBroker(JSONTransport(), url=url, max_block=1, connection_options=options), default_queue=queue
        )
        Client.instances.remove(app)
        import worktasks

        worktasks.register(app)
        total = app.tasks["add"](app.tasks["add"](1, 2), app.tasks["add"](3, 4).wait(0.2))
        assert total.start().result(timeout=30) == 10
        assert proc.poll() is None
        # The wrong password is a configuration error: exit 78 at once, not a retry loop.
        (tmp_path / "password").write_text("wrong\n")
        bad = workers.start(env=env)
        assert bad.wait(timeout=30) == 78
        assert "Redis refused PING: invalid username-password pair" in Workers.log(bad)
        app.broker.close()
    finally:
        workers.stop_all()


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    openssl = require_tool("openssl", "apt-get install openssl")
    d = tmp_path / "tls"
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=minicelery-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return d


def test_workers_and_producers_speak_tls(tls_files: Path, queue: str, tmp_path: Path) -> None:
    port = free_port()
    ca = str(tls_files / "ca.crt")
    client = redis.Redis(port=port, ssl=True, ssl_ca_certs=ca)
    args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls_files / "server.crt"),
            "--tls-key-file", str(tls_files / "server.key"), "--tls-ca-cert-file", ca,
            "--tls-auth-clients", "no"]  # fmt: skip
    proc = start_redis(tmp_path, args, client)
    url = f"rediss://127.0.0.1:{port}/0"
    workers = Workers(url, queue, tmp_path)
    try:
        worker = workers.start(MINICELERY_REDIS__TLS_CA_FILE=ca)
        options = {"ssl_ca_certs": ca}
        app = Client(
            RedisBroker(JSONTransport(), url=url, max_block=1, connection_options=options), default_queue=queue
        )
        Client.instances.remove(app)
        import worktasks

        worktasks.register(app)
        assert app.tasks["echo"]("over TLS").start().result(timeout=30) == "over TLS"
        assert worker.poll() is None
        # A client that does not trust the CA is refused: the connection really is TLS.
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, ssl=True).ping()
        app.broker.close()
    finally:
        workers.stop_all()
        client.close()
        proc.terminate()
        proc.wait()


def test_a_worker_waiting_for_redis_does_not_log_the_password_in_its_url(tmp_path: Path) -> None:
    nobody = f"redis://ann:pw-in-url-s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    pool = Workers(nobody, "q", tmp_path)
    worker = pool.start()
    wait_until(lambda: "waiting for Redis at" in pool.log(worker), 20, "the worker to wait for Redis")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert "redis://ann:***@127.0.0.1" in pool.log(worker) and "pw-in-url-s3cret" not in pool.log(worker)
