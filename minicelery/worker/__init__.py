"""The worker: one process, one task at a time, blocking on Redis while idle.

A map of the package, each module one job, dependencies one way (loop -> the parts):

  loop.py        Worker: start-up, run() around tick(), shutdown; owns the parts below and is
                 the heartbeat's host
  clock.py       QueueClock: when to look at a queue again without being woken; RedisClock: due times on the local clock
  intake.py      every way a claimed task arrives (claim, claim with a finish, hand-off,
                 idle wait), behind Intake.next(); leaving idle sets and giving tasks back
  results.py     results run but not stored yet: held for a batch, stored with retries, and
                 stored by the heartbeat when the next task runs long
  observe.py     counters, the outcome log line, metrics, systemd STATUS, healthy()
  connection.py  waiting for Redis (start-up, outages) and stop-aware pauses
  upkeep.py      beside the tasks: the orphan sweep, giving back tasks of unknown names
  stuck.py       what is recorded for a task that cannot be stopped, before the worker exits
  heartbeat.py   the one helper thread (leases, watchdog, stop), seeing the worker only
                 through the HeartbeatHost protocol

Running one task (decoding, arguments, time limits, async) is minicelery.runner; the records
passed between these parts are minicelery.records.
"""

from .loop import EXIT_HANDED_BACK, EXIT_OK, Worker
from .observe import PER_TASK_STATUS_EVERY, UNKNOWN_TASK_LABEL
from .stuck import EXIT_TASK_STUCK

__all__ = ["EXIT_HANDED_BACK", "EXIT_OK", "EXIT_TASK_STUCK", "PER_TASK_STATUS_EVERY", "UNKNOWN_TASK_LABEL", "Worker"]
