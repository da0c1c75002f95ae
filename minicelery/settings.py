"""All settings, one pydantic-settings model.

Precedence, lowest first: defaults < TOML file < environment (MINICELERY_..., nested with
"__", e.g. MINICELERY_WORKER__QUEUES='["emails"]') < values given in code or on the command
line. The TOML file is `--config PATH` or $MINICELERY_CONFIG; unknown keys are an error.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from redis.connection import parse_url

from .errors import ConfigError
from .keys import check_queue_name
from .schedules import check_cron, check_schedule_name, check_zone, check_zone_applies

log = logging.getLogger(__name__)

ENV_PREFIX = "MINICELERY_"
CONFIG_ENV = "MINICELERY_CONFIG"
# Variables with our prefix that are not settings, so not warned about as misspelt.
OTHER_ENV = (CONFIG_ENV, "MINICELERY_REQUIRE_TOOLS", "MINICELERY_ROOTFS", "MINICELERY_TEST_")
# systemd's LoadCredential=redis-password:/path puts the file here for the service.
CREDENTIAL_NAME = "redis-password"
SENTINEL_CREDENTIAL_NAME = "sentinel-password"  # the same, for the sentinels' own password


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RedisSettings(_Section):
    url: str = "redis://localhost:6379/0"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    socket_timeout: float = Field(5.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    # Sentinel (high availability): the sentinels find the primary; `url` then gives only the
    # database, the credentials and the scheme (rediss:// = TLS) of the data connection.
    sentinels: list[str] = Field(default_factory=list, description='"host:port" of each sentinel')
    sentinel_master: str | None = Field(None, description="the name the sentinels monitor the primary by")
    sentinel_username: str | None = None
    sentinel_password: SecretStr | None = None
    sentinel_password_file: Path | None = None
    sentinel_tls: bool = Field(False, description="TLS to the sentinels, with the tls_* files of the data connection")
    # Redis Cluster: `url` names any node (its credentials and scheme serve every node); each
    # queue lives on the primary that owns its slot.
    cluster: bool = Field(False, description="Redis Cluster: url names any node of it")
    cluster_nodes: list[str] = Field(default_factory=list, description='more startup nodes, "host:port" each')
    # Durable enqueue: start() returns once this many replicas hold the task (Redis WAIT).
    min_replicas_acked: int = Field(0, ge=0, description="replicas that must hold an enqueue before start() returns")
    replica_ack_timeout: float = Field(1.0, gt=0, description="seconds start() waits for those replicas")
    # The same WAIT in the worker's finish: a shortfall is logged and counted, never fails the task.
    replicate_results: bool = Field(False, description="workers wait for min_replicas_acked replicas to hold results")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        # The client's own parsing: a bad port or db is named here, not at the first connect.
        parse_url(url)  # type: ignore[no-untyped-call]
        return url

    @field_validator("sentinels", "cluster_nodes")
    @classmethod
    def _sentinel_addresses(cls, sentinels: list[str]) -> list[str]:
        from .sentinel import parse_address

        for address in sentinels:
            parse_address(address)
        return sentinels

    @model_validator(mode="after")
    def _sentinel_master_named(self) -> RedisSettings:
        if self.sentinels and not self.sentinel_master:
            raise ValueError("redis.sentinel_master must name the monitored primary when redis.sentinels is set")
        if self.sentinel_master and not self.sentinels:
            raise ValueError("redis.sentinel_master is set but redis.sentinels lists no sentinel")
        if self.min_replicas_acked and self.replica_ack_timeout >= self.socket_timeout:
            raise ValueError(
                "redis.replica_ack_timeout must be below redis.socket_timeout (the WAIT rides in the enqueue)"
            )
        if self.replicate_results and not self.min_replicas_acked:
            raise ValueError("redis.replicate_results needs redis.min_replicas_acked (how many replicas) of 1 or more")
        if self.sentinels and self.url.startswith("unix://"):
            raise ValueError("redis.url cannot be unix:// with redis.sentinels: use redis:// or rediss://")
        return self._cluster_checked()

    def _cluster_checked(self) -> RedisSettings:
        if self.cluster_nodes and not self.cluster:
            raise ValueError("redis.cluster_nodes is set but redis.cluster is not true")
        if not self.cluster:
            return self
        if self.sentinels:
            raise ValueError(
                "redis.cluster and redis.sentinels cannot be used together: a cluster fails over by itself "
                "(its replicas); use one or the other"
            )
        if self.url.startswith("unix://"):
            raise ValueError("redis.url cannot be unix:// with redis.cluster: use redis:// or rediss://")
        if int(parse_url(self.url).get("db") or 0) != 0:  # type: ignore[no-untyped-call]
            raise ValueError("redis.url must name database 0 with redis.cluster (a cluster has no other)")
        return self

    @field_validator("password_file", "sentinel_password_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _readable_file(cls, path: Path | None) -> Path | None:
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError("file does not exist or is not readable")
        return path

    def resolved_password(self) -> str | None:
        """password, else password_file, else $CREDENTIALS_DIRECTORY/redis-password.

        An empty file means no password (so one can be provisioned empty and filled in later)."""
        if self.password is not None:
            return self.password.get_secret_value()
        return _read_secret(self.password_file, CREDENTIAL_NAME)

    def _tls_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.tls_ca_file is not None:
            options["ssl_ca_certs"] = str(self.tls_ca_file)
        if self.tls_cert_file is not None:
            options["ssl_certfile"] = str(self.tls_cert_file)
        if self.tls_key_file is not None:
            options["ssl_keyfile"] = str(self.tls_key_file)
        return options

    def sentinel_options(self) -> dict[str, Any]:
        """Keyword arguments for the connections to the sentinels (their own credentials:
        sentinels usually have none, or other ones than the data nodes). The password is
        sentinel_password, else sentinel_password_file, else the systemd credential
        $CREDENTIALS_DIRECTORY/sentinel-password."""
        options: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
        }
        if self.sentinel_password is not None:
            options["password"] = self.sentinel_password.get_secret_value()
        else:
            options["password"] = _read_secret(self.sentinel_password_file, SENTINEL_CREDENTIAL_NAME)
        if self.sentinel_username is not None:
            options["username"] = self.sentinel_username
        if self.sentinel_tls:
            options.update(ssl=True, **self._tls_options())
        return options

    def connection_options(self) -> dict[str, Any]:
        """Keyword arguments for redis.Redis.from_url (only the ones that are set)."""
        options: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
        }
        password = self.resolved_password()
        if password is not None:
            options["password"] = password
        if self.username is not None:
            options["username"] = self.username
        options.update(self._tls_options())
        return options


def _read_secret(path: Path | None, credential: str) -> str | None:
    """The file's text, else that of the systemd credential of this name
    ($CREDENTIALS_DIRECTORY/<credential>), else None. An empty file means no password (so one
    can be provisioned empty and filled in later)."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if path is None and credentials and (Path(credentials) / credential).is_file():
        path = Path(credentials) / credential
    return (path.read_text().strip() or None) if path is not None else None


