"""The worker's Redis connection: waiting for Redis at start and after an outage, and the
pauses (backoff, exact waits) that still wake within 0.1 s of a stop signal."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from ..broker import RedisBroker
from ..errors import BrokerError, BrokerUnavailable, ConfigError
from ..interrupts import StopSignals
from .observe import Observer

log = logging.getLogger("minicelery.worker")


class Connection:
    def __init__(
        self,
        broker: RedisBroker,
        signals: StopSignals,
        observer: Observer,
        max_delay: float,
        on_connect: Callable[[], None] = lambda: None,
    ) -> None:
        self.broker = broker
        self.on_connect = on_connect  # once Redis answers, before the worker is ready (schedules)
        self.signals = signals
        self.observer = observer
        self.max_delay = max_delay  # cap of the reconnect backoff
        self.ready = False  # Redis answered and the scripts are loaded (/readyz)

    def connect(self) -> bool:
        """Wait until Redis answers and the scripts load; False if told to stop first."""
        delay = 0.1
        while not self.signals.requested:
            try:
                self.broker.ping()
                self.broker.load_scripts()
                self.on_connect()
                policy = self.broker.eviction_policy()
                if policy not in ("noeviction", "unknown"):
                    log.warning(
                        "Redis maxmemory-policy is %r: an evicting Redis silently loses tasks; set it to noeviction",
                        policy,
                    )
                self.ready = True
                return True
            except ConfigError:
                raise  # refused credentials or ACL: waiting will not help; exit 78
            except BrokerError as exc:
                self.observer.status("waiting for Redis")
                log.warning("waiting for Redis at %s: %s (retrying in %.1f s)", self.broker.where, exc, delay)
                self.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        return False

    def set_ready(self, ready: bool) -> None:
        """Readiness set from outside a (re)connect: off while a cluster worker's every queue
        is set aside (queue_health.py)."""
        self.ready = ready

    def recover(self, exc: BrokerError) -> bool:
        """A Redis call failed mid-run: wait until Redis is back. True once it is."""
        self.ready = False
        self.observer.metrics.redis_errors.inc()
        started = time.monotonic()
        if not isinstance(exc, BrokerUnavailable):
            # Redis answered with an error (OOM, READONLY, ...): reconnecting will not fix it
            # at once, so pause before trying again instead of spinning.
            log.error("Redis error: %s (retrying in 1 s)", exc)
            self.sleep(1.0)
        else:
            log.warning("lost Redis: %s", exc)
        if not self.connect():
            return False
        self.observer.metrics.reconnects.inc()
        log.info("Redis is back after %.2f s", time.monotonic() - started)
        return True

    def sleep_until(self, deadline: float) -> None:
        """Sleep to a monotonic deadline, exactly (no jitter), still waking for a stop signal."""
        while not self.signals.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))

    def sleep(self, seconds: float) -> None:
        """Back off, with jitter, but wake within 0.1 s of a stop signal (the loop counts as
        turning meanwhile: a worker waiting for Redis is healthy)."""
        deadline = time.monotonic() + seconds * random.uniform(0.8, 1.2)
        while not self.signals.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))
            self.observer.loop_alive_at = time.monotonic()
