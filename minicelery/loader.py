"""Import the configured task modules and gather the tasks they registered (worker, enqueue,
check-config all do this the same way)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from .app import Client
from .errors import ConfigError
from .task import TaskDefinition

NO_TASKS_HINT = 'set tasks = ["mytasks"] in the TOML file, pass -t mytasks, or set MINICELERY_TASKS=\'["mytasks"]\''


def load_task_modules(modules: Sequence[str]) -> dict[str, TaskDefinition]:
    """Import `modules` (the working directory is searched too) and return every task any
    Client in this process registered, by name. Raises ConfigError saying what to fix."""
    if not modules:
        raise ConfigError(f"invalid setting tasks: no task modules configured; {NO_TASKS_HINT}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `minicelery worker -t mytasks` next to mytasks.py
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(f"task module {module!r} failed to import: {_why(module, exc)}") from exc
    tasks: dict[str, TaskDefinition] = {}
    for client in Client.instances:
        for name, definition in client.tasks.items():
            if name in tasks and tasks[name].fn is not definition.fn:
                raise ConfigError(f"task name {name!r} is registered twice by the task modules")
            tasks[name] = definition
    if not tasks:
        raise ConfigError(f"task modules {list(modules)} registered no tasks (no @app.task found)")
    return tasks


def _why(module: str, exc: Exception) -> str:
    """The error, and where: the failing line of the module (or of what it imported), or,
    when the module itself is missing, where Python looked."""
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and exc.name and (module + ".").startswith(exc.name + "."):
        return (
            f"{what} (searched the working directory {os.getcwd()} and PYTHONPATH: run from the directory "
            "that holds it, or add that directory to PYTHONPATH)"
        )
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"SyntaxError: {exc.msg} (at {exc.filename}, line {exc.lineno})"
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if not frame.filename.startswith("<frozen")]
    if not frames:
        return what
    last = frames[-1]  # the line that raised, in the module or in something it called
    return f"{what} (at {last.filename}, line {last.lineno}: {(last.line or '').strip()})"