class WorkerSettings(_Section):
    concurrency: int | Literal["auto"] = Field(
        1, description='worker processes under one supervisor; "auto" = the CPUs this process may use'
    )
    max_tasks_per_child: int | None = Field(
        None, ge=1, description="with concurrency > 1: a child is replaced, gracefully, after this many tasks"
    )
    max_memory_per_child: int | None = Field(
        None, ge=1, description="with concurrency > 1: a child above this RSS (MiB) is replaced, gracefully"
    )
    queues: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    lease_seconds: float = Field(30.0, gt=0, description="lease per claim, renewed while the task runs")
    default_time_limit: float | None = Field(3600.0, gt=0, description="for tasks without time_limit=")
    shutdown_grace: float = Field(30.0, ge=0, description="how long SIGTERM waits for the running task")
    idle_block_max: float = Field(5.0, gt=0, le=300, description="longest single blocking call")
    result_ttl: float = Field(86400.0, gt=0, description="seconds a finished task keeps its result")
    store_results: bool = Field(
        True, description="keep what tasks return; @app.task(store_result=...) overrides it per task"
    )
    batch_size: int = Field(16, ge=1, le=1000, description="most tasks one claim takes (1: no batching)")
    dead_letter_ttl: float = Field(604800.0, gt=0, description="seconds a task that failed for good stays listed")
    max_payload_bytes: int = Field(1024 * 1024, gt=0)
    max_lost_leases: int = Field(3, ge=0, description="reclaims before a task is dead-lettered")
    orphan_ttl: float = Field(
        86400.0, gt=0, description="seconds a child waits for parents never started before it is dead-lettered"
    )
    reconnect_max_delay: float = Field(30.0, gt=0)
    unknown_task_grace: float = Field(
        600.0, ge=0, description="seconds a task whose name this worker lacks is given back for another"
    )

    @field_validator("concurrency", mode="before")
    @classmethod
    def _processes_or_auto(cls, value: Any) -> int | str:
        """One message for any wrong value (the union's own errors name its branches, `.int`
        and `.literal['auto']`, which tell an operator nothing)."""
        if value == "auto":
            return "auto"
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and value.strip().isdigit():
            number = int(value)
        else:
            number = 0  # 1.5, true, "many": as wrong as 0
        if number < 1:
            raise ValueError('must be a whole number of processes, at least 1, or "auto"')
        return number

    def processes(self) -> int:
        """How many worker processes: `concurrency`, with "auto" resolved (see usable_cpus)."""
        return usable_cpus() if self.concurrency == "auto" else int(self.concurrency)

    @field_validator("queues")
    @classmethod
    def _valid_queues(cls, queues: list[str]) -> list[str]:
        for name in queues:
            check_queue_name(name)
        return queues


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask (taskset, systemd CPUAffinity=, a
    container's cpuset), capped by a cgroup v2 `cpu.max` quota (systemd CPUQuota=, a
    Kubernetes CPU limit), rounded up; at least 1."""
    cpus = len(os.sched_getaffinity(0))
    try:
        own = Path("/proc/self/cgroup").read_text().strip().splitlines()
        relative = next(line.split(":", 2)[2] for line in own if line.startswith("0::"))
        quota, period = (cgroup / relative.lstrip("/") / "cpu.max").read_text().split()
    except (OSError, StopIteration, ValueError):
        return max(1, cpus)  # no cgroup v2, or no quota file for this group
    if quota != "max":
        cpus = min(cpus, -(-int(quota) // int(period)))  # ceil: 1.5 CPUs is 2 processes
    return max(1, cpus)


class MetricsSettings(_Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = Field(9808, ge=0, le=65535)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, level: Any) -> Any:
        return level.upper() if isinstance(level, str) else level


class ScheduleSettings(_Section):
    """One [[schedules]] table: run `task` at the slots of `cron` (in `tz`) or `every` N seconds.
    Declares the schedule, or overrides one of the same name declared in code (@app.periodic)."""

    task: str = Field(description="a registered task's name")
    name: str | None = Field(None, description="the schedule's name (default: the task's)")
    cron: str | None = None
    every: float | None = Field(None, gt=0, description="seconds between slots")
    tz: str = "UTC"
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: str | None = None
    overlap: bool = False
    catch_up: Literal["one", "all", "skip"] = "one"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str | None) -> str | None:
        return None if cron is None else check_cron(cron)

    @field_validator("tz")
    @classmethod
    def _valid_zone(cls, tz: str) -> str:
        return check_zone(tz)

    @field_validator("queue")
    @classmethod
    def _valid_queue(cls, queue: str | None) -> str | None:
        return None if queue is None else check_queue_name(queue)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str | None) -> str | None:
        return None if name is None else check_schedule_name(name)

    @model_validator(mode="after")
    def _cron_or_every(self) -> ScheduleSettings:
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule of task {self.task!r}: give exactly one of cron and every")
        try:
            check_zone_applies(self.every, self.tz)
        except ValueError as exc:
            raise ValueError(f"schedule of task {self.task!r}: {exc}") from None
        return self


class Settings(BaseSettings):
    """Everything a worker or producer can be told. See config/tasks.toml for each key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )
    # Set per load by load_settings(); a class variable because settings sources are
    # chosen per class in pydantic-settings.
    _toml_file: ClassVar[Path | None] = None

    tasks: list[str] = Field(default_factory=list, description="modules that register tasks")
    redis: RedisSettings = Field(default_factory=RedisSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    schedules: list[ScheduleSettings] = Field(default_factory=list, description="[[schedules]] tables")

    @model_validator(mode="after")
    def _lease_outlives_block(self) -> Settings:
        if self.worker.lease_seconds < self.worker.idle_block_max:
            raise ValueError("worker.lease_seconds must be at least worker.idle_block_max")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvSource(settings_cls)]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, with secrets shown as '***'."""
        data = self.model_dump(mode="json")
        for secret in ("password", "sentinel_password"):
            if getattr(self.redis, secret) is not None:
                data["redis"][secret] = "***"
        data["redis"]["url"] = mask_url(self.redis.url)
        return data


def mask_url(url: str) -> str:
    """The url with its password, if any, as ***."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


