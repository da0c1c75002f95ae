"""JSON on the wire, nothing else: task payloads and result envelopes.

A payload is what a producer sends for one task; an envelope is what a worker stores as its
outcome. Exceptions cross the wire as data (type name, args, message, traceback) and are
rebuilt only as Python builtins or minicelery's own errors; no class is imported from a payload.
"""

from __future__ import annotations

import builtins
import json
import traceback as traceback_module
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .errors import PayloadTooLarge, RemoteError, SerializationError

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
# Version 3 is a JSON array, [3, name, args, {the other fields not at their default}], the
# trailing parts left out when empty: `[3,"send_mail",[42]]`, 18 bytes fewer than version 2's
# object with its field names, and a pending task's payload is most of its bytes in Redis.
# Like version 2 it leaves out the id (the payload's key in Redis says it). Versions 1 (an
# object with every field and the id) and 2 (an object without the id and the defaults) are
# still read, so tasks enqueued before an upgrade run after it.
PAYLOAD_VERSION = 3
_READ_VERSIONS = (1, 2, 3)
_V3_OPTIONAL = ("kwargs", "arg_deps", "kwarg_deps", "time_limit", "retries")

# minicelery's own task errors come back as themselves; every other non-builtin type
# becomes RemoteError. The lookup is by name in this fixed table, never an import.
_OWN_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        errors.TaskTimeout,
        errors.TaskAborted,
        errors.Cancelled,
        errors.UnknownTask,
        errors.BadArguments,
        errors.WorkerLost,
        errors.ParentNeverStarted,
        errors.SerializationError,
        errors.PayloadTooLarge,
        errors.ResultNotKept,
        errors.TaskError,
    )
}


@dataclass(slots=True)  # not frozen: the worker builds one per task, and frozen ones cost 2 µs more
class TaskMessage:
    """One task as it travels: what to call, with what, and which arguments wait for parents."""

    id: str
    name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Argument position (as a string) or keyword name -> id of the parent whose result goes there.
    arg_deps: dict[str, str] = field(default_factory=dict)
    kwarg_deps: dict[str, str] = field(default_factory=dict)
    time_limit: float | None = None
    retries: int = 0


# Every payload field and the JSON type it must have (checked on every decode).
_MESSAGE_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("id", str),
    ("name", str),
    ("args", list),
    ("kwargs", dict),
    ("arg_deps", dict),
    ("kwarg_deps", dict),
    ("time_limit", (int, float, type(None))),
    ("retries", int),
)
_EMPTY_FIELDS = {"args": list, "kwargs": dict, "arg_deps": dict, "kwarg_deps": dict}  # made anew for each

# The envelope of a task that returned None, as dumps_value() makes it: most tasks return
# nothing, and the encoder is a tenth of a no-op task's cost in the worker.
_NONE_RESULT = b'{"ok":true,"value":null}'


