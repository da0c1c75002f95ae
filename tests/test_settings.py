"""Settings: precedence, unknown keys, bad values, secrets; exit 78 from the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minicelery.errors import ConfigError
from minicelery.settings import load_settings, usable_cpus

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


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minicelery", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def _env(**variables: str) -> dict[str, str]:
    """This process's environment without any MINICELERY_ variable, plus `variables`; tests/
    on PYTHONPATH for worktasks."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MINICELERY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return {**env, **variables}


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
    result = _cli("check-config", "--config", str(config), env=_env())
    assert result.returncode == 0, result.stderr
    assert '"from-toml"' in result.stdout and "hunter2" not in result.stdout and "***" in result.stdout


def test_a_bad_environment_variable_is_blamed_on_the_variable_not_the_file(config: Path) -> None:
    result = _cli("check-config", "--config", str(config), env=_env(MINICELERY_WORKER__QUEUE='["x"]'))
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "minicelery: invalid setting worker.queue from environment variable MINICELERY_WORKER__QUEUE: "
        """unknown setting (did you mean worker.queues?); got '["x"]'"""
    ]


def test_a_bad_flag_is_blamed_on_the_flag_not_the_file(config: Path) -> None:
    result = _cli("worker", "--config", str(config), "-l", "verbose", env=_env())
    assert result.returncode == 78
    assert "invalid setting logging.level from flag -l/--log-level:" in result.stderr
    assert str(config) not in result.stderr and result.stderr.count("\n") == 1


def test_a_list_variable_that_is_not_json_names_the_variable_and_the_form_expected(config: Path) -> None:
    result = _cli("check-config", "--config", str(config), env=_env(MINICELERY_WORKER__QUEUES="x,y"))
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "minicelery: invalid setting worker.queues from environment variable MINICELERY_WORKER__QUEUES: "
        """expected a JSON list, e.g. MINICELERY_WORKER__QUEUES='["x", "y"]'; got 'x,y'"""
    ]


def test_a_misspelt_variable_is_warned_about_with_the_intended_name(config: Path) -> None:
    env = _env(
        MINICELERY_REDIS_URL="redis://elsewhere:6379/0", MINICELERY_TEST_ANYTHING="1", MINICELERY_CONFIG=str(config)
    )
    result = _cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "environment variable" in line]
    assert warnings == [
        "environment variable MINICELERY_REDIS_URL matches no setting and is ignored"
        " (did you mean MINICELERY_REDIS__URL?)"
    ]


def test_every_config_problem_is_reported_at_once_one_line_each(config: Path) -> None:
    config.write_text(TOML.replace("lease_seconds = 40", "lease_seconds = -2\nbatch_size = 0"))
    result = _cli("check-config", "--config", str(config), env=_env(MINICELERY_METRICS__PORT="99999"))
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("minicelery: invalid setting ") for line in lines)
    assert f"worker.lease_seconds in {config}" in lines[0] and f"worker.batch_size in {config}" in lines[1]
    assert "metrics.port from environment variable MINICELERY_METRICS__PORT" in lines[2]


def test_check_config_fails_on_a_task_module_that_raises_naming_its_file_and_line(config: Path, tmp_path: Path) -> None:
    (tmp_path / "raising_tasks.py").write_text("import os\n\nSETTING = os.environ['NO_SUCH_VARIABLE_HERE']\n")
    config.write_text(TOML.replace('["worktasks"]', '["raising_tasks"]'))
    result = _cli("check-config", "--config", str(config), env=_env(), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "minicelery: task module 'raising_tasks' failed to import: KeyError: 'NO_SUCH_VARIABLE_HERE' "
        f"(at {tmp_path / 'raising_tasks.py'}, line 3: SETTING = os.environ['NO_SUCH_VARIABLE_HERE'])"
    ]


def test_a_task_module_that_is_not_found_points_at_the_working_directory_and_pythonpath(
    config: Path, tmp_path: Path
) -> None:
    config.write_text(TOML.replace('["worktasks"]', '["not_here_tasks"]'))
    result = _cli("check-config", "--config", str(config), env=_env(), cwd=tmp_path)
    assert result.returncode == 78
    assert f"working directory {tmp_path}" in result.stderr and "PYTHONPATH" in result.stderr


