"""minicelery as in minicelery_peer, with results off like every peer here: the worker's
`store_results = false` (set here, in the benchmark process, and inherited by the workers it
starts), so a task keeps no result, only its state until result_ttl (see README)."""

import os

os.environ["MINICELERY_WORKER__STORE_RESULTS"] = "false"

from minicelery_peer import WORKER, app, dag, enqueue, schedule, send_stamp

__all__ = ["WORKER", "app", "dag", "enqueue", "schedule", "send_stamp"]
