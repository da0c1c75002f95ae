"""The `minicelery` command (also `python -m minicelery`).

Exit codes:
  0   success
  1   the task failed (enqueue --wait-result, result) or an unexpected error
  2   bad command-line usage
  69  Redis is unreachable (EX_UNAVAILABLE)
  75  the worker stopped before its running task finished; the task was handed back (EX_TEMPFAIL)
  78  bad configuration or a task module that fails to import (EX_CONFIG)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
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

EPILOG = __doc__.split("Exit codes:", 1)[1] if __doc__ else ""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help=f"TOML settings file (default: ${CONFIG_ENV})")
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
    worker.add_argument("--queues", "-Q", help="comma-separated queues (overrides worker.queues)")
    worker.add_argument("--tasks", "-t", help="comma-separated task modules (overrides tasks)")
    worker.add_argument("--log-level", "-l", help="DEBUG, INFO, WARNING, ERROR")
    worker.add_argument("--log-format", choices=["text", "json"])
    worker.add_argument("--burst", action="store_true", help="exit once no task is ready")

    command("check-config", "Validate the settings and print them, secrets masked.")

    enqueue = command("enqueue", "Send a task by name.")
    enqueue.add_argument("task", help="task name")
    enqueue.add_argument("args", nargs="?", default="[]", help="positional arguments as a JSON list")
    enqueue.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    enqueue.add_argument("--queue", "-q", help="queue (default: the first of worker.queues)")
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, help="run after this many seconds")
    when.add_argument("--at", help="run at this ISO 8601 time (naive = local time)")
    enqueue.add_argument("--key", help="idempotency key: no second task while one with it is pending")
    enqueue.add_argument("--wait-result", action="store_true", help="wait and print the result")
    enqueue.add_argument("--timeout", type=float, help="with --wait-result: give up after seconds")

    inspect = command(
        "inspect",
        "Show queue depths, next due time, live workers, dead letters, and waiting tasks whose parents "
        "were never started (dead-lettered after worker.orphan_ttl).",
    )
    inspect.add_argument("--queue", "-q", action="append", help="queue (repeatable; default: worker.queues)")
    inspect.add_argument("--json", action="store_true", help="print JSON")

    result = command("result", "Print a task's result (waits while it is unfinished).")
    result.add_argument("id")
    result.add_argument("--queue", "-q")
    result.add_argument("--timeout", type=float, default=0.0, help="seconds to wait (default: do not wait)")

    retry_dead = command("retry-dead", "Put dead letters back in their queue to run again.")
    retry_dead.add_argument("ids", nargs="*", metavar="ID", help="task ids (default: every dead letter)")
    retry_dead.add_argument("--queue", "-q", action="append", help="queue (repeatable; default: worker.queues)")

    purge = command("purge", "Delete every task of a queue (asks first).")
    purge.add_argument("--queue", "-q", action="append")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask")

    health = command("health", "Ask the local worker's /healthz (or /readyz); exit 0 if it answers 200.")
    health.add_argument("--ready", action="store_true", help="ask /readyz: Redis reachable and tasks loaded")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")

    demo = command("demo", "Run the original README's demo on a private Redis.")
    demo.add_argument("--workers", type=int, default=3)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(_dispatch(args))
    except ConfigError as exc:
        print(f"minicelery: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerUnavailable as exc:
        print(f"minicelery: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except MiniceleryError as exc:
        print(f"minicelery: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(workers=args.workers)
    if args.command == "worker":
        return _worker(args)
    settings = load_settings(args.config)
    if args.command == "check-config":
        print(json.dumps(settings.masked(), indent=2))
        return EXIT_OK
    if args.command == "health":
        return _health(settings, "/readyz" if args.ready else "/healthz", args.timeout)
    from .admin import Admin

    admin = Admin(settings)
    if args.command == "enqueue":
        return admin.enqueue(
            args.task,
            _json_arg(args.args, list, "ARGS"),
            _json_arg(args.kwargs, dict, "--kwargs"),
            queue=args.queue,
            delay=args.delay,
            at=_iso_time(args.at) if args.at else None,
            key=args.key,
            wait=args.wait_result,
            timeout=args.timeout,
        )
    if args.command == "inspect":
        return admin.inspect(args.queue or settings.worker.queues, as_json=args.json)
    if args.command == "result":
        try:
            return admin.result(args.id, args.queue, args.timeout)
        except TaskNotFound as exc:
            print(f"minicelery: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.command == "retry-dead":
        return admin.retry_dead(args.queue or settings.worker.queues, args.ids)
    if args.command == "purge":
        return admin.purge(args.queue or settings.worker.queues, assume_yes=args.yes)
    raise AssertionError(args.command)


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
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"minicelery: {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{url}: {status}")
    return EXIT_OK if status == 200 else EXIT_FAILED


def _worker(args: argparse.Namespace) -> int:
    from .logs import configure_logging
    from .worker import Worker

    if args.config:
        # Task modules that build RedisBroker() themselves read the same file.
        os.environ[CONFIG_ENV] = args.config
    overrides: dict[str, Any] = {}
    if args.queues:
        overrides["worker"] = {"queues": [q.strip() for q in args.queues.split(",") if q.strip()]}
    if args.tasks:
        overrides["tasks"] = [m.strip() for m in args.tasks.split(",") if m.strip()]
    logging_overrides = {k: v for k, v in (("level", args.log_level), ("format", args.log_format)) if v}
    if logging_overrides:
        overrides["logging"] = logging_overrides
    settings = load_settings(args.config, **overrides)
    configure_logging(settings.logging.level, settings.logging.format)
    app = build_worker_app(settings)
    return Worker(app, settings).run(burst=args.burst)


def build_worker_app(settings: Settings) -> Any:
    """Import the task modules and gather every task they registered into one Client."""
    from .app import Client
    from .broker import RedisBroker

    if not settings.tasks:
        raise ConfigError("invalid setting tasks: no task modules configured; got []")
    sys.path.insert(0, os.getcwd())
    for module in settings.tasks:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(f"task module {module!r} failed to import: {type(exc).__name__}: {exc}") from exc
    broker = RedisBroker.from_settings(settings)
    app = Client(broker, default_queue=settings.worker.queues[0])
    for other in Client.instances:
        if other is app:
            continue
        for name, definition in other.tasks.items():
            if name in app.tasks and app.tasks[name].fn is not definition.fn:
                raise ConfigError(f"task name {name!r} is registered twice by the task modules")
            app.tasks[name] = definition
    Client.instances.remove(app)
    if not app.tasks:
        raise ConfigError(f"task modules {settings.tasks} registered no tasks (no @app.task found)")
    return app


def _json_arg(text: str, kind: type, what: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise ConfigError(f"{what} must be a JSON {'list' if kind is list else 'object'}")
    return value


def _iso_time(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--at {text!r} is not an ISO 8601 time") from exc


if __name__ == "__main__":
    sys.exit(main())
