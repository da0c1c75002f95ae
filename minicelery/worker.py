"""The worker: one process, one task at a time, blocking on Redis while idle.

`run()` loops over `tick()`, which claims and runs at most one task. Idle, the worker makes one
blocking call (BZPOPMIN on its inboxes and its queues' markers) and wakes when a task is handed
to it (already leased to it: it runs it at once, without claiming), when a task is ready for
it, when a due time it knows of arrives, or when it is told to stop. A busy worker claims a
batch of tasks at a time and stores their results in the same pipeline as the next claim, so
it makes one round trip per batch.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .broker import BLOCKING_SOCKET_SLACK, ORPHAN_SWEEP_BATCH, Claim, Idle, RetryPlan, Wake
from .errors import BrokerError, BrokerUnavailable, ConfigError, MiniceleryError, TaskTimeout, UnknownTask
from .heartbeat import Heartbeat, Running
from .interrupts import HandBack, StopSignals, TaskAlarm
from .metrics import MetricsServer, WorkerMetrics
from .notify import Notifier
from .periodic import Schedules
from .runner import Outcome, TaskRunner
from .settings import Settings
from .transport import JSONTransport

if TYPE_CHECKING:
    from .app import Client

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_TASK_STUCK = 70  # EX_SOFTWARE: a task did not stop after its time limit; the worker exits to end it
EXIT_HANDED_BACK = 75  # EX_TEMPFAIL: stopped before the running task could finish

# The task label for a name no task module registered: a client can send any name, and each
# would otherwise become a new metrics series.
UNKNOWN_TASK_LABEL = "(unknown)"

# A task whose name this worker lacks is given back to run this much later (or sooner: never
# later than the grace allows), for a worker that has it.
UNKNOWN_TASK_RETRY_MS = 5000


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


# Redis checks blocking-command timeouts on its `hz` timer (10 Hz by default), so a timeout
# can fire up to this late; the worker does not leave a due time to a Redis timeout.
REDIS_TIMEOUT_GRAIN = 0.1

# Longest a finished result may be held back to be stored together with the next ones.
FINISH_HOLD_MAX = 0.005

# A busy worker tells systemd which task it runs at most this often (seconds).
PER_TASK_STATUS_EVERY = 1.0


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
        self.schedules = Schedules(app, settings, self.metrics)  # periodic tasks: upsert() and begin()
        self.metrics.info.info(
            {"version": _version(), "queues": ",".join(self.queues), "hostname": socket.gethostname()}
        )
        self.metrics_port: int | None = None
        self.ready = False
        self.loop_alive_at = time.monotonic()
        # Claimed under lease, not yet run (a batch claim), and run but not yet stored.
        self._local: deque[Claim] = deque()
        self._unflushed: list[tuple[Claim, Outcome]] = []
        self._unflushed_since = 0.0
        # The heartbeat thread may store the run-but-unstored results too (store_held_results):
        # this lock guards that list and the counters its finishes update.
        self._results_lock = threading.Lock()
        self.batch = settings.worker.batch_size
        self._typical_run: dict[str, float] = {}  # task name -> smoothed run time (s)
        self._claims = 0
        # Queues whose idle set holds this worker (tasks may be handed to it). A claim that
        # gets tasks, or a hand-off, takes it out; the next idle wait puts it back.
        self._idle_in: set[str] = set()
        self._status_per_task = False  # the last status sent named the running task
        self._status_sent_at = -math.inf
        self._orphans_due_at = 0.0  # monotonic: the next orphan sweep (at once on start-up)

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
                if burst and not worked and not self._local and not self._unflushed:
                    break
            return self._shutdown()
        finally:
            heartbeat.shutdown()
            if server is not None:
                server.stop()

    def tick(self, block: bool = True) -> bool:
        """Claim and run at most one task; idle-wait once if there is none. True if a task ran."""
        self.loop_alive_at = time.monotonic()
        if self.signals.requested:
            self._flush(claim_next=False)
            self._hand_back_local()  # claimed by a batch or the last finish; we are stopping
            return False
        if self.loop_alive_at >= self._orphans_due_at:
            self._sweep_orphans()
        if not self._local:
            self._flush(claim_next=True)  # store what ran, and claim the next batch with it
        if not self._local:
            self._local.extend(self._claim_due())
        if not self._local:
            if block and not self.signals.requested:
                self._wait_idle()
            return False
        claim = self._local.popleft()
        self._run_claim(claim)
        if self._unflushed and not self._may_defer_finish():
            self._flush(claim_next=not self._local)
        return True

    # --- claiming ------------------------------------------------------------------------------

    def _token(self) -> str:
        self._claims += 1
        return f"{self.id}:{self._claims}"

    def _claim(self, queue: str, *, woken: bool = False) -> list[Claim]:
        clock = self.clocks[queue]
        reply = self.broker.claim(
            queue, self._token(), self.lease_ms, self.id, clock.held_due_ms, self.batch, woken=woken, handoffs=True
        )
        clock.last_claim = time.monotonic()
        if isinstance(reply, list):
            self._claimed(queue, reply)
            return reply
        self._learn(queue, reply)
        if woken:
            self.counters.wasted_wakeups += 1
            self.metrics.contention.labels("wakeup").inc()
        return []

    def _claimed(self, queue: str, claims: list[Claim]) -> None:
        self._idle_in.discard(queue)  # the claim script took this worker out of the idle set
        self._leave_other_idle_sets()
        clock = self.clocks[queue]
        clock.held_due_ms = 0  # handed on by the claim script
        clock.next_check = math.inf
        clock.offset_ms = claims[0].now_ms - time.time() * 1000

    def _learn(self, queue: str, idle: Idle) -> None:
        clock = self.clocks[queue]
        clock.offset_ms = idle.now_ms - time.time() * 1000
        if idle.next_due_in_ms is None:
            clock.next_check, clock.held_due_ms = math.inf, 0
        else:
            clock.next_check = time.monotonic() + idle.next_due_in_ms / 1000
            clock.held_due_ms = idle.now_ms + idle.next_due_in_ms

    def _claim_due(self) -> list[Claim]:
        """Claim from queues whose known due time has come or that are due an idle sweep.

        The sweep (one claim per lease period) recovers due times nobody is waiting for,
        e.g. those a killed worker knew about.
        """
        now = time.monotonic()
        for queue, clock in self.clocks.items():
            if clock.next_check <= now or now - clock.last_claim >= self.sweep_interval:
                claims = self._claim(queue)
                if claims:
                    return claims
        return []

    def _sweep_orphans(self) -> None:
        """Dead-letter the tasks that have waited worker.orphan_ttl for parents nobody started
        (scripts/orphans.lua). Once per lease period, like the idle sweep, but busy or idle: one
        call per queue per period, never one per task. Again at once while a batch came back full."""
        self._orphans_due_at = time.monotonic() + self.sweep_interval
        ttl = self.settings.worker.orphan_ttl
        for queue in self.queues:
            swept = self.broker.sweep_orphans(queue, ttl)
            if swept:
                log.warning(
                    "dead-lettered %d task(s) on queue %s whose parents were never started within "
                    "orphan_ttl (%g s): %s",
                    len(swept),
                    queue,
                    ttl,
                    " ".join(swept),
                )
            if len(swept) >= ORPHAN_SWEEP_BATCH:
                self._orphans_due_at = 0.0

    def _wait_idle(self) -> None:
        now = time.monotonic()
        due = min(c.next_check for c in self.clocks.values()) - now  # a task falls due then
        sweep = min(c.last_claim + self.sweep_interval for c in self.clocks.values()) - now
        if due <= REDIS_TIMEOUT_GRAIN:
            # Redis fires blocking timeouts on its 10 Hz timer, up to 100 ms late: wait out the
            # last stretch before a due time here, to the millisecond. (Another idle worker, if
            # any, takes work pushed meanwhile; if none, the claim at the due time takes it.)
            self._sleep_until(now + max(0.0, due))
            return
        timeout = min(self.broker.max_block, max(0.001, sweep), due - REDIS_TIMEOUT_GRAIN)
        self._update_status()
        register = [queue for queue in self.queues if queue not in self._idle_in]
        wake = self.broker.wait_for_work(
            self.queues, self.id, timeout, handoffs_lease_ms=self.lease_ms, register=register
        )
        self._idle_in.update(register)
        if wake is None or wake.queue is None:
            return
        if wake.handed is not None:
            self._on_handed(wake.queue, wake.handed)
        else:
            self._on_wake(wake)

    def _on_handed(self, queue: str, claim: Claim) -> None:
        """A task handed to this idle worker: the hand-off took it out of the queue's idle set
        and leased the task to it. It runs next.

        A due time this worker waits for is passed on, as a claim would, unless the task
        usually runs briefly: then the claim that follows it passes it on (or learns it
        again), and the hand-off saves that round trip."""
        self._idle_in.discard(queue)
        self._local.append(claim)
        self.metrics.handoffs.labels(queue).inc()
        self._leave_other_idle_sets()
        if self._usually_brief(claim):
            return
        for name, clock in self.clocks.items():
            if clock.held_due_ms:
                self.broker.rearm(name, clock.held_due_ms)
                clock.held_due_ms = 0

    def _on_wake(self, wake: Wake) -> None:
        assert wake.queue is not None
        clock = self.clocks[wake.queue]
        redis_now = time.time() * 1000 + clock.offset_ms
        if wake.score_ms > redis_now + 2:
            # A future due time: wait for it ourselves rather than claim now.
            clock.next_check = min(clock.next_check, time.monotonic() + (wake.score_ms - redis_now) / 1000)
            clock.held_due_ms = int(wake.score_ms)
            return
        self._local.extend(self._claim(wake.queue, woken=True))

    # --- running -------------------------------------------------------------------------------

    def _run_claim(self, claim: Claim) -> None:
        if not self.schedules.begin(claim):
            return  # a schedule's occurrence that is not to run now (periodic.py)
        default_limit = self.settings.worker.default_time_limit
        self.running = Running(claim.queue, claim.id, claim.token, time.monotonic(), default_limit)

        def started(time_limit: float | None) -> None:
            if time_limit != default_limit:  # the task's own limit: the heartbeat must know it
                self.running = Running(claim.queue, claim.id, claim.token, time.monotonic(), time_limit)

        self._update_status(f"running task {claim.id}", per_task=True)
        try:
            outcome = self.runner.run(claim, on_start=started)
        except HandBack:
            self._flush(claim_next=False)
            self._hand_back(claim, interrupted=True)
            self._hand_back_local()
            return
        finally:
            self.running = None
        if isinstance(outcome.error, UnknownTask) and self._defer_unknown(claim, outcome):
            return
        typical = self._typical_run.get(outcome.name, outcome.duration)
        self._typical_run[outcome.name] = 0.8 * typical + 0.2 * outcome.duration
        with self._results_lock:
            if not self._unflushed:
                self._unflushed_since = time.monotonic()
            self._unflushed.append((claim, outcome))

    def _defer_unknown(self, claim: Claim, outcome: Outcome) -> bool:
        """A task named for no task this worker has: give it back for a worker that has it (a
        rolling deploy sends new tasks before every worker runs the new code), until
        unknown_task_grace has passed since the first worker did so; then it is dead-lettered
        like any failure. True if it was given back (or is no longer ours)."""
        grace_ms = int(self.settings.worker.unknown_task_grace * 1000)
        if grace_ms <= 0:
            return False
        try:
            status, first_ms = self.broker.defer(
                claim.queue, claim.id, claim.token, min(UNKNOWN_TASK_RETRY_MS, grace_ms), grace_ms
            )
        except BrokerError as exc:
            log.warning("task %s: could not give back the unknown task %r: %s", claim.id, outcome.name, exc)
            return True  # its lease expires and it is claimed again
        if status == "expired":
            log.warning(
                "task %s: no worker ran task %r within unknown_task_grace (%g s): dead-lettered",
                claim.id, outcome.name, self.settings.worker.unknown_task_grace,
            )  # fmt: skip
            return False
        if status == "deferred":
            self.metrics.unknown_tasks.labels(claim.queue).inc()
            waited = max(0.0, (claim.now_ms - first_ms) / 1000)
            log.warning(
                "task %s: task %r is not registered in this worker; given back for a worker that has it "
                "(first given back %.0f s ago; dead-lettered after unknown_task_grace, %g s)",
                claim.id, outcome.name, waited, self.settings.worker.unknown_task_grace,
            )  # fmt: skip
        return True

    def _may_defer_finish(self) -> bool:
        """Hold finished results back, to store several in one round trip, only while the batch
        is young and the next task is one that usually runs briefly: a result is not kept
        waiting by a long task. (If that task runs long this time, the heartbeat thread stores
        the held results: see store_held_results.)"""
        if not self._local or len(self._unflushed) >= self.batch:
            return False
        if time.monotonic() - self._unflushed_since >= FINISH_HOLD_MAX:
            return False
        return self._usually_brief(self._local[0])

    def _usually_brief(self, claim: Claim) -> bool:
        """True if this task's runs so far took under FINISH_HOLD_MAX (smoothed)."""
        try:
            name = self.runner.peek(claim).name
        except MiniceleryError:
            return False  # a bad payload: its run says what is wrong
        return self._typical_run.get(name, math.inf) < FINISH_HOLD_MAX

    def held_leases(self) -> list[tuple[str, str, str]]:
        """(queue, id, token) of tasks claimed but not running: the heartbeat renews them too."""
        waiting = tuple(self._local) + tuple(c for c, _ in self._unflushed)  # atomic copies under the GIL
        return [(c.queue, c.id, c.token) for c in waiting]

    def store_held_results(self) -> None:
        """Called by the heartbeat thread: store the results held back for a batch while the
        task after them, one that usually runs briefly, has run longer than FINISH_HOLD_MAX.
        They would otherwise wait for it to end, however long it runs. If Redis fails, they
        stay held, and the main thread stores them (retrying) once the task ends."""
        with self._results_lock:
            # Under the lock: the main thread adds the running task's own result under it,
            # after it clears self.running, so that result is never taken here.
            running = self.running
            if running is None or not self._unflushed or time.monotonic() - running.started < FINISH_HOLD_MAX:
                return
            held, self._unflushed = self._unflushed, []
        try:
            statuses, _ = self.broker.finish_many(_finishes(held))
        except BrokerError as exc:
            log.warning("could not store %d held results yet: %s", len(held), exc)
            with self._results_lock:
                self._unflushed[:0] = held
            return
        self._count_all(held, statuses)

    def _flush(self, *, claim_next: bool) -> None:
        """Store every run-but-unstored outcome (retrying while Redis is away) and, with
        claim_next, claim the next batch in the same round trip."""
        with self._results_lock:
            finished, self._unflushed = self._unflushed, []
        if not finished:
            return
        queue = finished[-1][0].queue
        clock = self.clocks[queue]
        follow = (queue, self._token(), self.lease_ms, self.id, self.batch, clock.held_due_ms) if claim_next else None
        items = _finishes(finished)
        delay = 0.1
        while True:
            try:
                statuses, following = self.broker.finish_many(items, follow)
                break
            except BrokerError as exc:
                if self.signals.immediate:
                    log.error("%d results not stored (%s); their leases expire and they run again", len(items), exc)
                    return
                log.warning("cannot store the result yet (%d tasks): %s; retrying in %.1f s", len(items), exc, delay)
                self._update_status("waiting for Redis to store a result")
                self._sleep(delay)
                delay = min(delay * 2, self.settings.worker.reconnect_max_delay)
                follow = None  # claim nothing new on the way back from an outage
        self._count_all(finished, statuses)
        clock.last_claim = time.monotonic()
        if isinstance(following, list):
            self._claimed(queue, following)
            self._local.extend(following)
        elif isinstance(following, Idle):
            self._learn(queue, following)

    def _count_all(self, finished: list[tuple[Claim, Outcome]], statuses: list[str]) -> None:
        for (claim, outcome), status in zip(finished, statuses, strict=True):
            self._count(claim, outcome, status)

    def _count(self, claim: Claim, outcome: Outcome, status: str) -> None:
        with self._results_lock:  # (the heartbeat thread counts the results it stores)
            if outcome.succeeded:
                self.counters.done += 1
            elif status == "retry":
                self.counters.retried += 1
            else:
                self.counters.failed += 1
            if status == "late":
                self.counters.late_finishes += 1
        if status == "late":
            self.metrics.contention.labels("late_finish").inc()
            log.warning("task %s: late finish rejected (its lease was reclaimed; another run owns it)", claim.id)
        elif status == "gone":
            log.warning(
                "task %s: finished, but Redis no longer has the task (purged, or Redis lost its data: "
                "a restart without persistence or a flush); its result is dropped",
                claim.id,
            )
        if log.isEnabledFor(logging.INFO):  # (building the line costs more than the check)
            self._log_outcome(claim, outcome, status)
        if self.settings.metrics.enabled:  # per-task histograms are the costly part; skip when unserved
            self._observe(claim, outcome, status)

    def _leave_other_idle_sets(self) -> None:
        """A worker on several queues, busy on one, leaves the idle sets of the others: a task
        handed to it there would wait for this one while another worker may be idle. What was
        handed to it meanwhile is leased to it already: it runs that too. (One round trip, only
        for a worker on several queues that was waiting on them.)"""
        if self._idle_in:
            self._local.extend(self._leave(sorted(self._idle_in)))

    def _leave_idle_sets(self) -> None:
        """Take this worker out of every idle set and give back what was handed to it since.
        (Even when it thinks it is in none: Redis may have kept it across a lost connection.)"""
        for claim in self._leave(self.queues):
            self._hand_back(claim, interrupted=False)

    def _leave(self, queues: list[str]) -> list[Claim]:
        """Leave these queues' idle sets; returns the tasks handed to this worker meanwhile
        (leased to it). If Redis fails, the worker stays in them and nothing is returned: it
        tries again next time, and a task handed to it runs after its lease at worst."""
        try:
            handed = self.broker.leave(queues, self.id, self.lease_ms)
        except BrokerError as exc:
            log.warning("could not leave the idle sets of %s: %s", ", ".join(queues), exc)
            return []
        self._idle_in.difference_update(queues)
        return handed

    def _hand_back_local(self) -> None:
        """Give back every task claimed but not started (not counted as interrupted)."""
        while self._local:
            self._hand_back(self._local.popleft(), interrupted=False)

    def _hand_back(self, claim: Claim, *, interrupted: bool) -> None:
        try:
            released = self.broker.release(claim.queue, claim.id, claim.token)
        except BrokerError as exc:
            log.error("task %s: could not hand back (%s); it runs again after its lease", claim.id, exc)
            released = False
        if interrupted:
            self.counters.handed_back += 1
            self.metrics.outcomes.labels(self._label(_name_of(claim, self.broker.transport)), "handed_back").inc()
        log.warning("task %s handed back to queue %s%s", claim.id, claim.queue, "" if released else " (lease lost)")

    def _label(self, name: str) -> str:
        """A task name as a metrics label: only registered names (see UNKNOWN_TASK_LABEL)."""
        return name if name in self.app.tasks else UNKNOWN_TASK_LABEL

    def _observe(self, claim: Claim, outcome: Outcome, status: str) -> None:
        m = self.metrics
        task = self._label(outcome.name)
        series = m.series(claim.queue, task)
        series.latency.observe(max(0, claim.now_ms - claim.due_ms) / 1000)
        series.run_time.observe(outcome.duration)
        series.outcomes[_outcome_kind(outcome, status)].inc()
        if not outcome.succeeded:
            m.failures.labels(task, outcome.error_type or "?").inc()
            if status == "ok":  # failed for good: finish.lua put it in the dead-letter set
                series.outcomes["dead_lettered"].inc()

    def end_stuck_task(self) -> None:
        """Called by the heartbeat thread when the running task is still running a lease past
        its time limit although TimeLimitExceeded was raised into it every second: it catches
        everything, or it is stuck in code that never returns to Python. Nothing inside the
        process can stop it, so the worker records it as timed out (not retried: it would only
        do the same again), stores the results it holds, gives back the tasks it claimed, and
        exits EXIT_TASK_STUCK; systemd, Kubernetes or the pool restarts it. (A task stuck in C
        code that holds the GIL starves this thread too: the watchdog and /healthz, which then
        stop answering, are what end that one.) Without the worker's signal handlers (an
        in-process worker run with install_signals=False) time limits are not enforced, and
        this does nothing."""
        running = self.running
        if not self.alarm.installed:
            return
        if running is not None:
            log.error(
                "task %s did not stop within %g s after its time limit of %g s (it catches the "
                "interruption, or is stuck outside Python): recorded as timed out; the worker exits %d "
                "to end it",
                running.task_id, self.settings.worker.lease_seconds, running.time_limit or 0, EXIT_TASK_STUCK,
            )  # fmt: skip
            error = TaskTimeout(
                f"task did not stop after its time limit of {running.time_limit or 0:g} s; its worker exited"
            )
            envelope = self.broker.transport.dumps_error(error)
            with self._results_lock:
                held, self._unflushed = self._unflushed, []
            try:
                self.broker.finish_many(
                    [*_finishes(held), (running.queue, running.task_id, running.token, False, envelope, None)]
                )
            except BrokerError as exc:
                log.error("could not record it (%s): its lease expires and it is reclaimed", exc)
            self._hand_back_local()
            self._leave_idle_sets()
        self.notifier.status("exiting: a task did not stop after its time limit")
        logging.shutdown()  # flush the log before the hard exit
        os._exit(EXIT_TASK_STUCK)

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
            if "port" in config.model_fields_set:  # set in the file, environment or code: honour it
                raise ConfigError(f"invalid setting metrics.port: cannot listen on {where}: {exc}") from exc
            # Only the default is taken, most likely by another worker on this host (the original
            # README runs several): take a free port rather than refuse to start.
            self.metrics_port = server.start(config.bind, 0)
            log.warning(
                "default metrics port %s is taken (%s); metrics on http://%s:%d/metrics instead "
                "(set metrics.port to choose one)",
                where,
                exc.strerror,
                config.bind,
                self.metrics_port,
            )
            return server
        log.info("metrics on http://%s:%d/metrics", config.bind, self.metrics_port)
        return server

    def _log_outcome(self, claim: Claim, outcome: Outcome, status: str) -> None:
        kind = _outcome_kind(outcome, status)
        result = kind if outcome.succeeded else f"{kind} ({_one_line(outcome)})"
        if status == "late":
            result += ", rejected: lease lost"
        elif status == "ok" and not outcome.succeeded:
            result += ", dead-lettered"
        log.info(
            "task %s name=%s queue=%s attempt=%d outcome=%s duration=%.3fs",
            claim.id,
            outcome.name,
            claim.queue,
            claim.attempts,
            result,
            outcome.duration,
        )
        if outcome.error is not None:
            # The traceback: a warning when the task failed for good, detail when it runs again.
            level = logging.WARNING if status == "ok" else logging.DEBUG
            if log.isEnabledFor(level):
                trace = "".join(traceback.format_exception(outcome.error)).rstrip()
                log.log(level, "task %s name=%s failed:\n%s", claim.id, outcome.name, trace)

    # --- connection, status, shutdown --------------------------------------------------------------

    def _connect(self) -> bool:
        """Wait until Redis answers and the scripts load; False if told to stop first."""
        delay = 0.1
        while not self.signals.requested:
            try:
                self.broker.ping()
                self.broker.load_scripts()
                self.schedules.upsert()
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
        self._idle_in.clear()  # a restarted Redis may have lost the idle sets: join them again
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

    def _sleep_until(self, deadline: float) -> None:
        """Sleep to a monotonic deadline, exactly (no jitter), still waking for a stop signal."""
        while not self.signals.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))

    def _sleep(self, seconds: float) -> None:
        """Back off, with jitter, but wake within 0.1 s of a stop signal."""
        deadline = time.monotonic() + seconds * random.uniform(0.8, 1.2)
        while not self.signals.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))
            self.loop_alive_at = time.monotonic()

    def _update_status(self, state: str = "idle", *, per_task: bool = False) -> None:
        """Tell systemd what the worker does (`systemctl status`). Naming each running task is
        throttled while the worker stays busy: every status is a datagram to PID 1, and one per
        task cost the worker 21 µs of CPU per task, half again a no-op task's own 40 µs. Any
        other status (idle, waiting for Redis) goes out at once."""
        if not self.notifier.enabled:
            return
        now = time.monotonic()
        if per_task and self._status_per_task and now - self._status_sent_at < PER_TASK_STATUS_EVERY:
            return
        self._status_per_task, self._status_sent_at = per_task, now
        self.notifier.status(f"{state}, {self.counters.done} done, {self.counters.failed} failed")

    def _shutdown(self) -> int:
        self._flush(claim_next=False)
        self._hand_back_local()
        self._leave_idle_sets()
        for queue, clock in self.clocks.items():
            if clock.held_due_ms:
                try:
                    self.broker.rearm(queue, clock.held_due_ms)
                except BrokerError as exc:
                    log.warning("could not pass on the next due time of queue %s: %s", queue, exc)
        try:
            self.broker.forget_worker(self.queues, self.id)
        except BrokerError as exc:
            log.warning("could not remove this worker from the live list: %s", exc)
        self.runner.event_loop.close()
        code = EXIT_HANDED_BACK if self.counters.handed_back else EXIT_OK
        log.log(
            logging.WARNING if code else logging.INFO,
            "worker %s stopped: %d done, %d failed, %d wasted wake-ups, %d late finishes, exit %d",
            self.id,
            self.counters.done,
            self.counters.failed,
            self.counters.wasted_wakeups,
            self.counters.late_finishes,
            code,
        )
        return code


def _finishes(finished: list[tuple[Claim, Outcome]]) -> list[tuple[str, str, str, bool, bytes, RetryPlan | None]]:
    """The broker's finish_many items for run tasks and their outcomes."""
    return [(c.queue, c.id, c.token, o.succeeded, o.envelope, o.retry) for c, o in finished]


def _outcome_kind(outcome: Outcome, status: str) -> str:
    """The outcome label of one run. A failed or timed_out run whose finish was recorded left its
    task in the dead-letter set, which `dead_lettered` counts besides; a retried run is
    scheduled to run again."""
    if outcome.succeeded:
        return "succeeded"
    if status == "retry":
        return "retried"
    return "timed_out" if outcome.timed_out else "failed"


def _one_line(outcome: Outcome) -> str:
    """`ValueError: boom` for the outcome log line (the message cut to one short line)."""
    if outcome.error is None:
        return outcome.error_type or "?"
    message = str(outcome.error).strip().splitlines()[0][:300] if str(outcome.error).strip() else ""
    return f"{outcome.error_type}: {message}" if message else str(outcome.error_type)
