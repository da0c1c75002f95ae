"""All settings, one pydantic-settings model.

Precedence, lowest first: defaults < TOML file < environment (MINICELERY_..., nested with
"__", e.g. MINICELERY_WORKER__QUEUES='["emails"]') < values given in code or on the command
line. The TOML file is `--config PATH` or $MINICELERY_CONFIG; unknown keys are an error.
"""

from __future__ import annotations

import os
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
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigError
from .keys import check_queue_name

CONFIG_ENV = "MINICELERY_CONFIG"
# systemd's LoadCredential=redis-password:/path puts the file here for the service.
CREDENTIAL_NAME = "redis-password"


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

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url

    @field_validator("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
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
        path = self.password_file
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if path is None and credentials and (Path(credentials) / CREDENTIAL_NAME).is_file():
            path = Path(credentials) / CREDENTIAL_NAME
        return (path.read_text().strip() or None) if path is not None else None

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
        if self.tls_ca_file is not None:
            options["ssl_ca_certs"] = str(self.tls_ca_file)
        if self.tls_cert_file is not None:
            options["ssl_certfile"] = str(self.tls_cert_file)
        if self.tls_key_file is not None:
            options["ssl_keyfile"] = str(self.tls_key_file)
        return options


class WorkerSettings(_Section):
    queues: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    lease_seconds: float = Field(30.0, gt=0, description="lease per claim, renewed while the task runs")
    default_time_limit: float | None = Field(3600.0, gt=0, description="for tasks without time_limit=")
    shutdown_grace: float = Field(30.0, ge=0, description="how long SIGTERM waits for the running task")
    idle_block_max: float = Field(5.0, gt=0, le=300, description="longest single blocking call")
    result_ttl: float = Field(86400.0, gt=0, description="seconds a finished task keeps its result")
    batch_size: int = Field(16, ge=1, le=1000, description="most tasks one claim takes (1: no batching)")
    dead_letter_ttl: float = Field(604800.0, gt=0, description="seconds a task that failed for good stays listed")
    max_payload_bytes: int = Field(1024 * 1024, gt=0)
    max_lost_leases: int = Field(3, ge=0, description="reclaims before a task is dead-lettered")
    orphan_ttl: float = Field(
        86400.0, gt=0, description="seconds a child waits for parents never started before it is dead-lettered"
    )
    reconnect_max_delay: float = Field(30.0, gt=0)

    @field_validator("queues")
    @classmethod
    def _valid_queues(cls, queues: list[str]) -> list[str]:
        for name in queues:
            check_queue_name(name)
        return queues


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


class Settings(BaseSettings):
    """Everything a worker or producer can be told. See config/tasks.toml for each key."""

    model_config = SettingsConfigDict(
        env_prefix="MINICELERY_",
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
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, with secrets shown as '***'."""
        data = self.model_dump(mode="json")
        if self.redis.password is not None:
            data["redis"]["password"] = "***"
        data["redis"]["url"] = _mask_url(self.redis.url)
        return data


def _mask_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings; raise ConfigError with one line naming the field on any problem.

    `config` (else $MINICELERY_CONFIG) names the TOML file; it must exist when named.
    `overrides` are the highest layer (command-line flags), nested as dicts.
    """
    path = config or os.environ.get(CONFIG_ENV) or None
    toml_file = Path(path) if path else None
    if toml_file is not None and not toml_file.is_file():
        raise ConfigError(f"config file {toml_file} does not exist")
    loader = type("Settings", (Settings,), {"_toml_file": toml_file})
    try:
        return loader(**overrides)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, toml_file)) from exc
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"config file {toml_file}: {exc}") from exc


def describe_validation_error(exc: ValidationError, toml_file: Path | None) -> str:
    """One line: which field, what value, why (the first problem; the count if more)."""
    first = exc.errors()[0]
    field_name = ".".join(str(part) for part in first["loc"]) or "settings"
    value = first.get("input")
    shown = "***" if "password" in field_name else repr(value)
    if isinstance(value, dict):
        shown = "(section)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown setting (check the spelling)"
    where = f" in {toml_file}" if toml_file is not None else ""
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid setting {field_name}{where}: {message}; got {shown}{more}"
