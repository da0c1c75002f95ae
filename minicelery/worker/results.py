"""Results run but not stored yet: held back briefly so a busy worker stores a batch of them in
one round trip with its next claim, and stored with retries while Redis is away.

The heartbeat thread stores held results too (store_held) when the task after them runs long;
one lock guards the held list between the two threads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from ..broker import RedisBroker
from ..errors import BrokerError
from ..interrupts import StopSignals
from ..records import Claim, FinishItem, Idle, NextClaim, Outcome, Running
from .observe import Observer

log = logging.getLogger("minicelery.worker")

# Longest a finished result may be held back to be stored together with the next ones.
FINISH_HOLD_MAX = 0.005


class ResultBuffer:
    def __init__(
        self,
        broker: RedisBroker,
        observer: Observer,
        signals: StopSignals,
        sleep: Callable[[float], None],
        *,
        batch: int,
        retry_max_delay: float,
    ) -> None:
        self.broker = broker
        self.observer = observer
        self.signals = signals
        self.sleep = sleep  # backs off, waking for a stop signal
        self.batch = batch
        self.retry_max_delay = retry_max_delay
        self.held: list[tuple[Claim, Outcome]] = []
        self._since = 0.0  # when the oldest held result was added (monotonic)
        self._lock = threading.Lock()
        self._typical_run: dict[str, float] = {}  # task name -> smoothed run time (s)

    def add(self, claim: Claim, outcome: Outcome) -> None:
        """A run ended: hold its outcome to be stored (and learn how long such a task runs).
        Called after the worker cleared its running task, under the lock, so the heartbeat's
        store_held never takes this result while it still looks at the task that produced it."""
        typical = self._typical_run.get(outcome.name, outcome.duration)
        self._typical_run[outcome.name] = 0.8 * typical + 0.2 * outcome.duration
        with self._lock:
            if not self.held:
                self._since = time.monotonic()
            self.held.append((claim, outcome))

    def usually_brief(self, name: str) -> bool:
        """True if this task's runs so far took under FINISH_HOLD_MAX (smoothed)."""
        return self._typical_run.get(name, math.inf) < FINISH_HOLD_MAX

    def young(self) -> bool:
        """The held batch may grow: not full, and its oldest result held under FINISH_HOLD_MAX."""
        return len(self.held) < self.batch and time.monotonic() - self._since < FINISH_HOLD_MAX

    def last_queue(self) -> str | None:
        """The queue of the newest held result (where the next claim goes), or None."""
        held = self.held
        return held[-1][0].queue if held else None

    def store_held(self, running_task: Callable[[], Running | None]) -> None:
        """Called by the heartbeat thread: store the results held back for a batch while the
        task after them, one that usually runs briefly, has run longer than FINISH_HOLD_MAX.
        They would otherwise wait for it to end, however long it runs. If Redis fails, they
        stay held, and the main thread stores them (retrying) once the task ends."""
        with self._lock:
            # Under the lock: the worker adds the running task's own result under it, after it
            # cleared its running task, so that result is never taken here.
            running = running_task()
            if running is None or not self.held or time.monotonic() - running.started < FINISH_HOLD_MAX:
                return
            held, self.held = self.held, []
        try:
            statuses, _ = self.broker.finish_many([FinishItem.of(c, o) for c, o in held])
        except BrokerError as exc:
            log.warning("could not store %d held results yet: %s", len(held), exc)
            with self._lock:
                self.held[:0] = held
            return
        self.observer.count_all(held, statuses)

    def take(self) -> list[tuple[Claim, Outcome]]:
        """Everything held, now the caller's to store (see flush)."""
        with self._lock:
            held, self.held = self.held, []
        return held

    def store_now(self, claim: Claim, outcome: Outcome) -> None:
        """Store everything held and this run's outcome in one call, once, and count them all
        (the worker is about to exit: see Worker.end_stuck_task)."""
        finished = [*self.take(), (claim, outcome)]
        statuses, _ = self.broker.finish_many([FinishItem.of(c, o) for c, o in finished])
        self.observer.count_all(finished, statuses)

    def flush(self, next_claim: NextClaim | None = None) -> tuple[bool, list[Claim] | Idle | None]:
        """Store every held outcome (retrying while Redis is away) and, with `next_claim`, claim
        the next batch in the same round trip. Returns (stored anything, the claim's reply);
        the claim is dropped if Redis failed on the way (claim nothing new coming back from an
        outage)."""
        finished = self.take()
        if not finished:
            return False, None
        items = [FinishItem.of(c, o) for c, o in finished]
        delay = 0.1
        while True:
            try:
                statuses, following = self.broker.finish_many(items, next_claim)
                break
            except BrokerError as exc:
                if self.signals.immediate:
                    log.error("%d results not stored (%s); their leases expire and they run again", len(items), exc)
                    return False, None
                log.warning("cannot store the result yet (%d tasks): %s; retrying in %.1f s", len(items), exc, delay)
                self.observer.status("waiting for Redis to store a result")
                self.sleep(delay)
                delay = min(delay * 2, self.retry_max_delay)
                next_claim = None
        if delay > 0.1:  # sent again: a "late" may be the earlier send's own finish, reply lost
            statuses = self.broker.landed(items, statuses)
        self.observer.count_all(finished, statuses)
        return True, following
