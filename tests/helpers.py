"""Small helpers for tests that run a worker inside the test process."""

from __future__ import annotations

import array
import socket
import struct
from pathlib import Path
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


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records sender PIDs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[int, str]] = []

    def drain(self) -> list[tuple[int, str]]:
        size = struct.calcsize("3i")
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(size))
            except TimeoutError:
                return self.messages
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:size])[0]
            for line in data.decode().splitlines():
                self.messages.append((pid, line))

    def seen(self, text: str) -> list[int]:
        """PIDs of every message equal to `text` (or starting with it, for KEY= prefixes)."""
        return [pid for pid, line in self.drain() if line == text or (text.endswith("=") and line.startswith(text))]

    def close(self) -> None:
        self.sock.close()


def succeeded(r: Any, queue: str, task_ids: list[str]) -> list[bool]:
    """Whether each task succeeded, read in one round trip. A success whose result is kept
    stores no state field: its stored result, with no state, says it (state_of in
    scripts/_common.lua); a success not kept stores the state 'succeeded'."""
    from minicelery.keys import queue_keys

    keys = queue_keys(queue)
    pipe = r.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hget(keys.info, f"{task_id}:s")
        pipe.hexists(keys.result, task_id)
    facts = pipe.execute()
    return [
        state == b"succeeded" or (state is None and kept) for state, kept in zip(facts[::2], facts[1::2], strict=True)
    ]
