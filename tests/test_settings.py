"""Settings: precedence, unknown keys, bad values, secrets; exit 78 from the real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minicelery.errors import ConfigError
from minicelery.settings import load_settings

TOML = """
tasks = ["worktasks"]
[worker]
queues = ["from-toml"]
lease_seconds = 40
shutdown_grace = 7
[logging]
level = "debug"
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("MINICELERY_CONFIG", "MINICELERY_REDIS__URL", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "tasks.toml"
    path.write_text(TOML)
    return path


def test_toml_overrides_defaults_env_overrides_toml_flags_override_env(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(config)
    assert settings.worker.queues == ["from-toml"] and settings.worker.lease_seconds == 40
    assert settings.worker.idle_block_max == 5.0  # default kept
    assert settings.logging.level == "DEBUG"
    monkeypatch.setenv("MINICELERY_WORKER__QUEUES", '["from-env"]')
    monkeypatch.setenv("MINICELERY_WORKER__SHUTDOWN_GRACE", "3")
    settings = load_settings(config)
    assert settings.worker.queues == ["from-env"] and settings.worker.shutdown_grace == 3
    assert settings.worker.lease_seconds == 40  # still from the file
    settings = load_settings(config, worker={"queues": ["from-flag"]})
    assert settings.worker.queues == ["from-flag"] and settings.worker.shutdown_grace == 3


def test_config_file_from_environment_variable(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINICELERY_CONFIG", str(config))
    assert load_settings().worker.queues == ["from-toml"]


def test_unknown_key_in_toml_is_an_error_naming_it(config: Path) -> None:
    config.write_text(TOML + "\n[metrics]\nprot = 9000\n")
    with pytest.raises(ConfigError, match=r"metrics\.prot.*unknown setting"):
        load_settings(config)


def test_bad_value_names_field_value_and_reason(config: Path) -> None:
    config.write_text(TOML.replace("lease_seconds = 40", "lease_seconds = -2"))
    with pytest.raises(ConfigError, match=r"worker\.lease_seconds.*greater than 0.*got -2"):
        load_settings(config)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_password_from_file_and_from_systemd_credentials(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = load_settings(config, redis={"password_file": str(secret)})
    assert settings.redis.connection_options()["password"] == "s3cret"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis-password").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_settings(config).redis.connection_options()["password"] == "from-credential"
    masked = load_settings(config, redis={"password": "p", "url": "redis://u:p@h:1/0"}).masked()
    assert masked["redis"]["password"] == "***" and masked["redis"]["url"] == "redis://u:***@h:1/0"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minicelery", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_worker_with_bad_setting_exits_78_with_one_line(config: Path) -> None:
    config.write_text(TOML + "\n[metrics]\nport = 99999\n")
    result = _cli("worker", "--config", str(config))
    assert result.returncode == 78
    assert result.stderr.strip().count("\n") == 0
    assert "metrics.port" in result.stderr and "99999" in result.stderr


def test_worker_with_module_that_fails_to_import_exits_78(config: Path) -> None:
    config.write_text(TOML.replace('["worktasks"]', '["no_such_module_here"]'))
    result = _cli("worker", "--config", str(config))
    assert result.returncode == 78
    assert "no_such_module_here" in result.stderr and "ModuleNotFoundError" in result.stderr


def test_check_config_prints_effective_settings_with_secrets_masked(config: Path) -> None:
    config.write_text(TOML + '\n[redis]\npassword = "hunter2"\n')
    result = _cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert '"from-toml"' in result.stdout and "hunter2" not in result.stdout and "***" in result.stdout
