"""On a Redis Cluster: the worker's queues whose node does not answer, set aside.

A worker on queues of several shards that loses one primary has not lost Redis: the other
shards still serve their queues. So a queue whose claim (or check) finds its node unreachable
is set aside, said once with the reason, and checked again with backoff (0.1 s doubling up to
`RETRY_MAX`, or worker.reconnect_max_delay if lower) while the worker goes on claiming and
waiting on the others; once its node answers (the same one back, or the replica that took
over) it is taken back. Only with every queue set aside is the worker "waiting for Redis"
(not ready), as it is on one Redis. Single-node Redis and Sentinel never set a queue aside:
losing the one primary is losing Redis (Connection.recover).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BrokerError
from .observe import Observer

log = logging.getLogger("minicelery.worker")

RETRY_FIRST = 0.1
RETRY_MAX = 2.0  # (a failover takes cluster-node-timeout plus an election: seconds)


@dataclass
class _Aside:
    since: float
    retry_at: float
    delay: float


class QueueHealth:
    def __init__(self, queues: list[str], observer: Observer, ready: Callable[[bool], None], max_delay: float) -> None:
        self.queues = queues
        self.observer = observer
        self.ready = ready  # readiness (/readyz): off while every queue is set aside
        self.max_delay = min(max_delay, RETRY_MAX)
        self.aside: dict[str, _Aside] = {}

    def usable(self) -> list[str]:
        return [queue for queue in self.queues if queue not in self.aside] if self.aside else self.queues

    def all_aside(self) -> bool:
        return len(self.aside) == len(self.queues)

    def next_retry(self) -> float:
        """The monotonic time the next set-aside queue is due a check (inf: none)."""
        return min((entry.retry_at for entry in self.aside.values()), default=float("inf"))

    def retry_due(self, queue: str, now: float) -> bool:
        return self.aside[queue].retry_at <= now

    def set_aside(self, queue: str, exc: BrokerError) -> None:
        """The queue's node did not answer: set it aside, or (already aside) back off further."""
        now = time.monotonic()
        entry = self.aside.get(queue)
        if entry is not None:
            entry.delay = min(entry.delay * 2, self.max_delay)
            entry.retry_at = now + entry.delay
            return
        self.aside[queue] = _Aside(now, now + RETRY_FIRST, RETRY_FIRST)
        if self.all_aside():
            log.warning("waiting for Redis: no node of this worker's queues answers (queue %s: %s)", queue, exc)
            self.observer.status("waiting for Redis")
            self.ready(False)
        else:
            log.warning(
                "queue %s set aside: its Redis Cluster node does not answer (%s); serving the others", queue, exc
            )

    def taken_back(self, queue: str) -> None:
        entry = self.aside.pop(queue)
        log.info("queue %s taken back: its node answers again after %.2f s", queue, time.monotonic() - entry.since)
        if len(self.aside) == len(self.queues) - 1:  # (it was the last: the worker is ready again)
            self.ready(True)
            self.observer.status()
