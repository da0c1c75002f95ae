"""The worker: one process, one task at a time, blocking on Redis while idle.

`run()` loops over `tick()`, which claims and runs at most one task. Idle, the worker makes one
blocking call (BZPOPMIN on its queues' markers) and wakes when a task is ready for it, when a
due time it knows of arrives, or when it is told to stop. Finishing a task claims the next in
the same script call, so a busy worker makes one round trip per task.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .broker import BLOCKING_SOCKET_SLACK, Claim, Idle, Wake
from .errors import BrokerError, BrokerUnavailable, ConfigError, MiniceleryError
from .heartbeat import Heartbeat, Running
from .interrupts import HandBack, StopSignals, TaskAlarm
from .metrics import MetricsServer, WorkerMetrics
from .notify import Notifier
from .runner import Outcome, TaskRunner
from .settings import Settings
from .transport import JSONTransport

if TYPE_CHECKING:
    from .app import Client

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_HANDED_BACK = 75  # EX_TEMPFAIL: stopped before the running task could finish


def _version() -> str:
    from . import __version__

    return __version__


def _name_of(claim: Claim, transport: JSONTransport) -> str:
    """The task name from a payload, for labels (a bad payload is '?')."""
    try:
        return transport.loads_message(claim.payload).name
    except MiniceleryError:
        return "?"


@dataclass
class QueueClock:
    """What this worker knows about when to look at a queue again without being woken."""

    next_check: float = 0.0  # monotonic; 0 = claim at once (start-up)
    held_due_ms: int = 0  # a future due time (Redis clock) this worker waits for, else 0
    offset_ms: float = 0.0  # Redis clock minus local clock, from the last claim reply
    last_claim: float = 0.0  # monotonic


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    retried: int = 0
    late_finishes: int = 0
    wasted_wakeups: int = 0
    handed_back: int = 0


class Worker:
    def __init__(self, app: Client, settings: Settings, *, notifier: Notifier | None = None) -> None:
        self.app = app
        self.broker = app.broker
        self.settings = settings
        self.queues = list(settings.worker.queues)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_ms = int(settings.worker.lease_seconds * 1000)
        self.sweep_interval = settings.worker.lease_seconds
        self.notifier = notifier or Notifier()
        self.alarm = TaskAlarm()
        self.signals = StopSignals(self.alarm, settings.worker.shutdown_grace)
        self.runner = TaskRunner(app, self.alarm, settings.worker.default_time_limit, settings.worker.max_lost_leases)
        self.running: Running | None = None  # read by the heartbeat thread
        self.clocks = {queue: QueueClock() for queue in self.queues}
        self.counters = Counters()
        self.metrics = WorkerMetrics()
        self.metrics.watch_queues(self.broker.depths, self.queues)
        self.metrics.expect_tasks(app.tasks)
        self.metrics.count_running(lambda: 0 if self.running is None else 1)
        self.metrics.info.info(
            {"version": _version(), "queues": ",".join(self.queues), "hostname": socket.gethostname()}
        )
        self.metrics_port: int | None = None
        self.ready = False
        self.loop_alive_at = time.monotonic()
        self._pending: Claim | None = None
        self._claims = 0

    # --- the loop ------------------------------------------------------------------------------

    def run(self, *, burst: bool = False, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT (or, with burst, until no task is ready). Returns the exit code."""
        if install_signals:
            self.signals.install()
            self.alarm.install()
        heartbeat = Heartbeat(self)
        heartbeat.start()
        server = self._serve_metrics()
        try:
            if not self._connect():
                return EXIT_OK
            log.info("worker %s ready on queues %s", self.id, ", ".join(self.queues))
            self.notifier.ready()
            self._update_status()
            while not self.signals.requested:
                try:
                    worked = self.tick(block=not burst)
                except ConfigError:
                    raise  # Redis refused our credentials or ACL mid-run: exit 78
                except BrokerError as exc:
                    self.metrics.redis_errors.inc()
                    self._wait_for_redis(exc)
                    continue
                if burst and not worked and self._pending is None:
                    break
            return self._shutdown()
        finally:
            heartbeat.shutdown()
            if server is not None:
                server.stop()

    def tick(self, block: bool = True) -> bool:
        """Claim and run at most one task; idle-wait once if there is none. True if a task ran."""
        self.loop_alive_at = time.monotonic()
        claim = self._pending or self._claim_due()
        self._pending = None
        if claim is None:
            if block and not self.signals.requested:
                self._wait_idle()
            return False
        if self.signals.requested:
            self._hand_back(claim, interrupted=False)  # claimed by the last finish; we are stopping
            return False
        self._run_claim(claim)
        return True

    # --- claiming ------------------------------------------------------------------------------

    def _token(self) -> str:
        self._claims += 1
        return f"{self.id}:{self._claims}"

    def _claim(self, queue: str, *, woken: bool = False) -> Claim | None:
        clock = self.clocks[queue]
        reply = self.broker.claim(queue, self._token(), self.lease_ms, self.id, clock.held_due_ms)
        clock.last_claim = time.monotonic()
        if isinstance(reply, Claim):
            clock.held_due_ms = 0  # handed on by the claim script
            clock.next_check = math.inf
            clock.offset_ms = reply.now_ms - time.time() * 1000
            return reply
        self._learn(queue, reply)
        if woken:
            self.counters.wasted_wakeups += 1
            self.metrics.contention.labels("wakeup").inc()
        return None

    def _learn(self, queue: str, idle: Idle) -> None:
        clock = self.clocks[queue]
        clock.offset_ms = idle.now_ms - time.time() * 1000
        if idle.next_due_in_ms is None:
            clock.next_check, clock.held_due_ms = math.inf, 0
        else:
            clock.next_check = time.monotonic() + idle.next_due_in_ms / 1000
            clock.held_due_ms = idle.now_ms + idle.next_due_in_ms

    def _claim_due(self) -> Claim | None:
        """Claim from queues whose known due time has come or that are due an idle sweep.

        The sweep (one claim per lease period) recovers due times nobody is waiting for,
        e.g. those a killed worker knew about.
        """
        now = time.monotonic()
        for queue, clock in self.clocks.items():
            if clock.next_check <= now or now - clock.last_claim >= self.sweep_interval:
                claim = self._claim(queue)
                if claim is not None:
                    return claim
        return None

    def _wait_idle(self) -> None:
        now = time.monotonic()
        deadlines = [min(c.next_check, c.last_claim + self.sweep_interval) for c in self.clocks.values()]
        timeout = min(self.broker.max_block, max(0.001, min(deadlines) - now))
        self._update_status()
        wake = self.broker.wait_for_work(self.queues, self.id, timeout)
        if wake is not None and wake.queue is not None:
            self._on_wake(wake)

    def _on_wake(self, wake: Wake) -> None:
        assert wake.queue is not None
        clock = self.clocks[wake.queue]
        redis_now = time.time() * 1000 + clock.offset_ms
        if wake.score_ms > redis_now + 2:
            # A future due time: wait for it ourselves rather than claim now.
            clock.next_check = min(clock.next_check, time.monotonic() + (wake.score_ms - redis_now) / 1000)
            clock.held_due_ms = int(wake.score_ms)
            return
        self._pending = self._claim(wake.queue, woken=True)

    # --- running -------------------------------------------------------------------------------

    def _run_claim(self, claim: Claim) -> None:
        def started(time_limit: float | None) -> None:
            self.running = Running(claim.queue, claim.id, claim.token, time.monotonic(), time_limit)

        started(self.settings.worker.default_time_limit)
        self._update_status(f"running task {claim.id}")
        try:
            outcome = self.runner.run(claim, on_start=started)
        except HandBack:
            self._hand_back(claim, interrupted=True)
            return
        finally:
            self.running = None
        status = self._finish(claim, outcome)
        self._log_outcome(claim, outcome, status)
        if self.settings.metrics.enabled:  # per-task histograms are the costly part; skip when unserved
            self._observe(claim, outcome, status)

    def _finish(self, claim: Claim, outcome: Outcome) -> str:
        """Store the outcome (or schedule the retry); returns the finish script's status, or
        "lost" when Redis could not be reached before an immediate stop."""
        next_claim = None if self.signals.requested else (self._token(), self.lease_ms, self.id)
        delay = 0.1
        while True:
            try:
                status, following = self.broker.finish(
                    claim.queue,
                    claim.id,
                    claim.token,
                    succeeded=outcome.succeeded,
                    envelope=outcome.envelope,
                    retry=outcome.retry,
                    next_claim=next_claim,
                )
                break
            except BrokerError as exc:
                if self.signals.immediate:
                    log.error(
                        "task %s: result not stored (%s); its lease will expire and it runs again",
                        claim.id,
                        exc,
                    )
                    return "lost"
                log.warning("task %s: cannot store the result yet (%s); retrying in %.1f s", claim.id, exc, delay)
                self._update_status("waiting for Redis to store a result")
                self._sleep(delay)
                delay = min(delay * 2, self.settings.worker.reconnect_max_delay)
        if outcome.succeeded:
            self.counters.done += 1
        elif status == "retry":
            self.counters.retried += 1
        else:
            self.counters.failed += 1
        if status == "late":
            self.counters.late_finishes += 1
            self.metrics.contention.labels("late_finish").inc()
            log.warning("task %s: late finish rejected (its lease was reclaimed; another run owns it)", claim.id)
        clock = self.clocks[claim.queue]
        clock.last_claim = time.monotonic()
        if isinstance(following, Claim):
            self._pending = following
        elif isinstance(following, Idle):
            self._learn(claim.queue, following)
        return status

    def _hand_back(self, claim: Claim, *, interrupted: bool) -> None:
        try:
            released = self.broker.release(claim.queue, claim.id, claim.token)
        except BrokerError as exc:
            log.error("task %s: could not hand back (%s); it runs again after its lease", claim.id, exc)
            released = False
        if interrupted:
            self.counters.handed_back += 1
            self.metrics.outcomes.labels(_name_of(claim, self.broker.transport), "handed_back").inc()
        log.warning("task %s handed back to queue %s%s", claim.id, claim.queue, "" if released else " (lease lost)")

    def _observe(self, claim: Claim, outcome: Outcome, status: str) -> None:
        m = self.metrics
        series = m.series(claim.queue, outcome.name)
        series.latency.observe(max(0, claim.now_ms - claim.due_ms) / 1000)
        series.run_time.observe(outcome.duration)
        series.outcomes[_outcome_kind(outcome, status)].inc()
        if not outcome.succeeded:
            m.failures.labels(outcome.name, outcome.error_type or "?").inc()

    def healthy(self) -> bool:
        """Alive: a running task within its limit (plus a lease), or the loop turned recently."""
        running = self.running
        margin = self.settings.worker.lease_seconds
        if running is not None:
            return running.time_limit is None or time.monotonic() - running.started < running.time_limit + margin
        quiet = self.broker.max_block + BLOCKING_SOCKET_SLACK + self.settings.worker.reconnect_max_delay + margin
        return time.monotonic() - self.loop_alive_at < quiet

    def _serve_metrics(self) -> MetricsServer | None:
        config = self.settings.metrics
        if not config.enabled:
            return None
        server = MetricsServer(self.metrics.registry, self.healthy, lambda: self.ready)
        try:
            self.metrics_port = server.start(config.bind, config.port)
        except OSError as exc:
            where = f"{config.bind}:{config.port}"
            raise ConfigError(f"invalid setting metrics.port: cannot listen on {where}: {exc}") from exc
        log.info("metrics on http://%s:%d/metrics", config.bind, self.metrics_port)
        return server

    def _log_outcome(self, claim: Claim, outcome: Outcome, status: str) -> None:
        kind = _outcome_kind(outcome, status)
        result = kind if outcome.succeeded else f"{kind} ({outcome.error_type})"
        if status == "late":
            result += ", rejected: lease lost"
        log.info(
            "task %s name=%s queue=%s attempt=%d outcome=%s duration=%.3fs",
            claim.id,
            outcome.name,
            claim.queue,
            claim.attempts,
            result,
            outcome.duration,
        )
        if not outcome.succeeded:
            log.debug("task %s error envelope: %s", claim.id, outcome.envelope[:2000])

    # --- connection, status, shutdown --------------------------------------------------------------

    def _connect(self) -> bool:
        """Wait until Redis answers and the scripts load; False if told to stop first."""
        delay = 0.1
        while not self.signals.requested:
            try:
                self.broker.ping()
                self.broker.load_scripts()
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
                self._update_status("waiting for Redis")
                log.warning("waiting for Redis at %s: %s (retrying in %.1f s)", self.broker.url, exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, self.settings.worker.reconnect_max_delay)
        return False

    def _wait_for_redis(self, exc: BrokerError) -> None:
        self.ready = False
        started = time.monotonic()
        if not isinstance(exc, BrokerUnavailable):
            # Redis answered with an error (OOM, READONLY, ...): reconnecting will not fix it
            # at once, so pause before trying again instead of spinning.
            log.error("Redis error: %s (retrying in 1 s)", exc)
            self._sleep(1.0)
        else:
            log.warning("lost Redis: %s", exc)
        if self._connect():
            self.metrics.reconnects.inc()
            log.info("Redis is back after %.2f s", time.monotonic() - started)
            for clock in self.clocks.values():
                clock.next_check = 0.0  # look at every queue again at once

    def _sleep(self, seconds: float) -> None:
        """Back off, with jitter, but wake within 0.1 s of a stop signal."""
        deadline = time.monotonic() + seconds * random.uniform(0.8, 1.2)
        while not self.signals.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))
            self.loop_alive_at = time.monotonic()

    def _update_status(self, state: str = "idle") -> None:
        if not self.notifier.enabled:
            return
        self.notifier.status(f"{state}, {self.counters.done} done, {self.counters.failed} failed")

    def _shutdown(self) -> int:
        if self._pending is not None:
            self._hand_back(self._pending, interrupted=False)
            self._pending = None
        for queue, clock in self.clocks.items():
            if clock.held_due_ms:
                try:
                    self.broker.rearm(queue, clock.held_due_ms)
                except BrokerError as exc:
                    log.warning("could not pass on the next due time of queue %s: %s", queue, exc)
        code = EXIT_HANDED_BACK if self.counters.handed_back else EXIT_OK
        log.warning(
            "worker %s stopped: %d done, %d failed, %d wasted wake-ups, %d late finishes, exit %d",
            self.id,
            self.counters.done,
            self.counters.failed,
            self.counters.wasted_wakeups,
            self.counters.late_finishes,
            code,
        )
        return code


def _outcome_kind(outcome: Outcome, status: str) -> str:
    """The outcome label of one run: every failed, timed_out or dead_lettered run has left its
    task in the dead-letter set; a retried one is scheduled to run again."""
    if outcome.succeeded:
        return "succeeded"
    if status == "retry":
        return "retried"
    return "dead_lettered" if outcome.dead else "timed_out" if outcome.timed_out else "failed"
