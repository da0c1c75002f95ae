"""The worker's loop: start-up, `run()` around `tick()`, shutdown; it owns the parts and is
the heartbeat's host. One process, one task at a time.

`tick()` runs at most one task: it stores what ran (claiming the next batch in the same round
trip), takes the next task from the intake (which idle-waits when there is none), runs it, and
holds its result back briefly when the next task usually runs briefly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from ..errors import BrokerError, ConfigError, MiniceleryError, UnknownTask
from ..interrupts import HandBack, StopSignals, TaskAlarm, signals_captured
from ..notify import Notifier
from ..periodic import Schedules
from ..records import Claim, Lease, Running, ScriptStatus
from ..runner import TaskRunner
from ..settings import Settings
from .connection import Connection
from .heartbeat import CANCEL_CHECK_EVERY, Heartbeat
from .intake import Intake
from .observe import Counters, Observer, build_metrics
from .queue_health import QueueHealth
from .results import ResultBuffer
from .stuck import EXIT_TASK_STUCK, stuck_outcome
from .upkeep import Upkeep

if TYPE_CHECKING:
    from ..app import Client

log = logging.getLogger("minicelery.worker")

EXIT_OK = 0
EXIT_HANDED_BACK = 75  # EX_TEMPFAIL: stopped before the running task could finish


class Worker:
    def __init__(self, app: Client, settings: Settings, *, notifier: Notifier | None = None) -> None:
        w = settings.worker
        self.app, self.broker, self.settings = app, app.broker, settings
        self.queues = list(w.queues)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.notifier = notifier or Notifier()
        self.alarm = TaskAlarm()
        self.signals = StopSignals(self.alarm, w.shutdown_grace)
        self.runner = TaskRunner(app, self.alarm, w.default_time_limit, w.max_lost_leases, w.store_results)
        self.running: Running | None = None  # read by the heartbeat thread
        self.running_claim: Claim | None = None  # the claim behind `running` (not cleared: see above)
        self.metrics = build_metrics(app.tasks, self.broker, self.queues, lambda: self.running)
        self.observer = Observer(app.tasks, settings, self.notifier, self.metrics)
        self.broker.on_unreplicated = self.metrics.unreplicated_results.inc
        self.connection = Connection(
            self.broker, self.signals, self.observer, w.reconnect_max_delay, on_connect=lambda: self.schedules.upsert()
        )
        self.schedules = Schedules(app, settings, self.metrics)  # periodic tasks: upsert() and begin()
        self.results = ResultBuffer(
            self.broker, self.observer, self.signals, self.connection.sleep,
            batch=w.batch_size, retry_max_delay=w.reconnect_max_delay,
        )  # fmt: skip
        self.intake = Intake(
            self.broker, self.id, self.queues,
            lease_ms=int(w.lease_seconds * 1000), batch=w.batch_size, sweep_interval=w.lease_seconds,
            observer=self.observer, metrics=self.metrics, usually_brief=self._usually_brief,
            sleep_until=self.connection.sleep_until, stopping=lambda: self.signals.requested,
            schedules=self.schedules,
            health=QueueHealth(self.queues, self.observer, self.connection.set_ready, w.reconnect_max_delay),
        )  # fmt: skip
        self.upkeep = Upkeep(self.broker, w, self.metrics)
        # Tasks held here (claimed, not started) whose cancel the heartbeat learned of: not run.
        self.cancelled_ids: set[str] = set()

    @property
    def counters(self) -> Counters:
        return self.observer.counters

    # --- the loop ------------------------------------------------------------------------------

    def run(self, *, burst: bool = False, install_signals: bool = True, max_tasks: int | None = None) -> int:
        """Run until SIGTERM/SIGINT (or, with burst, until no task is ready; with max_tasks, until
        that many tasks ran, then stop as on SIGTERM). Returns the exit code. The signal
        handlers it installs are put back as they were when it returns."""
        with signals_captured(self.signals, self.alarm) if install_signals else contextlib.nullcontext():
            return self._run(burst, max_tasks)

    def _run(self, burst: bool, max_tasks: int | None = None) -> int:
        w = self.settings.worker
        intervals = [w.lease_seconds / 3, CANCEL_CHECK_EVERY, *filter(None, [self.notifier.watchdog_interval])]
        heartbeat = Heartbeat(self, min(intervals), w.shutdown_grace)
        heartbeat.start()
        server = self.observer.serve_metrics(self.healthy, lambda: self.connection.ready)
        try:
            if not self.connection.connect():
                return EXIT_OK
            log.info("worker %s ready on queues %s", self.id, ", ".join(self.queues))
            self.notifier.ready()
            self.observer.status()
            ran = 0
            while not self.signals.requested and (max_tasks is None or ran < max_tasks):
                try:
                    worked = self.tick(block=not burst)
                except ConfigError:
                    raise  # Redis refused our credentials or ACL mid-run: exit 78
                except BrokerError as exc:
                    if self.connection.recover(exc):
                        self.intake.look_again()
                    continue
                ran += worked
                if burst and not worked and not self.intake.local and not self.results.held:
                    break
            return self._shutdown()
        finally:
            heartbeat.shutdown()
            self.runner.event_loop.close()
            if server is not None:
                server.stop()

    def tick(self, block: bool = True) -> bool:
        """Claim and run at most one task; idle-wait once if there is none. True if a task ran."""
        now = self.observer.loop_alive_at = time.monotonic()
        if self.signals.requested:
            self._flush(claim_next=False)
            self.intake.give_back_unstarted()  # claimed by a batch or the last finish; we are stopping
            return False
        self.upkeep.sweep_orphans_if_due(now)
        if not self.intake.local:
            self._flush(claim_next=True)  # store what ran, and claim the next batch with it
        claim = self.intake.next(block=block)
        if claim is None:
            return False
        self._run_claim(claim)
        if self.results.held and not self._may_hold():
            self._flush(claim_next=not self.intake.local)
        return True

    def _may_hold(self) -> bool:
        """Hold finished results back, to store several in one round trip, only while the batch
        is young and the next task is one that usually runs briefly: a result is not kept
        waiting by a long task. (If that task runs long this time, the heartbeat stores them.)"""
        local = self.intake.local
        return bool(local) and self.results.young() and self._usually_brief(local[0])

    def _flush(self, *, claim_next: bool) -> None:
        """Store the held results; with claim_next, claim the next batch in the same round trip."""
        queue = self.results.last_queue()
        if queue is None:
            return
        stored, following = self.results.flush(self.intake.claim_with_finish(queue) if claim_next else None)
        if stored:
            self.intake.accept(queue, following)

    def _run_claim(self, claim: Claim) -> None:
        if self.cancelled_ids and claim.id in self.cancelled_ids:
            self.cancelled_ids.discard(claim.id)  # cancel.lua finished it: nothing to store
            self.observer.cancelled_unstarted(self.runner.name_of(claim))
            return
        if not self.schedules.begin(claim):
            return  # a schedule's occurrence that is not to run now (periodic.py)
        default_limit = self.settings.worker.default_time_limit
        self.running_claim = claim  # (for end_stuck_task; set before `running`, which it reads first)
        self.running = Running(claim.queue, claim.id, claim.token, time.monotonic(), default_limit)

        def started(time_limit: float | None) -> None:
            if time_limit != default_limit:  # the task's own limit: the heartbeat must know it
                self.running = Running(claim.queue, claim.id, claim.token, time.monotonic(), time_limit)

        self.observer.status(f"running task {claim.id}", per_task=True)
        try:
            outcome = self.runner.run(claim, on_start=started)
        except HandBack:
            self._flush(claim_next=False)
            self.intake.give_back(claim, interrupted=True)
            self.observer.handed_back(self.runner.name_of(claim))
            self.intake.give_back_unstarted()
            return
        finally:
            self.running = None
        if isinstance(outcome.error, UnknownTask) and self.upkeep.defer_unknown(claim, outcome):
            return
        self.results.add(claim, outcome)

    def _usually_brief(self, claim: Claim) -> bool:
        try:
            name = self.runner.peek(claim).name
        except MiniceleryError:
            return False  # a bad payload: its run says what is wrong
        return self.results.usually_brief(name)

    def _shutdown(self) -> int:
        self._flush(claim_next=False)
        self.intake.give_back_unstarted()
        self.intake.leave()
        try:
            self.broker.forget_worker(self.queues, self.id)
        except BrokerError as exc:
            log.warning("could not remove this worker from the live list: %s", exc)
        code = EXIT_HANDED_BACK if self.counters.handed_back else EXIT_OK
        self.observer.stopped(self.id, code)
        return code

    # --- what the heartbeat thread may ask (heartbeat.HeartbeatHost) ---------------------------

    @property
    def stop_event(self) -> threading.Event:
        return self.signals.event

    def running_task(self) -> Running | None:
        return self.running

    def healthy(self) -> bool:
        """Also unhealthy: a task cancelled a lease ago that still runs (it ignores Cancelled)."""
        since = self.alarm.cancelled_since
        if (
            since is not None
            and self.running is not None
            and time.monotonic() - since > self.settings.worker.lease_seconds
        ):
            return False
        return self.observer.healthy(self.running, self.broker.max_block)

    def held_leases(self) -> list[Lease]:
        waiting = tuple(self.intake.local) + tuple(c for c, _ in self.results.held)  # atomic copies under the GIL
        return [Lease(c.queue, c.id, c.token) for c in waiting]

    def renew(self, leases: list[Lease]) -> list[ScriptStatus]:
        return self.broker.renew_many(leases, self.intake.lease_ms)

    def cancelled(self, lease: Lease) -> None:
        running = self.running
        if running is not None and running.token == lease.token:
            if self.alarm.cancel(lease.token):
                by = self.broker.cancelled_by(lease.queue, lease.task_id)
                log.info("task %s was cancelled (by %s) while it ran: interrupting it", lease.task_id, by)
        elif lease.task_id not in self.cancelled_ids:
            by = self.broker.cancelled_by(lease.queue, lease.task_id)
            log.info("task %s was cancelled (by %s) before it started: it will not run", lease.task_id, by)
            self.cancelled_ids.add(lease.task_id)

    def store_held_results(self) -> None:
        self.results.store_held(self.running_task)

    def on_stop(self) -> None:
        self.notifier.stopping()
        try:
            self.broker.wake_worker(self.id, self.intake.health.usable())  # (the queues it waits on)
        except BrokerError as exc:  # the main loop notices the stop within one idle block
            log.warning("could not wake the idle wait: %s", exc)

    def watchdog(self) -> None:
        self.notifier.watchdog()

    def end_stuck_task(self) -> None:
        """The running task is a lease past its time limit although TimeLimitExceeded was raised
        into it every second: it catches everything, or it is stuck outside Python. Nothing in
        the process can stop it, so the worker records it as timed out (not retried), stores
        what it holds, gives back what it claimed and exits EXIT_TASK_STUCK for its supervisor
        to restart it. (C code that holds the GIL starves this thread too: the watchdog and
        /healthz end that one.) Without the worker's signal handlers (install_signals=False)
        limits are not enforced, and this does nothing."""
        running, claim = self.running, self.running_claim
        if running is None or claim is None or claim.token != running.token or not self.alarm.installed:
            return  # (nothing runs, or the run just ended and the next began between the two reads)
        outcome = stuck_outcome(
            running,
            self.runner.name_of(claim),
            cancelled=self.alarm.cancelled_since is not None,
            lease_seconds=self.settings.worker.lease_seconds,
            transport=self.broker.transport,
        )
        try:
            self.results.store_now(claim, outcome)
        except BrokerError as exc:
            log.error("could not record it (%s): its lease expires and it is reclaimed", exc)
        self.intake.give_back_unstarted()
        self.intake.leave()
        self.notifier.status("exiting: a task did not stop after its time limit")
        logging.shutdown()  # flush the log before the hard exit
        os._exit(EXIT_TASK_STUCK)