class _EnvSource(EnvSettingsSource):
    """The environment layer, except that a list or section variable holding text that is not
    JSON is passed on as text: validation then rejects it along with every other problem,
    and the message names the variable (pydantic-settings would stop at the first such
    variable, naming only the section)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


def load_settings(
    config: Path | str | None = None, *, flag_names: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Build the settings; raise ConfigError with one line per problem, naming its source.

    `config` (else $MINICELERY_CONFIG) names the TOML file; it must exist when named.
    `overrides` are the highest layer (command-line flags), nested as dicts; `flag_names`
    maps a dotted setting to the flag that set it ("logging.level": "flag -l/--log-level"),
    for messages.
    """
    path = config or os.environ.get(CONFIG_ENV) or None
    toml_file = Path(path) if path else None
    if toml_file is not None and not toml_file.is_file():
        raise ConfigError(f"config file {toml_file} does not exist")
    _warn_unknown_env()
    loader = type("Settings", (Settings,), {"_toml_file": toml_file})
    try:
        return loader(**overrides)  # type: ignore[no-any-return]
    except ValidationError as exc:
        lines = [_describe(error, toml_file, overrides, flag_names or {}) for error in exc.errors()]
        raise ConfigError("\n".join(lines)) from exc
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"config file {toml_file}: {exc}") from exc


