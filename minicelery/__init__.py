"""minicelery: a Redis-backed task queue for Python.

from minicelery import Client, JSONTransport, RedisBroker
app = Client(RedisBroker(JSONTransport()))

@app.task
def world():
    return "World!"
"""

from .app import Client
from .broker import RedisBroker
from .errors import (
    BrokerError,
    BrokerUnavailable,
    Cancelled,
    ConfigError,
    DependencyError,
    DuplicateTaskError,
    MiniceleryError,
    NotReplicated,
    ParentNeverStarted,
    PayloadTooLarge,
    RemoteError,
    ResultNotKept,
    SerializationError,
    TaskAborted,
    TaskError,
    TaskNotFound,
    TaskTimeout,
    TimeLimitExceeded,
    UnknownTask,
    WorkerLost,
)
from .task import Task, TaskDefinition
from .transport import JSONTransport

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "Cancelled",
    "Client",
    "ConfigError",
    "DependencyError",
    "DuplicateTaskError",
    "JSONTransport",
    "MiniceleryError",
    "NotReplicated",
    "ParentNeverStarted",
    "PayloadTooLarge",
    "RedisBroker",
    "RemoteError",
    "ResultNotKept",
    "SerializationError",
    "Task",
    "TaskAborted",
    "TaskDefinition",
    "TaskError",
    "TaskNotFound",
    "TaskTimeout",
    "TimeLimitExceeded",
    "UnknownTask",
    "WorkerLost",
    "__version__",
]
