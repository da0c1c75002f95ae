"""What a worker knows about when to look at a queue again without being woken."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..records import Idle

# Redis checks blocking-command timeouts on its `hz` timer (10 Hz by default), so a timeout
# can fire up to this late; the worker does not leave a due time to a Redis timeout.
REDIS_TIMEOUT_GRAIN = 0.1


@dataclass
class QueueClock:
    """What this worker knows about when to look at a queue again without being woken."""

    next_check: float = 0.0  # monotonic; 0 = claim at once (start-up)
    held_due_ms: int = 0  # a future due time (Redis clock) this worker waits for, else 0
    offset_ms: float = 0.0  # Redis clock minus local clock, from the last claim reply
    last_claim: float = 0.0  # monotonic

    def claimed(self, now_ms: int) -> None:
        """A claim got tasks: the claim script handed on the due time this worker waited for."""
        self.held_due_ms, self.next_check = 0, math.inf
        self.offset_ms = now_ms - time.time() * 1000

    def learn(self, idle: Idle) -> None:
        """A claim found nothing: note when something falls due (to wait for it ourselves)."""
        self.offset_ms = idle.now_ms - time.time() * 1000
        if idle.next_due_in_ms is None:
            self.next_check, self.held_due_ms = math.inf, 0
        else:
            self.next_check = time.monotonic() + idle.next_due_in_ms / 1000
            self.held_due_ms = idle.now_ms + idle.next_due_in_ms