def test_no_task_modules_configured_says_the_three_ways_to_name_them(tmp_path: Path) -> None:
    result = _cli("worker", env=_env(), cwd=tmp_path)
    assert result.returncode == 78
    assert "tasks = " in result.stderr and "-t" in result.stderr and "MINICELERY_TASKS" in result.stderr


@pytest.mark.parametrize(
    ("section", "line", "reason"),
    [
        ("worker", 'concurrency = "many"', 'must be a whole number of processes, at least 1, or "auto"'),
        ("worker", "concurrency = 1.5", 'must be a whole number of processes, at least 1, or "auto"'),
        ("redis", 'url = "redis://127.0.0.1:notaport/0"', "Port could not be cast to integer"),
        ("redis", 'url = "redis://127.0.0.1:99999/0"', "Port out of range"),
    ],
)
def test_a_value_of_the_wrong_shape_gets_one_line_naming_the_setting(
    config: Path, section: str, line: str, reason: str
) -> None:
    text = TOML.replace("[worker]", f"[worker]\n{line}") if section == "worker" else f"{TOML}\n[redis]\n{line}\n"
    config.write_text(text)
    result = _cli("check-config", "--config", str(config), env=_env())
    assert result.returncode == 78 and result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    setting = f"{section}.{line.split(' =')[0]}"
    assert f"invalid setting {setting} in {config}: {reason}" in result.stderr


def test_a_zone_on_an_every_schedule_is_refused_as_it_would_not_apply(config: Path) -> None:
    config.write_text(f'{TOML}\n[[schedules]]\ntask = "add"\nevery = 86400\ntz = "Europe/Berlin"\n')
    result = _cli("check-config", "--config", str(config), env=_env())
    assert result.returncode == 78 and "tz = 'Europe/Berlin' applies to cron schedules only" in result.stderr, result
    config.write_text(f'{TOML}\n[[schedules]]\ntask = "add"\nevery = 86400\n')  # the default zone, UTC
    assert _cli("check-config", "--config", str(config), env=_env()).returncode == 0


def test_concurrency_comes_from_the_file_the_environment_or_the_flag_and_auto_counts_usable_cpus(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(config).worker.processes() == 1  # the default: today's single process
    config.write_text(TOML.replace("[worker]", "[worker]\nconcurrency = 3"))
    assert load_settings(config).worker.processes() == 3
    monkeypatch.setenv("MINICELERY_WORKER__CONCURRENCY", "auto")
    assert load_settings(config).worker.processes() == usable_cpus() <= len(os.sched_getaffinity(0))
    assert load_settings(config, worker={"concurrency": 2}).worker.processes() == 2
    monkeypatch.setenv("MINICELERY_WORKER__CONCURRENCY", "0")
    with pytest.raises(ConfigError, match=r"worker\.concurrency from environment variable"):
        load_settings(config)


def test_auto_concurrency_is_capped_by_the_cgroup_cpu_quota(tmp_path: Path) -> None:
    own = Path("/proc/self/cgroup").read_text().strip().splitlines()
    group = next((line.split(":", 2)[2] for line in own if line.startswith("0::")), None)
    if group is None:
        pytest.skip("no cgroup v2 membership in /proc/self/cgroup")
    quota_dir = tmp_path / group.lstrip("/")
    quota_dir.mkdir(parents=True, exist_ok=True)
    (quota_dir / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one process
    assert usable_cpus(tmp_path) == 1
    (quota_dir / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_dash_c_is_concurrency_and_a_config_file_given_to_it_gets_a_hint(config: Path) -> None:
    result = _cli("worker", "-c", str(config), env=_env())
    assert result.returncode == 2
    assert "-c is --concurrency" in result.stderr and f"--config {config}" in result.stderr
    result = _cli("worker", "--config", str(config), "-c", "0", env=_env())
    assert result.returncode == 2 and "at least 1" in result.stderr
