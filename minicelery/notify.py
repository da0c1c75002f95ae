"""systemd service notifications (READY, STATUS, WATCHDOG, STOPPING) via sdnotify.

Everything here is a no-op outside systemd (no $NOTIFY_SOCKET).
"""

from __future__ import annotations

import os

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status: str | None = None

    @property
    def watchdog_interval(self) -> float | None:
        """Half of $WATCHDOG_USEC in seconds (when the watchdog is on for this process)."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def _send(self, text: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(text)

    def ready(self) -> None:
        self._send(f"READY=1\nMAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        """Reloading until the next ready() (the supervisor's rolling reload)."""
        self._send("RELOADING=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")
