"""The `minicelery` command (also `python -m minicelery`).

Exit codes:
  0   success
  1   the task failed (enqueue --wait-result, result), no such task, purge declined,
      or an unexpected error; `worker -c N`: its children kept dying before they were ready
  2   bad command-line usage: an unknown option, or ARGS, --kwargs, --delay, --at, --timeout
      that do not parse
  69  Redis is unreachable, or its host name does not resolve (EX_UNAVAILABLE)
  70  `worker`: a task did not stop after its time limit; it was recorded as timed out and the
      worker exited to end it, for its supervisor to restart (EX_SOFTWARE)
  75  not finished yet, ask again later (EX_TEMPFAIL): `result` of an unfinished task, or
      --wait-result / --timeout ran out; `worker`: it stopped before its running task
      finished and handed the task back
  78  bad configuration or a task module that fails to import (EX_CONFIG)
  141 stdout was closed early (e.g. `minicelery inspect | head -1`), as for a tool killed
      by SIGPIPE
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import BrokerUnavailable, ConfigError, MiniceleryError, TaskNotFound
from .settings import CONFIG_ENV, Settings, load_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a tool killed by SIGPIPE

# The worker's flags that set a setting, named in messages about a bad value.
WORKER_FLAGS = {
    "worker.concurrency": "flag -c/--concurrency",
    "worker.queues": "flag -Q/--queues",
    "tasks": "flag -t/--tasks",
    "logging.level": "flag -l/--log-level",
    "logging.format": "flag --log-format",
}

EPILOG = __doc__.split("Exit codes:", 1)[1] if __doc__ else ""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # Long form only: `-c` is the worker's --concurrency, as in `celery worker -c 4`.
    common.add_argument("--config", help=f"TOML settings file (default: ${CONFIG_ENV})")
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="minicelery",
        description="A Redis-backed task queue and worker.",
        epilog="exit codes:" + EPILOG,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog="exit codes:" + EPILOG,
            formatter_class=formatter,
        )

    worker = command("worker", "Run a worker until SIGTERM/SIGINT.")
    worker.add_argument(
        "--concurrency", "-c", type=_concurrency, help='worker processes, or "auto" (overrides worker.concurrency)'
    )
    worker.add_argument("--queues", "-Q", help="comma-separated queues (overrides worker.queues)")
    worker.add_argument("--tasks", "-t", help="comma-separated task modules (overrides tasks)")
    worker.add_argument("--log-level", "-l", help="DEBUG, INFO, WARNING, ERROR")
    worker.add_argument("--log-format", choices=["text", "json"])
    worker.add_argument("--burst", action="store_true", help="exit once no task is ready")
    worker.add_argument("--pool-child", type=int, metavar="FD", help=argparse.SUPPRESS)  # the supervisor's

    command("check-config", "Validate the settings, import the task modules, print the settings (secrets masked).")

    enqueue = command("enqueue", "Send a task by name, with its own queue= and options when tasks are configured.")
    enqueue.add_argument("task", help="task name")
    enqueue.add_argument("args", nargs="?", default="[]", type=_json_list, help="positional arguments as a JSON list")
    enqueue.add_argument("--kwargs", default="{}", type=_json_object, help="keyword arguments as a JSON object")
    enqueue.add_argument("--queue", "-q", help="queue (default: the task's own, else the first of worker.queues)")
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument("--delay", type=_seconds, help="run after this many seconds")
    when.add_argument("--at", type=_iso_time, help="run at this ISO 8601 time (naive = local time)")
    enqueue.add_argument("--key", help="idempotency key: no second task while one with it is pending")
    enqueue.add_argument("--wait-result", action="store_true", help="wait and print the result")
    enqueue.add_argument("--timeout", type=_seconds, help="with --wait-result: give up after seconds (exit 75)")
    enqueue.add_argument(
        "--force",
        action="store_true",
        help="send even if the configured task modules do not register the name or its arguments do not fit",
    )

    inspect = command(
        "inspect",
        "Show queue depths, next due time, live workers, dead letters, and waiting tasks whose parents "
        "were never started (dead-lettered after worker.orphan_ttl).",
    )
    inspect.add_argument("--queue", "-q", action="append", help="queue (repeatable; default: worker.queues)")
    inspect.add_argument("--json", action="store_true", help="print JSON")

    result = command("result", "Print a task's result; exit 75 if it has not finished (within --timeout).")
    result.add_argument("id")
    result.add_argument("--queue", "-q", help="its queue (default: whichever of worker.queues has it)")
    result.add_argument("--timeout", type=_seconds, default=0.0, help="seconds to wait (default: do not wait)")

    cancel = command("cancel", "Cancel tasks not finished yet; exit 0 if each was cancelled or had already finished.")
    cancel.add_argument("ids", nargs="+", metavar="ID", help="task ids")
    cancel.add_argument("--queue", "-q", help="their queue (default: whichever of worker.queues has each)")
    cancel.add_argument("--cascade", action="store_true", help="also cancel their unfinished descendants")

    retry_dead = command("retry-dead", "Put dead letters back in their queue to run again.")
    retry_dead.add_argument("ids", nargs="*", metavar="ID", help="task ids (default: every dead letter)")
    retry_dead.add_argument("--queue", "-q", action="append", help="queue (repeatable; default: worker.queues)")

    purge = command("purge", "Delete every task of a queue (asks first).")
    purge.add_argument("--queue", "-q", action="append")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask")

    schedules = command(
        "schedules",
        "List the periodic schedules (no ACTION), or pause, resume, run (once now, besides the schedule) "
        "or remove (for good: also drop it from the code or config that declares it) the one named.",
    )
    schedules.add_argument(
        "action", nargs="?", choices=["pause", "resume", "run", "remove"], metavar="ACTION",
        help="pause, resume, run or remove (default: list them)",
    )  # fmt: skip
    schedules.add_argument("name", nargs="?", metavar="NAME", help="schedule name (with ACTION)")
    schedules.add_argument(
        "--queue", "-q", action="append", help="queue (repeatable; default: worker.queues and any other with schedules)"
    )
    schedules.add_argument("--json", action="store_true", help="print JSON (the list)")

    health = command("health", "Ask the local worker's /healthz (or /readyz); exit 0 if it answers 200.")
    health.add_argument("--ready", action="store_true", help="ask /readyz: Redis reachable and tasks loaded")
    health.add_argument("--timeout", type=_positive_seconds, default=3.0, help="seconds to wait for the answer")

    demo = command(
        "demo",
        "Run the original README's demo on a private Redis.\nOn SIGINT, SIGTERM or SIGHUP it stops "
        "the producer, the workers and Redis, then exits 128 + the signal (130, 143, 129).",
    )
    demo.add_argument("--workers", type=_positive_int, default=3, help="worker processes (default: 3)")
    return parser


def _positive_int(text: str) -> int:
    """An argparse type: a bad value is a one-line usage error, exit 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _concurrency(text: str) -> int | str:
    """-c N or -c auto. `-c FILE` used to mean --config: say so, rather than 'not a number'."""
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as exc:
        if text.endswith(".toml") or os.path.exists(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of processes: -c is --concurrency; give a config file as --config {text}"
            ) from None
        raise argparse.ArgumentTypeError(f'{exc}, or "auto"') from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = int(_dispatch(args))
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, as Unix tools do. Point stdout at
        # /dev/null so the interpreter's own flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConfigError as exc:
        _print_error(exc)
        return EXIT_CONFIG
    except BrokerUnavailable as exc:
        _print_error(exc)
        return EXIT_UNAVAILABLE
    except MiniceleryError as exc:
        _print_error(exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _print_error(exc: Exception) -> None:
    for line in str(exc).splitlines():  # settings report every problem, one per line
        print(f"minicelery: {line}", file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    if args.config:
        # Task modules (imported by worker, enqueue and check-config) that build RedisBroker()
        # themselves read the same file.
        os.environ[CONFIG_ENV] = args.config
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(workers=args.workers)
    if args.command == "worker":
        return _worker(args)
    settings = load_settings(args.config)
    if args.command == "check-config":
        return _check_config(settings)
    if args.command == "health":
        return _health(settings, "/readyz" if args.ready else "/healthz", args.timeout)
    from .admin import Admin

    admin = Admin(settings)
    if args.command == "enqueue":
        return admin.enqueue(
            args.task,
            args.args,
            args.kwargs,
            queue=args.queue,
            delay=args.delay,
            at=args.at,
            key=args.key,
            wait=args.wait_result,
            timeout=args.timeout,
            force=args.force,
        )
    if args.command == "inspect":
        return admin.inspect(args.queue or settings.worker.queues, as_json=args.json)
    if args.command == "result":
        try:
            return admin.result(args.id, args.queue, args.timeout)
        except TaskNotFound as exc:
            print(f"minicelery: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.command == "cancel":
        return admin.cancel(args.ids, args.queue, cascade=args.cascade)
    if args.command == "retry-dead":
        return admin.retry_dead(args.queue or settings.worker.queues, args.ids)
    if args.command == "schedules":
        if args.action and not args.name:
            print(f"minicelery: schedules {args.action} needs a schedule NAME", file=sys.stderr)
            return 2
        queues = admin.schedule_queues(args.queue)
        if args.action:
            return admin.schedule_action(args.action, args.name, queues)
        return admin.schedules(queues, as_json=args.json)
    if args.command == "purge":
        return admin.purge(args.queue or settings.worker.queues, assume_yes=args.yes)
    raise AssertionError(args.command)


def _check_config(settings: Settings) -> int:
    """Print the effective settings; import the task modules, as a worker would, so a module
    that fails to import fails here too (exit 78)."""
    from .loader import NO_TASKS_HINT, load_task_modules
    from .periodic import declared_specs

    tasks = load_task_modules(settings.tasks) if settings.tasks else {}
    schedules = declared_specs(tasks, settings) if tasks else {}  # an unknown [[schedules]] task: 78
    print(json.dumps(settings.masked(), indent=2))
    if settings.redis.sentinels or settings.redis.cluster:
        _print_members(settings)
    if tasks:
        print(f"tasks: {', '.join(sorted(tasks))}", file=sys.stderr)
    else:
        print(f"no task modules configured (a worker needs them: {NO_TASKS_HINT})", file=sys.stderr)
    for spec in schedules.values():
        print(
            f"schedule {spec.name}: task {spec.task}, {spec.describe()} ({spec.tz}), queue {spec.queue}",
            file=sys.stderr,
        )
    return EXIT_OK


def _print_members(settings: Settings) -> None:
    """What the sentinels or the cluster's nodes report now; unreachable ones are said, not an
    error (the settings may be checked where they cannot be reached)."""
    from .broker import RedisBroker
    from .errors import BrokerError

    broker = RedisBroker.from_settings(settings)
    from .admin import describe_members

    try:
        print(describe_members(broker.members() or {}), file=sys.stderr)
    except ConfigError:
        raise  # (redis.cluster does not match the server: exit 78, as the worker would)
    except BrokerError as exc:
        print(f"{'cluster' if settings.redis.cluster else 'sentinels'}: no primary found now: {exc}", file=sys.stderr)
    finally:
        broker.close()


def _health(settings: Settings, path: str, timeout: float) -> int:
    """For container HEALTHCHECKs: no curl in the image, and the port comes from the config."""
    import urllib.error
    import urllib.request

    if not settings.metrics.enabled:
        print("minicelery: metrics.enabled is false: the worker serves no health endpoint", file=sys.stderr)
        return EXIT_FAILED
    bind = settings.metrics.bind
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bind, bind)  # listening everywhere
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.metrics.port}{path}"
    why = ""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
        with contextlib.suppress(OSError):  # (the detail is a bonus: the status decides)
            lines = exc.read().decode(errors="replace").splitlines()
            if status == 503 and lines[:1] == ["not ok"]:  # our own answer, not another server's page
                why = "".join(f"\n  {line}" for line in lines[1:])
    except OSError as exc:
        refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
        hint = " (no worker listens there: not running, or another metrics.port or metrics.bind?)" if refused else ""
        print(f"minicelery: {url}: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{url}: {status}{why}")  # (a pool's failing /healthz names its silent children)
    return EXIT_OK if status == 200 else EXIT_FAILED


def load_worker_settings(args: argparse.Namespace) -> Settings:
    """The worker's settings: the config file, the environment, then its flags."""
    overrides: dict[str, Any] = {}
    worker: dict[str, Any] = {}
    if args.queues:
        worker["queues"] = [q.strip() for q in args.queues.split(",") if q.strip()]
    if args.concurrency is not None:
        worker["concurrency"] = args.concurrency
    if worker:
        overrides["worker"] = worker
    if args.tasks:
        overrides["tasks"] = [m.strip() for m in args.tasks.split(",") if m.strip()]
    logging_overrides = {k: v for k, v in (("level", args.log_level), ("format", args.log_format)) if v}
    if logging_overrides:
        overrides["logging"] = logging_overrides
    return load_settings(args.config, flag_names=WORKER_FLAGS, **overrides)


def _worker(args: argparse.Namespace) -> int:
    from .logs import configure_logging
    from .worker import Worker

    settings = load_worker_settings(args)
    configure_logging(settings.logging.level, settings.logging.format)
    if args.pool_child is not None:  # one child of a supervisor (below), started fresh
        from .pool_child import run_child

        return run_child(settings, args.pool_child, os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if settings.worker.processes() > 1:
        return _supervise(args, settings)
    if settings.worker.concurrency == "auto":  # (with more, the supervisor's start line says it)
        import logging

        logging.getLogger("minicelery.worker").info('concurrency "auto": 1 usable CPU, so one worker process')
    _no_reload()
    app = build_worker_app(settings)
    return Worker(app, settings).run(burst=args.burst)


def _no_reload() -> None:
    """`systemctl reload` sends SIGHUP, whose default action would kill a single worker mid-task:
    say what to do instead. (With concurrency > 1 it is the supervisor's rolling reload.)"""
    import logging
    import signal

    def on_hup(signum: int, frame: Any) -> None:
        logging.getLogger("minicelery.worker").warning(
            "SIGHUP ignored: reload needs worker.concurrency > 1; restart a single worker to reload it"
        )

    signal.signal(signal.SIGHUP, on_hup)


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    """concurrency > 1: import the task modules here, once (a failure exits 78 before any
    fork), then run the supervisor over that many worker children."""
    from .loader import load_task_modules
    from .pool_metrics import serve_pool_metrics
    from .supervisor import Supervisor

    if args.burst:
        raise ConfigError("invalid setting worker.concurrency: --burst runs one process; use -c 1 with it")
    load_task_modules(settings.tasks)
    flags = {"--config": args.config, "-Q": args.queues, "-t": args.tasks, "-l": args.log_level}
    flags["--log-format"] = args.log_format
    child_argv = [part for flag, value in flags.items() if value for part in (flag, value)]
    # On SIGHUP the supervisor reads its settings again, as a fresh start would.
    supervisor = Supervisor(settings, child_argv, reread=lambda: load_worker_settings(args))
    done = serve_pool_metrics(supervisor)
    try:
        return supervisor.run()
    finally:
        done()


def build_worker_app(settings: Settings) -> Any:
    """A Client on the configured broker holding every task the task modules registered."""
    from .app import Client
    from .broker import RedisBroker
    from .loader import load_task_modules

    tasks = load_task_modules(settings.tasks)
    app = Client(RedisBroker.from_settings(settings), default_queue=settings.worker.queues[0])
    Client.instances.remove(app)
    app.tasks.update(tasks)
    return app


# Argument types: argparse turns their ArgumentTypeError into a usage error (exit 2) naming
# the argument, so a mistyped command line is never blamed on the configuration.


def _json_list(text: str) -> list[Any]:
    value = _json(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"must be a JSON list, e.g. '[1, 2]'; got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    value = _json(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"""must be a JSON object, e.g. '{{"x": 1}}'; got {text!r}""")
    return value


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}); got {text!r}") from exc


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0; got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    """As _seconds, but more than 0 (a timeout of 0 could never be met)."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0; got {text!r}")
    return value


def _iso_time(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time (e.g. 2030-01-27T13:00); got {text!r}") from exc


if __name__ == "__main__":
    sys.exit(main())
