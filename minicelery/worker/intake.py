"""Every way a claimed task reaches the worker, behind one `next()`.

A task arrives by a claim of a queue whose due time came (or whose idle sweep is due), by the
claim sent with a batch's finishes (`claim_with_finish` / `accept`), handed to this worker's
inbox while it waited idle, or handed to it meanwhile on another queue's idle set. Each lands
in `local`, the tasks leased to this worker and not started yet, in order.

Idle, the worker makes one blocking call (BZPOPMIN on its wake key, its inboxes and its
queues' markers) and wakes when a task is handed to it (already leased to it), when a task is
ready for it, when a due time it knows of arrives, or when it is told to stop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..broker import RedisBroker
from ..errors import BrokerError, BrokerUnavailable
from ..metrics import WorkerMetrics
from ..records import Claim, Idle, NextClaim, Wake
from .clock import REDIS_TIMEOUT_GRAIN, QueueClock, RedisClock
from .observe import Observer
from .queue_health import QueueHealth

log = logging.getLogger("minicelery.worker")


class BeginsWithClaim(Protocol):
    """periodic.Schedules, as the intake sees it."""

    def begin_with_claim(self, queue: str, due_ms: int, token: str) -> list[Any] | None: ...

    def begun_with_claim(self, reply: list[Any]) -> None: ...


class Intake:
    def __init__(
        self,
        broker: RedisBroker,
        worker_id: str,
        queues: list[str],
        *,
        lease_ms: int,
        batch: int,
        sweep_interval: float,
        observer: Observer,
        metrics: WorkerMetrics,
        usually_brief: Callable[[Claim], bool],
        sleep_until: Callable[[float], None],
        stopping: Callable[[], bool],
        schedules: BeginsWithClaim,
        health: QueueHealth,
    ) -> None:
        self.broker = broker
        self.worker_id = worker_id
        self.queues = queues
        self.lease_ms = lease_ms
        self.batch = batch
        self.sweep_interval = sweep_interval  # an idle claim per queue this often recovers lost due times
        self.observer = observer
        self.metrics = metrics
        self.usually_brief = usually_brief
        self.sleep_until = sleep_until  # exact, waking for a stop signal
        self.stopping = stopping  # a stop was requested: do not start an idle wait
        self.schedules = schedules  # a schedule's slot: its begin goes with the claim at that time
        redis_clock = RedisClock()  # one Redis behind every queue
        self.clocks = {queue: QueueClock(redis_clock) for queue in queues}
        self.local: deque[Claim] = deque()  # leased to this worker, not started yet
        self._claims = 0
        # Queues whose idle set holds this worker (tasks may be handed to it). A claim that
        # gets tasks, or a hand-off, takes it out; the next idle wait puts it back.
        self._idle_in: set[str] = set()
        # On a cluster, a queue whose node does not answer is set aside while the others are
        # served (queue_health.py); on one Redis, losing it is losing Redis (Connection.recover).
        self.on_cluster = broker.cluster is not None
        self.health = health

    def next(self, *, block: bool) -> Claim | None:
        """The next task to run: one already here, else one claimed from a queue that is due.
        With none, wait idle once (with `block`) and return None; what the wait brought is
        returned by the next call."""
        if not self.local:
            self.local.extend(self._claim_due())
        if self.local:
            return self.local.popleft()
        if block and not self.stopping():
            self._wait_idle()
        return None

    # --- claiming ------------------------------------------------------------------------------

    def _token(self) -> str:
        self._claims += 1
        return f"{self.worker_id}:{self._claims}"

    def claim_with_finish(self, queue: str) -> NextClaim:
        """The claim to send with a batch's finishes (see accept)."""
        clock = self.clocks[queue]
        return NextClaim(queue, self._token(), self.lease_ms, self.worker_id, self.batch, clock.held_due_ms)

    def accept(self, queue: str, reply: list[Claim] | Idle | None) -> None:
        """What the claim sent with the finishes brought (None: no claim went out)."""
        self.clocks[queue].last_claim = time.monotonic()
        if isinstance(reply, list):
            self._claimed(queue, reply)
            self.local.extend(reply)
        elif isinstance(reply, Idle):
            self.clocks[queue].learn(reply)

    def _claim(self, queue: str, *, woken: bool = False, timed: bool = False) -> list[Claim]:
        """`timed`: the due time this worker waited for has come (it may be a schedule's slot)."""
        clock = self.clocks[queue]
        token = self._token()
        begin = (
            self.schedules.begin_with_claim(queue, clock.held_due_ms, token) if timed and clock.held_due_ms else None
        )
        try:
            if begin is None:
                reply = self.broker.claim(
                    queue,
                    token,
                    self.lease_ms,
                    self.worker_id,
                    clock.held_due_ms,
                    self.batch,
                    woken=woken,
                    handoffs=True,
                )
            else:
                reply, begun = self.broker.claim_and_begin(
                    queue, token, self.lease_ms, self.worker_id, clock.held_due_ms, self.batch, begin
                )
                self.schedules.begun_with_claim(begun)
        except BrokerUnavailable as exc:
            if not self.on_cluster:
                raise
            self._set_aside(queue, exc)
            return []
        clock.last_claim = time.monotonic()
        if isinstance(reply, list):
            self._claimed(queue, reply)
            return reply
        clock.learn(reply)
        if woken:
            self.observer.wasted_wakeup()
        return []

    def _claimed(self, queue: str, claims: list[Claim]) -> None:
        self._idle_in.discard(queue)  # the claim script took this worker out of the idle set
        self._leave_other_idle_sets()
        self.clocks[queue].claimed(claims[0].now_ms)

    def _claim_due(self) -> list[Claim]:
        """Claim from queues whose known due time has come or that are due an idle sweep.

        The sweep (one claim per lease period) recovers due times nobody is waiting for,
        e.g. those a killed worker knew about.
        """
        now = time.monotonic()
        for queue, clock in self.clocks.items():
            if self.health.aside and queue in self.health.aside and not self._take_back(queue, now):
                continue
            if clock.next_check <= now or now - clock.last_claim >= self.sweep_interval:
                claims = self._claim(queue, timed=clock.next_check <= now)
                if claims:
                    return claims
        return []

    # --- queues set aside (a cluster's node that does not answer) -------------------------------

    def _set_aside(self, queue: str, exc: BrokerUnavailable) -> None:
        self.health.set_aside(queue, exc)
        self._idle_in.discard(queue)  # (not left: its node does not answer; the wait joins it again)

    def _take_back(self, queue: str, now: float) -> bool:
        """A queue set aside, due a check: True if its node answers (it is claimed from at once)."""
        if not self.health.retry_due(queue, now):
            return False
        try:
            self.broker.check_queue_node(queue)
        except BrokerUnavailable as exc:
            self.health.set_aside(queue, exc)
            return False
        self.health.taken_back(queue)
        self.clocks[queue].next_check = 0.0
        return True

    def _wait_failed(self, queues: list[str], exc: BrokerUnavailable) -> None:
        """The idle wait on a cluster failed: set aside the queues whose node does not answer
        and look at every queue at once (a wake may have been lost). If every node answers,
        it was something else: the worker reconnects, as on one Redis."""
        down = 0
        for queue in queues:
            try:
                self.broker.check_queue_node(queue)
            except BrokerUnavailable as reason:
                self._set_aside(queue, reason)
                down += 1
        if not down:
            raise exc
        for clock in self.clocks.values():
            clock.next_check = 0.0

    def look_again(self) -> None:
        """After an outage: look at every queue at once, and join the idle sets again (a
        restarted Redis may have lost them)."""
        self._idle_in.clear()
        for clock in self.clocks.values():
            clock.next_check = 0.0

    # --- waiting -------------------------------------------------------------------------------

    def _wait_idle(self) -> None:
        now = time.monotonic()
        queues: list[str] = self.queues
        clocks: Iterable[QueueClock] = self.clocks.values()
        if self.health.aside:  # wait on the others only, and wake in time to check those again
            queues = self.health.usable()
            clocks = [self.clocks[queue] for queue in queues]
            if not queues:  # every queue set aside: "waiting for Redis" (queue_health.py)
                self.sleep_until(self.health.next_retry())
                return
        due = min(c.next_check for c in clocks) - now  # a task falls due then
        if self.health.aside:
            due = min(due, self.health.next_retry() - now)
        sweep = min(c.last_claim + self.sweep_interval for c in clocks) - now
        if due <= REDIS_TIMEOUT_GRAIN:
            # Redis fires blocking timeouts on its 10 Hz timer, up to 100 ms late: wait out the
            # last stretch before a due time here, to the millisecond. (Another idle worker, if
            # any, takes work pushed meanwhile; if none, the claim at the due time takes it.)
            self.sleep_until(now + max(0.0, due))
            return
        timeout = min(self.broker.max_block, max(0.001, sweep), due - REDIS_TIMEOUT_GRAIN)
        self.observer.status()
        register = [queue for queue in queues if queue not in self._idle_in]
        try:
            wake = self.broker.wait_for_work(
                queues, self.worker_id, timeout, handoffs_lease_ms=self.lease_ms, register=register
            )
        except BrokerUnavailable as exc:
            if not self.on_cluster:
                raise
            self._wait_failed(queues, exc)
            return
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
        self.local.append(claim)
        self.metrics.handoffs.labels(queue).inc()
        self._leave_other_idle_sets()
        if self.usually_brief(claim):
            return
        for name, clock in self.clocks.items():
            if clock.held_due_ms:
                self.broker.rearm(name, clock.held_due_ms)
                clock.held_due_ms = 0

    def _on_wake(self, wake: Wake) -> None:
        assert wake.queue is not None
        clock = self.clocks[wake.queue]
        due_at = clock.redis.local_time(wake.score_ms)
        if due_at > time.monotonic() + 0.002:
            # A future due time: wait for it ourselves rather than claim now.
            clock.next_check = min(clock.next_check, due_at)
            clock.held_due_ms = int(wake.score_ms)
            return
        self.local.extend(self._claim(wake.queue, woken=True))

    # --- leaving -------------------------------------------------------------------------------

    def _leave_other_idle_sets(self) -> None:
        """A worker on several queues, busy on one, leaves the idle sets of the others: a task
        handed to it there would wait for this one while another worker may be idle. What was
        handed to it meanwhile is leased to it already: it runs that too. (One round trip, only
        for a worker on several queues that was waiting on them.)"""
        if self._idle_in:
            self.local.extend(self._leave(sorted(self._idle_in)))

    def _leave(self, queues: list[str]) -> list[Claim]:
        """Leave these queues' idle sets; returns the tasks handed to this worker meanwhile
        (leased to it). If Redis fails, the worker stays in them and nothing is returned: it
        tries again next time, and a task handed to it runs after its lease at worst."""
        try:
            handed = self.broker.leave(queues, self.worker_id, self.lease_ms)
        except BrokerError as exc:
            log.warning("could not leave the idle sets of %s: %s", ", ".join(queues), exc)
            return []
        self._idle_in.difference_update(queues)
        return handed

    def give_back(self, claim: Claim, *, interrupted: bool = False) -> bool:
        """Release one leased task to its queue at once; False if the lease was not ours. A
        task given back unstarted on a clean stop is routine (INFO); one interrupted is not."""
        try:
            released = self.broker.release(claim.queue, claim.id, claim.token)
        except BrokerError as exc:
            log.error("task %s: could not hand back (%s); it runs again after its lease", claim.id, exc)
            released = False
        level = logging.WARNING if interrupted or not released else logging.INFO
        log.log(level, "task %s handed back to queue %s%s", claim.id, claim.queue, "" if released else " (lease lost)")
        return released

    def give_back_unstarted(self) -> None:
        """Give back every task claimed but not started (the worker is stopping)."""
        while self.local:
            self.give_back(self.local.popleft())

    def leave(self) -> None:
        """Stopping: leave every idle set, giving back what was handed to this worker since
        (even when it thinks it is in none: Redis may have kept it across a lost connection),
        and pass on the due times it waited for, so an idle worker takes them over."""
        # (not the queues set aside: their node does not answer, and each try would take the
        # cluster's retry window; a task handed there meanwhile runs again after its lease)
        for claim in self._leave(self.health.usable()):
            self.give_back(claim)
        for queue, clock in self.clocks.items():
            if clock.held_due_ms:
                try:
                    self.broker.rearm(queue, clock.held_due_ms)
                except BrokerError as exc:
                    log.warning("could not pass on the next due time of queue %s: %s", queue, exc)
