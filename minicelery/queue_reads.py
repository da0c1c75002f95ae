"""Read-only views of a queue for the CLI, `inspect`, metrics and `.result()`: plain reads
in few round trips, no script (so they work on a replica's data too). Mixed into
RedisBroker, which owns the connection."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions as redis_errors
from redis import Redis

from .errors import BrokerUnavailable, MiniceleryError
from .keys import ROOT, queue_keys
from .redis_wire import text as _text
from .redis_wire import translate_errors
from .transport import JSONTransport

# `inspect` looks for orphans among this many of the oldest waiting tasks.
ORPHANS_EXAMINED = 1000

Read = TypeVar("Read", bound=Callable[..., Any])


def follows_moves(read: Read) -> Read:
    """On a Redis Cluster, a read that met MOVED (its queue's slot has a new owner; the slot
    map is now marked stale, see redis_wire.SLOT_MAPS) is made once more, on the new owner."""

    @functools.wraps(read)
    def again_if_moved(*args: Any, **kwargs: Any) -> Any:
        try:
            return read(*args, **kwargs)
        except BrokerUnavailable as exc:
            if not isinstance(exc.__cause__, redis_errors.MovedError):
                raise
            return read(*args, **kwargs)

    return again_if_moved  # type: ignore[return-value]


def stored_payload(stored: bytes | str | None) -> bytes | None:
    """A payload as the payload hash holds it, without the time it was stored in front (base
    36 digits before the JSON's '[' or '{': see store_payload in scripts/_common.lua); one
    stored before that prefix existed is returned as it is."""
    if stored is None:
        return None
    if isinstance(stored, str):
        stored = stored.encode()
    start = next((at for at, byte in enumerate(stored) if byte in b"[{"), 0)
    return stored[start:]


class QueueReads:
    """The reads; RedisBroker provides the client and the transport."""

    redis: redis.Redis
    transport: JSONTransport

    def _client_of(self, queue: str) -> Redis:
        """The client to read `queue` with: on a cluster, one of its node (RedisBroker)."""
        return self.redis

    @follows_moves
    def outcome(self, queue: str, task_id: str) -> tuple[str | None, bytes | None]:
        """The task's state and (once finished) its result envelope, read atomically."""
        client = self._client_of(queue)
        keys = queue_keys(queue)
        with translate_errors("read result"):
            pipe = client.pipeline(transaction=True)
            pipe.hget(keys.info, f"{task_id}:s")
            pipe.hget(keys.result, task_id)
            pipe.hexists(keys.payload, task_id)
            pipe.zscore(keys.scheduled, task_id)
            state, envelope, stored, scheduled = pipe.execute()
        if state is None and stored:  # sent straight to ready or the schedule: see state_of in _common.lua
            return ("ready" if scheduled is None else "scheduled"), None
        if state is None and envelope is not None:  # a success whose result is kept: the same
            return "succeeded", envelope
        return (None if state is None else _text(state)), envelope

    @follows_moves
    def cancelled_by(self, queue: str, task_id: str) -> str:
        """Who cancelled the task, as cancel.lua recorded it ("api", "cli"; "?" if unknown)."""
        client = self._client_of(queue)
        with translate_errors("read who cancelled"):
            by = client.hget(queue_keys(queue).info, f"{task_id}:x")
        return "?" if by is None else _text(by)

    @follows_moves
    def descendants(self, queue: str, task_id: str) -> list[str]:
        """The task's children, theirs, and so on, parents before children (one round trip
        per generation)."""
        client = self._client_of(queue)
        info = queue_keys(queue).info
        found: list[str] = []
        seen = {task_id}
        generation = [task_id]
        with translate_errors("read children"):
            while generation:
                lists = client.hmget(info, [f"{i}:c" for i in generation])
                generation = [c for csv in lists if csv for c in _text(csv).split(",") if c not in seen]
                seen.update(generation)
                found += generation
        return found

    @follows_moves
    def dead_letters(self, queue: str) -> list[str]:
        """Ids of every task in the queue's dead-letter set, oldest first."""
        client = self._client_of(queue)
        with translate_errors("dead letters"):
            return [_text(i) for i in client.zrange(queue_keys(queue).dead, 0, -1)]

    @follows_moves
    def schedule_spec(self, queue: str, name: str) -> bytes | None:
        client = self._client_of(queue)
        with translate_errors("read schedule"):
            return client.hget(queue_keys(queue).schedules, name)  # type: ignore[return-value]

    def schedule_queues(self) -> list[str]:
        """Every queue that has schedules stored (a SCAN: for the CLI, not the hot path)."""
        pattern = f"{ROOT}:{{*}}:schedules"
        with translate_errors("schedule_queues"):
            keys = [_text(key) for key in self.redis.scan_iter(match=pattern, count=1000)]
        return sorted(key[len(ROOT) + 2 : -len("}:schedules")] for key in keys)

    @follows_moves
    def schedule_table(self, queue: str) -> tuple[int, dict[str, bytes], dict[str, bytes]]:
        """(Redis now ms, name -> spec JSON, state field -> value) of a queue's schedules, plus
        the state of each last-started occurrence as state field "<name>:o"."""
        client = self._client_of(queue)
        keys = queue_keys(queue)
        with translate_errors("read schedules"):
            pipe = client.pipeline(transaction=True)
            pipe.time()
            pipe.hgetall(keys.schedules)
            pipe.hgetall(keys.schedule_state)
            (seconds, micros), specs, state = pipe.execute()
            specs = {_text(k): v for k, v in specs.items()}
            state = {_text(k): v for k, v in state.items()}
            current = {name: _text(state[f"{name}:c"]) for name in specs if f"{name}:c" in state}
            for name, task_id in current.items():  # (few schedules: a read each)
                outcome = self.outcome(queue, task_id)[0]
                state[f"{name}:o"] = outcome.encode() if outcome else b"expired"
        return int(seconds) * 1000 + int(micros) // 1000, specs, state

    # --- inspection ----------------------------------------------------------------------------

    @follows_moves
    def depths(self, queue: str) -> dict[str, int]:
        """How many tasks are in each state, in one round trip (cheap enough for every scrape)."""
        client = self._client_of(queue)
        keys = queue_keys(queue)
        with translate_errors("queue depths"):
            pipe = client.pipeline(transaction=False)
            pipe.llen(keys.ready)
            pipe.zcard(keys.scheduled)
            pipe.zcard(keys.waiting)
            pipe.zcard(keys.running)
            pipe.zcard(keys.dead)
            pipe.zcard(keys.expiry)
            pipe.hget(keys.info, "#cancelled")
            ready, scheduled, waiting, running, dead, finished, cancelled = pipe.execute()
        return {
            "ready": ready,
            "scheduled": scheduled,
            "waiting": waiting,
            "running": running,
            "dead": dead,
            "finished": finished,
            "cancelled": int(cancelled or 0),  # (included in finished, kept until their result TTL)
        }

    @follows_moves
    def queue_report(self, queue: str, lease_seconds: float, dead_shown: int = 20) -> dict[str, Any]:
        """Depths, next due time, live workers and the latest dead letters of one queue."""
        client = self._client_of(queue)
        keys = queue_keys(queue)
        depths = self.depths(queue)
        with translate_errors("inspect"):
            server_time = client.time()
            now_ms = server_time[0] * 1000 + server_time[1] // 1000
            first = client.zrange(keys.scheduled, 0, 0, withscores=True)
            workers = client.zrangebyscore(keys.workers, now_ms - 2 * lease_seconds * 1000, "+inf")
            dead_ids = [_text(i) for i in client.zrevrange(keys.dead, 0, dead_shown - 1)]
            dead = []
            for task_id in dead_ids:
                payload, envelope = (
                    client.hget(keys.payload, task_id),
                    client.hget(keys.result, task_id),
                )
                attempts = client.hget(keys.info, f"{task_id}:a")
                died = client.zscore(keys.dead, task_id)
                dead.append(self._dead_summary(task_id, payload, envelope, attempts, died))
        next_due = None
        if first:
            next_due = dt.datetime.fromtimestamp(float(first[0][1]) / 1000, dt.UTC).isoformat()
        return {
            "depths": depths,
            "next_due": next_due,
            "workers": [_text(w) for w in workers],
            "dead_letters": dead,
        }

    def _dead_summary(self, task_id: str, payload: Any, envelope: Any, attempts: Any, died: Any) -> dict[str, Any]:
        name, error, traceback = "?", "?", ""
        with contextlib.suppress(MiniceleryError):
            name = self.transport.loads_message(stored_payload(payload)).name
        if envelope is not None:
            with contextlib.suppress(MiniceleryError):
                _ok, exc = self.transport.loads_outcome(envelope)
                error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                traceback = json.loads(envelope)["error"].get("traceback") or ""
        return {
            "id": task_id,
            "name": name,
            "attempts": int(attempts or 0),
            "error": error,
            "failed_at": dt.datetime.fromtimestamp(float(died) / 1000, dt.UTC).isoformat() if died else None,
            "traceback": traceback,
        }

    @follows_moves
    def orphans(self, queue: str, shown: int = 10, examined: int = ORPHANS_EXAMINED) -> dict[str, Any]:
        """Waiting tasks none of whose unfinished parents was ever started: what the orphan
        sweep dead-letters once they have waited orphan_ttl. Counted among the `examined`
        oldest waiting tasks; the oldest `shown` are listed with their name, the parents never
        started and the seconds waited (since registered, or since a parent was last seen in
        flight). Read-only, a few round trips."""
        client = self._client_of(queue)
        keys = queue_keys(queue)
        with translate_errors("inspect orphans"):
            pipe = client.pipeline(transaction=False)
            pipe.time()
            pipe.zcard(keys.waiting)
            pipe.zrange(keys.waiting, 0, examined - 1, withscores=True)
            (seconds, micros), waiting, oldest = pipe.execute()
            ids = [_text(task_id) for task_id, _since in oldest]
            parents = (
                [_text(p).split(",") if p else [] for p in client.hmget(keys.info, [f"{i}:P" for i in ids])]
                if ids
                else []
            )
            pipe = client.pipeline(transaction=False)
            for task_id, its_parents in zip(ids, parents, strict=True):
                for parent in its_parents:
                    pipe.hexists(keys.inputs, f"{task_id}|{parent}")
                    pipe.hexists(keys.info, f"{parent}:s")
                    pipe.hexists(keys.payload, parent)  # (a pending task may store no state)
            facts = iter(pipe.execute())
            found = []
            for (task_id, since), its_parents in zip(oldest, parents, strict=True):
                unsent = _never_started({p: (next(facts), next(facts) | next(facts)) for p in its_parents})
                if unsent:
                    found.append((_text(task_id), since, unsent))
            payloads = client.hmget(keys.payload, [task_id for task_id, _, _ in found[:shown]]) if found else []
        now_ms = seconds * 1000 + micros // 1000
        listed = []
        for (task_id, since, unsent), payload in zip(found, payloads, strict=False):
            name = "?"
            with contextlib.suppress(MiniceleryError):
                name = self.transport.loads_message(stored_payload(payload)).name
            waited = max(0.0, (now_ms - since) / 1000)
            listed.append({"id": task_id, "name": name, "waited_seconds": waited, "never_started": unsent})
        return {"count": len(found), "examined": len(ids), "waiting": waiting, "oldest": listed}


def _never_started(parents: dict[str, tuple[bool, bool]]) -> list[str]:
    """The parents a waiting task still waits for, if none of them was ever sent; else [].
    `parents`: parent id -> (it gave the task its result, it has a state). The same test as
    never_started in scripts/orphans.lua."""
    unfinished = {parent: sent for parent, (gave_result, sent) in parents.items() if not gave_result}
    if any(unfinished.values()):
        return []
    return list(unfinished)
