"""The Client: registers tasks with @app.task and runs a worker with app.start()."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, overload

from .broker import RedisBroker
from .errors import BadArguments, ConfigError, DuplicateTaskError, Retry
from .keys import check_queue_name
from .schedules import ScheduleSpec, check_zone_applies, every_ms
from .task import Task, TaskDefinition, attach

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "default"
EXIT_CONFIG = 78  # EX_CONFIG, as the `minicelery worker` command


class Client:
    """A minicelery application: a registry of tasks bound to one broker.

    >>> app = Client(RedisBroker(JSONTransport()))
    >>> @app.task
    ... def hello(thing): ...
    """

    # Every Client made in this process, so a worker can find the tasks its modules registered.
    instances: ClassVar[list[Client]] = []
    # `raise app.Retry(delay=5)` inside a task runs it again later (see errors.Retry).
    Retry: ClassVar[type[Retry]] = Retry

    def __init__(self, broker: RedisBroker, *, default_queue: str = DEFAULT_QUEUE) -> None:
        self.broker = broker
        self.default_queue = check_queue_name(default_queue)
        self.tasks: dict[str, TaskDefinition] = {}
        Client.instances.append(self)

    @overload
    def task(self, fn: Callable[..., Any], /) -> TaskDefinition: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        time_limit: float | None = None,
        store_result: bool | None = None,
    ) -> Callable[[Callable[..., Any]], TaskDefinition]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        time_limit: float | None = None,
        store_result: bool | None = None,
    ) -> TaskDefinition | Callable[[Callable[..., Any]], TaskDefinition]:
        """Register a function as a task, as `@app.task` or `@app.task(name=..., queue=...)`.

        The task's name is the function's name unless `name=` is given; two different
        functions under one name raise DuplicateTaskError here, at import time.

        `retries=N` runs a failing task up to N more times, when its exception is one of
        `retry_on`: after `retry_backoff` seconds, doubling each time up to
        `retry_backoff_max`, each delay jittered to 50-100% of itself unless
        `retry_jitter=False`. A retry waits in Redis as a scheduled task, not in a worker.

        `store_result=False` makes a fire-and-forget task: what it returns is not kept (its
        children still get it), its state is, and `.result()` raises ResultNotKept once it
        succeeded; an error is always kept, as its dead letter. None (the default) follows the
        worker's `store_results` setting.
        """
        if retries < 0:
            raise ValueError("retries must not be negative")
        if not (
            isinstance(retry_on, tuple) and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on)
        ):
            raise ValueError("retry_on must be a tuple of exception classes")
        if retry_backoff < 0 or retry_backoff_max < retry_backoff:
            raise ValueError("retry_backoff must be >= 0 and retry_backoff_max >= retry_backoff")
        if time_limit is not None and time_limit <= 0:
            raise ValueError("time_limit must be positive (seconds)")
        if store_result is not None and not isinstance(store_result, bool):
            raise ValueError("store_result must be True, False or None (the worker's store_results)")

        def register(function: Callable[..., Any]) -> TaskDefinition:
            task_name = name or function.__name__
            existing = self.tasks.get(task_name)
            if existing is not None and not _same_function(existing.fn, function):
                raise DuplicateTaskError(
                    f"task name {task_name!r} is already registered by "
                    f"{existing.fn.__module__}.{existing.fn.__qualname__}; pass name= to tell them apart"
                )
            definition = TaskDefinition(
                app=self,
                fn=function,
                name=task_name,
                queue=check_queue_name(queue or self.default_queue),
                retries=retries,
                time_limit=time_limit,
                retry_on=retry_on,
                retry_backoff=retry_backoff,
                retry_backoff_max=retry_backoff_max,
                retry_jitter=retry_jitter,
                store_result=store_result,
            )
            self.tasks[task_name] = definition
            return definition

        return register(fn) if fn is not None else register

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: float | dt.timedelta | None = None,
        tz: str = "UTC",
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        overlap: bool = False,
        catch_up: str = "one",
        **task_options: Any,
    ) -> Callable[[Callable[..., Any]], TaskDefinition]:
        """Register a task that also runs by itself: `@app.periodic(cron="0 3 * * *",
        tz="Europe/Berlin")` or `@app.periodic(every=30)` (seconds or a timedelta).

        Each slot runs once, on whichever worker of the task's queue is free (no scheduler
        process): the schedule lives in Redis, declared there by every worker that imports
        it. `args`/`kwargs` are the call's arguments; the other options are `@app.task`'s
        (name, queue, retries, time_limit, ...). `overlap=True` lets a slot start while the
        previous run still runs; `catch_up` says what runs for slots missed while no worker
        was up: "one" run (the default), "all" of them, or "skip" them. The schedule's name is
        the task's. The result is a task like any other: it can be called and started by hand.
        """
        every_in_ms = None if every is None else every_ms(every)
        # Checked here, at import time, before the task is registered.
        check_zone_applies(every, tz)
        ScheduleSpec("check", "check", self.default_queue, cron, every_in_ms, tz, overlap=overlap, catch_up=catch_up)

        def register(function: Callable[..., Any]) -> TaskDefinition:
            from .runner import check_arguments

            definition = self.task(**task_options)(function)
            try:  # every slot would be dead-lettered as BadArguments: refuse it at import instead
                check_arguments(definition, list(args), dict(kwargs or {}))
            except BadArguments as exc:
                del self.tasks[definition.name]
                raise ValueError(f"@app.periodic: {exc}") from None
            spec = ScheduleSpec(
                name=definition.name,
                task=definition.name,
                queue=definition.queue,
                cron=cron,
                every_ms=every_in_ms,
                tz=tz,
                args=list(args),
                kwargs=dict(kwargs or {}),
                overlap=overlap,
                catch_up=catch_up,
                time_limit=definition.time_limit,
                retries=definition.retries,
            )
            definition = dataclasses.replace(definition, schedule=spec)
            self.tasks[definition.name] = definition
            return definition

        return register

    def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        delay: float | None = None,
        at: dt.datetime | None = None,
        key: str | None = None,
    ) -> Task:
        """Send a task by name, without importing its function (as `minicelery enqueue` does)."""
        definition = self.tasks.get(name) or TaskDefinition(
            self, _by_name_only, name, check_queue_name(queue or self.default_queue)
        )
        if queue is not None and definition.queue != queue:
            definition = dataclasses.replace(definition, queue=check_queue_name(queue))
        handle = Task(definition, tuple(args), dict(kwargs or {}))
        if delay is not None:
            return handle.wait(delay)
        if at is not None:
            return handle.start_at(at)
        return handle.start(key=key)

    def start_many(self, handles: Sequence[Task]) -> list[Task]:
        """Send many tasks at once: one round trip per queue for tasks without parents."""
        by_queue: dict[str, list[Task]] = {}
        for handle in handles:
            if handle.sent or handle.has_parents:
                handle.start()
            else:
                by_queue.setdefault(handle.queue, []).append(handle)
        for queue, batch in by_queue.items():
            payloads = [(h.id, self.broker.transport.dumps_message(h.message)) for h in batch]
            self.broker.enqueue_many(queue, payloads)
            for handle in batch:
                handle.mark_sent()
        return list(handles)

    def handle(self, task_id: str, *, queue: str | None = None, name: str = "?") -> Task:
        """A handle to a task already sent, by id (for `.result()` and `.state`).

        Without `queue`, the task is looked for on the queue of task `name` (if registered),
        the default queue, then the queues of every registered task: a read per queue until
        one holds it (as `minicelery result ID` searches the configured queues). Found
        nowhere, the handle is on the default queue, and `.result()` names it."""
        if queue is None:
            queue = self._queue_holding(task_id, name)
        return attach(self, task_id, queue, name)

    def _queue_holding(self, task_id: str, name: str) -> str:
        first = [self.tasks[name].queue] if name in self.tasks else []
        candidates = dict.fromkeys([*first, self.default_queue, *(d.queue for d in self.tasks.values())])
        for candidate in candidates:
            if self.broker.outcome(candidate, task_id)[0] is not None:
                return candidate
        return self.default_queue

    def start(self, queues: Sequence[str] | None = None, **worker_settings: Any) -> None:
        """Run a worker in this process until SIGTERM or SIGINT.

        `queues` defaults to the settings' worker.queues; other keyword arguments override
        worker settings (e.g. lease_seconds=10). A bad setting ends the process with exit 78
        and one line per problem on stderr.
        """
        from .logs import configure_logging
        from .settings import load_settings
        from .worker import Worker

        worker_overrides: dict[str, Any] = dict(worker_settings)
        if queues is not None:
            worker_overrides["queues"] = list(queues)
        try:
            settings = load_settings(worker=worker_overrides)
            # The broker was made before these overrides: the ones it uses go to it too.
            self.broker.configure(
                result_ttl=settings.worker.result_ttl if "result_ttl" in worker_settings else None,
                max_block=settings.worker.idle_block_max if "idle_block_max" in worker_settings else None,
                dead_letter_ttl=settings.worker.dead_letter_ttl if "dead_letter_ttl" in worker_settings else None,
            )
            if not logging.getLogger().handlers:
                configure_logging(settings.logging.level, settings.logging.format)
            Worker(self, settings).run()
        except ConfigError as exc:
            # app.start() is the script's main loop, so end it as `minicelery worker` does: the
            # problem in one line each and exit 78 (EX_CONFIG, which systemd does not restart),
            # not a traceback.
            for line in str(exc).splitlines():
                print(f"minicelery: {line}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG) from None


def _by_name_only(*args: Any, **kwargs: Any) -> Any:
    raise TypeError("this task was sent by name; its function lives in the worker")


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same function imported twice (e.g. as __main__ and by name) is not a duplicate."""
    return a is b or (a.__qualname__ == b.__qualname__ and a.__code__.co_filename == b.__code__.co_filename)