class JSONTransport:
    """Encodes payloads and results as JSON, with a size limit on both."""

    def __init__(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        if max_payload_bytes <= 0:
            raise ValueError("max_payload_bytes must be positive")
        self.max_payload_bytes = max_payload_bytes

    # --- payloads ------------------------------------------------------------------------------

    def dumps_message(self, message: TaskMessage) -> bytes:
        rest: dict[str, Any] = {}
        if message.kwargs:
            rest["kwargs"] = message.kwargs
        if message.arg_deps:
            rest["arg_deps"] = message.arg_deps
        if message.kwarg_deps:
            rest["kwarg_deps"] = message.kwarg_deps
        if message.time_limit is not None:
            rest["time_limit"] = message.time_limit
        if message.retries:
            rest["retries"] = message.retries
        body: list[Any] = [PAYLOAD_VERSION, message.name]
        if message.args or rest:
            body.append(message.args)
        if rest:
            body.append(rest)
        try:
            data = self._dumps(body, what=f"arguments of task {message.name!r}")
        except SerializationError as exc:  # the whole body failed: find the argument to blame
            raise SerializationError(
                f"{_unencodable(message)} of task {message.name!r} cannot be encoded as JSON: {exc.__cause__} "
                "(arguments may be str, int, float, bool, None, and lists and dicts of them)"
            ) from exc
        self._check_size(data, what=f"payload of task {message.name!r}")
        return data

    def loads_message(self, data: bytes | str | None, task_id: str = "") -> TaskMessage:
        """Decode and validate a payload; any defect raises SerializationError saying which.
        `task_id`: its key in Redis, the id of a version 2 payload (which leaves it out)."""
        if data is None:
            raise SerializationError("task payload is missing from Redis")
        raw = data.encode() if isinstance(data, str) else data
        self._check_size(raw, what="task payload")
        body = self._loads(raw, what="task payload")
        if type(body) is list:
            items = len(body)  # most tasks: [3, name] or [3, name, args], made here at once
            if (items == 2 or (items == 3 and type(body[2]) is list)) and body[0] == 3 and type(body[1]) is str:
                return TaskMessage(task_id, body[1], body[2] if items == 3 else [])
            body = _fields_of_version_3(body)
        if not isinstance(body, dict):
            raise SerializationError(f"task payload must be a JSON array or object, got {type(body).__name__}")
        version = body.get("v")
        if version not in _READ_VERSIONS or isinstance(version, bool):
            raise SerializationError(f"unsupported task payload version {version!r}")
        if version in (2, 3):
            if "id" in body:
                raise SerializationError("task payload field 'id' is not part of version 2 or 3 (its key is the id)")
            body["id"] = task_id
            for key, empty in _EMPTY_FIELDS.items():
                if key not in body:
                    body[key] = empty()
            body.setdefault("time_limit", None)
            body.setdefault("retries", 0)
        for key, kind in _MESSAGE_FIELDS:
            if not isinstance(body.get(key), kind):
                raise SerializationError(f"task payload field {key!r} is missing or of the wrong type")
        return TaskMessage(
            id=body["id"],
            name=body["name"],
            args=body["args"],
            kwargs=body["kwargs"],
            arg_deps=body["arg_deps"],
            kwarg_deps=body["kwarg_deps"],
            time_limit=body["time_limit"],
            retries=body["retries"],
        )

    # --- results -------------------------------------------------------------------------------

    def dumps_value(self, value: Any) -> bytes:
        if value is None:
            return _NONE_RESULT
        data = self._dumps({"ok": True, "value": value}, what="task result")
        self._check_size(data, what="task result")
        return data

    def dumps_error(self, exc: BaseException, remote_traceback: str | None = None) -> bytes:
        if remote_traceback is None:
            remote_traceback = "".join(traceback_module.format_exception(exc))
        if isinstance(exc, RemoteError):
            type_name, message, remote_traceback = exc.type_name, exc.message, exc.traceback
        else:
            type_name, message = type(exc).__name__, str(exc)
        args: list[Any] = []
        try:
            json.dumps(list(exc.args))
            args = list(exc.args)
        except (TypeError, ValueError):
            args = [message]
        error = {"type": type_name, "message": message, "args": args, "traceback": remote_traceback}
        data = self._dumps({"ok": False, "error": error}, what="task error")
        if len(data) > self.max_payload_bytes:
            # An error must always be recordable: keep the head of a huge message or traceback.
            error["message"], error["args"] = message[:2000], [message[:2000]]
            error["traceback"] = remote_traceback[-8000:]
            data = self._dumps({"ok": False, "error": error}, what="task error")
        return data

    def loads_outcome(self, data: bytes | str) -> tuple[bool, Any]:
        """Return (True, value) for a success, (False, exception instance) for a failure."""
        body = self._loads(data.encode() if isinstance(data, str) else data, what="task result")
        if not isinstance(body, dict) or "ok" not in body:
            raise SerializationError("task result envelope is malformed")
        if body["ok"]:
            return True, body.get("value")
        error = body.get("error") or {}
        return False, rebuild_exception(
            str(error.get("type", "Exception")),
            str(error.get("message", "")),
            error.get("args") if isinstance(error.get("args"), list) else None,
            str(error.get("traceback", "")),
        )

    # --- helpers -------------------------------------------------------------------------------

    def _check_size(self, data: bytes, what: str) -> None:
        if len(data) > self.max_payload_bytes:
            raise PayloadTooLarge(f"{what} is {len(data)} bytes, over the limit of {self.max_payload_bytes} bytes")

    @staticmethod
    def _dumps(body: Any, what: str) -> bytes:
        try:
            return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise SerializationError(f"{what} cannot be encoded as JSON: {exc}") from exc

    @staticmethod
    def _loads(data: bytes, what: str) -> Any:
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise SerializationError(f"{what} is not valid JSON: {str(exc)[:200]}") from exc


def _unencodable(message: TaskMessage) -> str:
    """Which argument JSON cannot encode: tried one by one, and only once the whole has failed."""
    places = [(f"argument {i}", v) for i, v in enumerate(message.args)]
    places += [(f"keyword argument {k!r}", v) for k, v in message.kwargs.items()]
    for where, value in places:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return where
    return "the arguments"


def rebuild_exception(type_name: str, message: str, args: list[Any] | None, remote_traceback: str) -> BaseException:
    """Turn error data back into an exception: a builtin or own type as itself, else RemoteError."""
    cls = _OWN_ERRORS.get(type_name) or getattr(builtins, type_name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls(*(args if args is not None else [message]))
        except Exception:
            exc = None
        if exc is not None:
            exc.remote_traceback = remote_traceback  # type: ignore[attr-defined]
            return exc
    return RemoteError(type_name, message, remote_traceback)


def _fields_of_version_3(body: list[Any]) -> dict[str, Any]:
    """A version 3 payload, [3, name, args, {other fields}], as the fields of version 2."""
    if not 2 <= len(body) <= 4 or body[0] != PAYLOAD_VERSION or isinstance(body[0], bool):
        raise SerializationError(
            f"unsupported task payload: an array must be [3, name, args, fields], not {json.dumps(body)[:80]}"
        )
    fields: dict[str, Any] = {"v": 3, "name": body[1]}
    if len(body) > 2:
        fields["args"] = body[2]
    if len(body) > 3:
        rest = body[3]
        if not isinstance(rest, dict) or not rest.keys() <= set(_V3_OPTIONAL):
            raise SerializationError(f"task payload fields must be an object of {', '.join(_V3_OPTIONAL)}")
        fields.update(rest)
    return fields