def _describe(error: Any, toml_file: Path | None, overrides: Mapping[str, Any], flag_names: Mapping[str, str]) -> str:
    """One line: which setting, from where, why, and the value (a password masked)."""
    loc = [str(part) for part in error["loc"]]
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # a rule between settings (the model validator): no one source to blame
        return f"invalid settings: {message}"
    name = ".".join(loc)
    value = error.get("input")
    shown = "***" if "password" in name else None if isinstance(value, dict) else repr(value)
    variable = _env_name(loc)
    if _contains(overrides, loc):
        dotted = ".".join(part for part in loc if not part.isdigit())
        where = f" from {flag_names.get(dotted, 'the arguments given in code')}"
    elif variable is not None:
        where = f" from environment variable {variable}"
        whole = variable == ENV_PREFIX + "__".join(loc).upper()  # not a part of a JSON section
        if whole and error["type"] in ("list_type", "dict_type", "model_type") and isinstance(value, str):
            example = """'["x", "y"]'""" if error["type"] == "list_type" else """'{"key": "value"}'"""
            kind = "list" if error["type"] == "list_type" else "object"
            message = f"expected a JSON {kind}, e.g. {variable}={example}"
    else:
        where = f" in {toml_file}" if toml_file is not None else ""
    if error["type"] == "extra_forbidden":
        known = [".".join([*loc[:-1], key]) for key in _setting_names(loc[:-1])]
        message = "unknown setting" + _did_you_mean(name, known, "check the spelling")
    # A rule about a whole table (a [[schedules]] entry) has no one value to show.
    return f"invalid setting {name}{where}: {message}" + ("" if shown is None else f"; got {shown}")


def _contains(tree: Mapping[str, Any], path: list[str]) -> bool:
    """Whether nested dicts `tree` hold `path` (a path into a list counts as its list)."""
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def _env_name(loc: list[str]) -> str | None:
    """The MINICELERY_ variable that set this setting (or its whole section), if one did."""
    present = {key.upper() for key in os.environ if key.upper().startswith(ENV_PREFIX)}
    for end in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(loc[:end]).upper()
        if name in present:
            return name
    return None


def _setting_names(section: list[str]) -> list[str]:
    """The keys allowed at this place: top-level names for [], a section's for ["worker"]."""
    model: Any = Settings
    for part in section:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _did_you_mean(name: str, candidates: list[str], otherwise: str) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else f" ({otherwise})"


_warned: set[str] = set()  # each misspelt variable once per process, however often settings load


def _warn_unknown_env() -> None:
    """pydantic-settings ignores MINICELERY_ variables that match no top-level setting (as
    MINICELERY_REDIS_URL with one underscore): say so, with the likely intended name."""
    known = []
    for top in _setting_names([]):
        known.append(ENV_PREFIX + top.upper())
        known.extend(f"{ENV_PREFIX}{top.upper()}__{key.upper()}" for key in _setting_names([top]))
    for key in os.environ:
        name = key.upper()
        section = name.removeprefix(ENV_PREFIX).split("__", 1)[0]
        if (
            not name.startswith(ENV_PREFIX)
            or name.startswith(OTHER_ENV)
            or section.lower() in Settings.model_fields
            or name in _warned
        ):
            continue  # a nested one with a bad key is a validation error instead
        _warned.add(name)
        hint = _did_you_mean(name, known, f"settings are {ENV_PREFIX}SECTION__KEY, e.g. {ENV_PREFIX}REDIS__URL")
        log.warning("environment variable %s matches no setting and is ignored%s", key, hint)
