"""What a worker knows about when to look at a queue again without being woken."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..records import Idle

# Redis checks blocking-command timeouts on its `hz` timer (10 Hz by default), so a timeout
# can fire up to this late; the worker does not leave a due time to a Redis timeout.
REDIS_TIMEOUT_GRAIN = 0.1
# How fast the best estimate of the Redis clock's lead is let go of (ms per second), so it
# follows two hosts' clocks drifting apart (NTP keeps that under 0.5 ms/s); see RedisClock.
CLOCK_DRIFT_MS_PER_S = 0.5


@dataclass
class RedisClock:
    """The Redis clock read on this worker's monotonic clock, to turn a due time (Redis ms)
    into the moment to claim it.

    Each reply that says Redis's time gives `now_ms - local time when read`: the true lead of
    the Redis clock, less the reply's time in transit and less up to 1 ms cut off by the
    whole milliseconds. Both only lower it, so the highest value seen is the best estimate:
    taken from a single reply, a due time would be claimed late by the transit (up to several
    ms on a loaded host) plus half a millisecond on average. The best is lowered slowly with
    time (CLOCK_DRIFT_MS_PER_S) so that clocks drifting apart cannot make it claim early."""

    lead_ms: float = -math.inf  # Redis ms minus monotonic ms, best estimate
    seen_at: float = 0.0  # monotonic s of the last estimate

    def observe(self, redis_now_ms: int) -> None:
        local = time.monotonic()
        decayed = self.lead_ms - (local - self.seen_at) * CLOCK_DRIFT_MS_PER_S
        self.lead_ms, self.seen_at = max(decayed, redis_now_ms - local * 1000), local

    def restart(self, redis_now_ms: int) -> None:
        """Forget the best estimate and start again from this reply: the Redis clock stepped
        back (NTP, a VM resumed, a failover to a host whose clock is behind)."""
        self.lead_ms = -math.inf
        self.observe(redis_now_ms)

    def local_time(self, redis_ms: float) -> float:
        """The monotonic time (s) at which the Redis clock reads `redis_ms`."""
        return (redis_ms - self.lead_ms) / 1000


@dataclass
class QueueClock:
    """What this worker knows about when to look at a queue again without being woken."""

    redis: RedisClock  # shared by a worker's queues (one Redis)
    next_check: float = 0.0  # monotonic; 0 = claim at once (start-up)
    held_due_ms: int = 0  # a future due time (Redis clock) this worker waits for, else 0
    last_claim: float = 0.0  # monotonic

    def claimed(self, now_ms: int) -> None:
        """A claim got tasks: the claim script handed on the due time this worker waited for."""
        self.held_due_ms, self.next_check = 0, math.inf
        self.redis.observe(now_ms)

    def learn(self, idle: Idle) -> None:
        """A claim found nothing: note when something falls due (to wait for it ourselves)."""
        self.redis.observe(idle.now_ms)
        if idle.next_due_in_ms is None:
            self.next_check, self.held_due_ms = math.inf, 0
        else:
            self.held_due_ms = idle.now_ms + idle.next_due_in_ms
            self.next_check = self.redis.local_time(self.held_due_ms)
            if idle.next_due_in_ms > 0 and self.next_check <= time.monotonic():
                # Redis says "not yet", the estimate says "past": the estimate is ahead of a
                # Redis clock that stepped back. Kept, it would claim again at once, and again,
                # until the due time (one claim per round trip).
                self.redis.restart(idle.now_ms)
                self.next_check = self.redis.local_time(self.held_due_ms)
