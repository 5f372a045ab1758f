"""Settings from the environment: strict parsing, secrets from files, database URLs, deploy checks."""

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from fetchml.conf import ABOVE_ZERO, AT_LEAST_ONE, DEFAULTS, app_settings, settings_from_env
from fetchml.env import env_bool, env_choice, env_float, env_int, env_list, env_str, parse_database_url

PROJECT_DIR = Path(settings.BASE_DIR)
PRODUCTION_ENV = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/fetchml_deploy_check",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "DJANGO_DEBUG": "false",
    "ALLOWED_HOSTS": "example.com",
}


def run_manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """manage.py in a fresh process, with only the given environment (settings are read at start-up)."""
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT_DIR, env=clean, capture_output=True, text=True, timeout=120
    )


def printed_by_a_fresh_process(code: str, env: dict[str, str]) -> str:
    """The last line `code` prints in a fresh Python process with only the given environment."""
    clean = {"PATH": os.environ.get("PATH", ""), "DJANGO_SETTINGS_MODULE": "fetchml.settings", **env}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, env=clean, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("raw", ["maybe", "2", "tru", "enabled"])
def test_a_bad_boolean_is_refused(monkeypatch, raw):
    monkeypatch.setenv("X_FLAG", raw)
    with pytest.raises(ImproperlyConfigured, match="X_FLAG"):
        env_bool("X_FLAG")


@pytest.mark.parametrize(
    ("raw", "expected"), [("true", True), ("YES", True), ("1", True), ("off", False), ("0", False)]
)
def test_booleans_are_read(monkeypatch, raw, expected):
    monkeypatch.setenv("X_FLAG", raw)
    assert env_bool("X_FLAG", not expected) is expected


def test_an_unset_boolean_is_its_default(monkeypatch):
    monkeypatch.delenv("X_FLAG", raising=False)
    assert env_bool("X_FLAG", True) is True


@pytest.mark.parametrize("raw", ["ten", "1.5", "0x10", "1e3"])
def test_a_bad_integer_is_refused(monkeypatch, raw):
    monkeypatch.setenv("X_NUMBER", raw)
    with pytest.raises(ImproperlyConfigured, match="X_NUMBER"):
        env_int("X_NUMBER", 1)


def test_an_integer_below_its_minimum_is_refused(monkeypatch):
    monkeypatch.setenv("X_NUMBER", "-1")
    with pytest.raises(ImproperlyConfigured, match="minimum"):
        env_int("X_NUMBER", 1, minimum=0)


def test_a_bad_float_is_refused(monkeypatch):
    monkeypatch.setenv("X_NUMBER", "fast")
    with pytest.raises(ImproperlyConfigured, match="X_NUMBER"):
        env_float("X_NUMBER", 1.0)


def test_a_choice_is_read_in_any_case_and_anything_else_refused(monkeypatch):
    monkeypatch.setenv("FETCHML_X", "debug")
    assert env_choice("FETCHML_X", "INFO", ("DEBUG", "INFO")) == "DEBUG"
    monkeypatch.setenv("FETCHML_X", "LOUD")
    with pytest.raises(ImproperlyConfigured, match="FETCHML_X='LOUD' is not one of DEBUG, INFO"):
        env_choice("FETCHML_X", "INFO", ("DEBUG", "INFO"))


def test_lists_are_comma_separated_and_trimmed(monkeypatch):
    monkeypatch.setenv("X_LIST", " a.example , b.example,, ")
    assert env_list("X_LIST", []) == ["a.example", "b.example"]


def test_a_secret_is_read_from_the_file_named_by_name_file(monkeypatch, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret-value\n")
    monkeypatch.setenv("X_SECRET", "from-env")
    monkeypatch.setenv("X_SECRET_FILE", str(secret_file))
    assert env_str("X_SECRET") == "s3cret-value"


def test_an_unreadable_name_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("X_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="X_SECRET_FILE"):
        env_str("X_SECRET")


def test_product_settings_are_parsed_by_the_type_of_their_default(monkeypatch):
    monkeypatch.setenv("FETCHML_SCHEDULER_BATCH_SIZE", "7")
    monkeypatch.setenv("FETCHML_WORKER_LEASE_SECONDS", "22.5")
    monkeypatch.setenv("FETCHML_PLUGINS", "a.b.Plugin,c.d.Plugin")
    values = settings_from_env()
    assert values["FETCHML_SCHEDULER_BATCH_SIZE"] == 7
    assert values["FETCHML_WORKER_LEASE_SECONDS"] == 22.5
    assert values["FETCHML_PLUGINS"] == ["a.b.Plugin", "c.d.Plugin"]


def test_a_bad_product_integer_is_refused(monkeypatch):
    monkeypatch.setenv("FETCHML_SCHEDULER_BATCH_SIZE", "many")
    with pytest.raises(ImproperlyConfigured, match="FETCHML_SCHEDULER_BATCH_SIZE"):
        settings_from_env()


@pytest.mark.parametrize("rate", ["100", "fast", "100/minute", "/m", "10/x"])
def test_a_malformed_rate_is_refused_at_start_up(monkeypatch, rate):
    monkeypatch.setenv("FETCHML_RATE_LIMIT_GET", rate)
    with pytest.raises(ImproperlyConfigured, match="FETCHML_RATE_LIMIT_GET"):
        settings_from_env()


@pytest.mark.parametrize("rate", ["100/m", "5/10s", "1000/h", "1/d"])
def test_well_formed_rates_are_accepted(monkeypatch, rate):
    monkeypatch.setenv("FETCHML_RATE_LIMIT_POST", rate)
    assert settings_from_env()["FETCHML_RATE_LIMIT_POST"] == rate


@pytest.mark.parametrize(("heartbeat", "lease"), [("11", "30"), ("5", "5"), ("0", "30")])
def test_a_heartbeat_the_lease_cannot_hold_is_refused_at_start_up(monkeypatch, heartbeat, lease):
    monkeypatch.setenv("FETCHML_WORKER_HEARTBEAT_SECONDS", heartbeat)
    monkeypatch.setenv("FETCHML_WORKER_LEASE_SECONDS", lease)
    with pytest.raises(ImproperlyConfigured, match="FETCHML_WORKER_HEARTBEAT_SECONDS"):
        settings_from_env()


def test_a_lease_of_three_heartbeats_is_accepted(monkeypatch):
    monkeypatch.setenv("FETCHML_WORKER_HEARTBEAT_SECONDS", "2")
    monkeypatch.setenv("FETCHML_WORKER_LEASE_SECONDS", "6")
    assert settings_from_env()["FETCHML_WORKER_HEARTBEAT_SECONDS"] == 2.0


def test_app_settings_follow_override_settings(settings):
    settings.FETCHML_RATE_LIMIT_GET = "3/m"
    assert app_settings.RATE_LIMIT_GET == "3/m"


def test_an_unknown_app_setting_is_an_error():
    with pytest.raises(AttributeError):
        app_settings.NO_SUCH_SETTING  # noqa: B018


def test_postgres_database_url_is_parsed():
    parsed = parse_database_url("postgres://fetch%40ml:p%2Fss@db.internal:6543/fetch_db?sslmode=require")
    assert parsed == {
        "ENGINE": "fetchml.backends.postgresql",
        "NAME": "fetch_db",
        "USER": "fetch@ml",
        "PASSWORD": "p/ss",
        "HOST": "db.internal",
        "PORT": "6543",
        "OPTIONS": {"sslmode": "require"},
    }


def test_postgresql_scheme_without_port_or_password_is_parsed():
    parsed = parse_database_url("postgresql://postgres@127.0.0.1/fetchml")
    assert (parsed["ENGINE"], parsed["NAME"], parsed["USER"], parsed["PASSWORD"], parsed["PORT"]) == (
        "fetchml.backends.postgresql",
        "fetchml",
        "postgres",
        "",
        "",
    )


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("sqlite:///relative/fetchml.db", "relative/fetchml.db"),
        ("sqlite:////var/lib/fetchml/db.sqlite3", "/var/lib/fetchml/db.sqlite3"),
        ("sqlite://", ":memory:"),
    ],
)
def test_sqlite_database_urls_are_parsed(url, name):
    assert parse_database_url(url) == {"ENGINE": "django.db.backends.sqlite3", "NAME": name}


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgres://u@h:notaport/db", "nonsense"])
def test_an_unsupported_or_broken_database_url_is_refused(url):
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL"):
        parse_database_url(url)


def test_a_bad_boolean_stops_the_process_at_start_up():
    result = run_manage("check", env={"DJANGO_DEBUG": "perhaps"})
    assert result.returncode != 0
    assert "DJANGO_DEBUG='perhaps' is not a boolean" in result.stderr


def test_a_bad_log_level_stops_the_process_at_start_up_naming_the_variable():
    result = run_manage("check", env={"FETCHML_LOG_LEVEL": "LOUD"})
    assert result.returncode != 0
    assert "FETCHML_LOG_LEVEL='LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in result.stderr


def test_production_requires_a_secret_key():
    env = {key: value for key, value in PRODUCTION_ENV.items()}
    result = run_manage("check", env=env)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required" in result.stderr


def test_with_redis_url_the_cache_and_channel_layer_are_shared_through_redis(tmp_path):
    key_file = tmp_path / "secret_key"
    key_file.write_text(secrets.token_urlsafe(50))
    env = {**PRODUCTION_ENV, "DJANGO_SECRET_KEY_FILE": str(key_file)}
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        "layer = s.CHANNEL_LAYERS['default']; "
        "cache = s.CACHES['default']; "
        "print(json.dumps([cache, layer['BACKEND'], s.SECRET_KEY, layer['CONFIG']['hosts']]))"
    )
    cache, layer_backend, secret_key, [host] = json.loads(printed_by_a_fresh_process(code, env))
    assert cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    # A silent Redis costs a request's rate-limit counter less than redis-py's own 5 s.
    assert cache["OPTIONS"]["socket_timeout"] < 5 and cache["OPTIONS"]["socket_connect_timeout"] < 5
    assert layer_backend == "fetchml.channel_layer.RedisChannelLayer"
    assert secret_key == key_file.read_text()
    # Reads must outlast the layer's 5 s blocking pop, or idle consumers are torn down.
    assert host["address"] == PRODUCTION_ENV["REDIS_URL"] and host["socket_timeout"] > 5


# Warnings accepted from `check --deploy`, each for a stated reason:
JUSTIFIED_DEPLOY_WARNINGS = {
    # HSTS preload is opt-in (DJANGO_HSTS_PRELOAD=true): submitting a domain to
    # the browsers' preload list is hard to undo, so it is the operator's call.
    "security.W021",
}


def deploy_check_ids(output: str) -> set[str]:
    return {line.split("(", 1)[1].split(")", 1)[0] for line in output.splitlines() if line.startswith("?: (")}


def test_production_settings_pass_the_deploy_checks():
    env = {
        **PRODUCTION_ENV,
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "FETCHML_AUDIT_SIGNING_KEY": secrets.token_hex(32),
    }
    result = run_manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    ids = deploy_check_ids(result.stdout + result.stderr)
    # Schema-generation warnings (drf_spectacular.*) belong to the API apps and
    # are held to account by test_schema, not here.
    unexpected = {check for check in ids if not check.startswith("drf_spectacular.")} - JUSTIFIED_DEPLOY_WARNINGS
    assert not unexpected, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_production_without_redis_is_flagged_by_the_deploy_checks():
    env = {**PRODUCTION_ENV, "DJANGO_SECRET_KEY": secrets.token_urlsafe(50)}
    del env["REDIS_URL"]
    result = run_manage("check", "--deploy", env=env)
    assert "fetchml.W001" in deploy_check_ids(result.stdout + result.stderr)


def _gc_threshold_of_a_process(tmp_path: Path, **env: str) -> int:
    code = "import django, gc; django.setup(); print(gc.get_threshold()[0])"
    return int(printed_by_a_fresh_process(code, {"FETCHML_VAR_DIR": str(tmp_path), **env}))


def test_a_fetchml_process_collects_young_garbage_less_often_than_python_by_default(tmp_path):
    assert _gc_threshold_of_a_process(tmp_path) == 20_000


def test_the_garbage_collection_threshold_can_be_left_to_python(tmp_path):
    assert _gc_threshold_of_a_process(tmp_path, FETCHML_GC_THRESHOLD="0") == 700


def _postgresql_options(**env: str) -> str:
    code = "import django; django.setup(); from django.conf import settings; print(settings.DATABASES['default'])"
    database = {"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/fetchml_settings_only"}
    return printed_by_a_fresh_process(code, {**database, "DJANGO_SECRET_KEY": "settings-test-only", **env})


def test_prepared_statements_are_on_by_default_on_postgresql():
    assert "'server_side_binding': True" in _postgresql_options()


def test_prepared_statements_can_be_turned_off_for_a_pooler_that_cannot_keep_them():
    assert "server_side_binding" not in _postgresql_options(FETCHML_DB_PREPARED_STATEMENTS="false")


def test_a_postgresql_connection_bounds_its_waits_on_the_network_and_on_stalled_transactions():
    options = _postgresql_options(FETCHML_DB_NETWORK_TIMEOUT_SECONDS="9", FETCHML_DB_STALLED_TRANSACTION_SECONDS="4")
    assert "'tcp_user_timeout': '9000'" in options
    assert "'keepalives': '1'" in options
    assert "idle_in_transaction_session_timeout=4000" in options


# --- numbers out of range ------------------------------------------------------------

FLOAT_SETTINGS = [name for name, default in DEFAULTS.items() if type(default) is float]
NUMBER_SETTINGS = [name for name, default in DEFAULTS.items() if type(default) in (int, float)]
# 0 means none, never or off for these (WORKER_HEARTBEAT_SECONDS is held to its lease instead).
ZERO_ALLOWED = sorted(set(NUMBER_SETTINGS) - AT_LEAST_ONE - ABOVE_ZERO - {"WORKER_HEARTBEAT_SECONDS"})


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_number_that_is_not_finite_is_refused(monkeypatch, raw):
    monkeypatch.setenv("X_NUMBER", raw)
    with pytest.raises(ImproperlyConfigured, match=f"X_NUMBER='{raw}' is not a finite number"):
        env_float("X_NUMBER", 1.0, minimum=0)


def test_an_integer_too_large_for_a_float_is_still_read(monkeypatch):
    monkeypatch.setenv("X_NUMBER", str(10**400))
    assert env_int("X_NUMBER", 1, minimum=1) == 10**400


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_a_nan_number_setting_is_refused_naming_the_variable(monkeypatch, name):
    monkeypatch.setenv(f"FETCHML_{name}", "nan")
    with pytest.raises(ImproperlyConfigured, match=f"FETCHML_{name}='nan' is not a finite number"):
        settings_from_env()


def test_a_nan_number_setting_stops_the_process_at_start_up():
    result = run_manage("check", env={"FETCHML_PRIORITY_AGING_PER_HOUR": "nan"})
    assert result.returncode != 0
    assert "FETCHML_PRIORITY_AGING_PER_HOUR='nan' is not a finite number" in result.stderr


def test_a_scheduler_batch_size_of_zero_is_refused_at_start_up(monkeypatch):
    monkeypatch.setenv("FETCHML_SCHEDULER_BATCH_SIZE", "0")
    with pytest.raises(ImproperlyConfigured, match="FETCHML_SCHEDULER_BATCH_SIZE=0 is below the minimum 1"):
        settings_from_env()


@pytest.mark.parametrize("name", sorted(AT_LEAST_ONE))
def test_a_limit_or_size_of_zero_is_refused_naming_the_variable(monkeypatch, name):
    monkeypatch.setenv(f"FETCHML_{name}", "0")
    with pytest.raises(ImproperlyConfigured, match=f"FETCHML_{name}=0 is below the minimum 1"):
        settings_from_env()


@pytest.mark.parametrize("name", sorted(ABOVE_ZERO))
def test_an_interval_or_time_out_of_zero_is_refused_naming_the_variable(monkeypatch, name):
    monkeypatch.setenv(f"FETCHML_{name}", "0")
    with pytest.raises(ImproperlyConfigured, match=f"FETCHML_{name}=0 must be above 0"):
        settings_from_env()


@pytest.mark.parametrize("name", ZERO_ALLOWED)
def test_zero_is_accepted_where_it_means_none_never_or_off(monkeypatch, name):
    monkeypatch.setenv(f"FETCHML_{name}", "0")
    assert settings_from_env()[f"FETCHML_{name}"] == 0


@pytest.mark.parametrize("name", NUMBER_SETTINGS)
def test_a_negative_number_setting_is_refused_naming_the_variable(monkeypatch, name):
    monkeypatch.setenv(f"FETCHML_{name}", "-1")
    with pytest.raises(ImproperlyConfigured, match=f"FETCHML_{name}"):
        settings_from_env()


DURATIONS = [name for name in NUMBER_SETTINGS if name.endswith(("_SECONDS", "_MINUTES", "_HOURS"))]
TEN_YEARS = {"_SECONDS": 315_360_000, "_MINUTES": 5_256_000, "_HOURS": 87_600}


def _ten_years_in_the_unit_of(name: str) -> int:
    return next(most for unit, most in TEN_YEARS.items() if name.endswith(unit))


@pytest.mark.parametrize("name", DURATIONS)
def test_a_duration_over_ten_years_is_refused_naming_the_variable(monkeypatch, name):
    monkeypatch.setenv(f"FETCHML_{name}", str(_ten_years_in_the_unit_of(name) + 1))
    with pytest.raises(ImproperlyConfigured, match=rf"FETCHML_{name}=.* is above the maximum"):
        settings_from_env()


# The heartbeat is held to a third of the lease besides.
@pytest.mark.parametrize("name", sorted(set(DURATIONS) - {"WORKER_HEARTBEAT_SECONDS"}))
def test_a_duration_of_ten_years_is_accepted(monkeypatch, name):
    monkeypatch.setenv("FETCHML_WORKER_HEARTBEAT_SECONDS", "1")  # at most a third of any lease
    monkeypatch.setenv(f"FETCHML_{name}", str(_ten_years_in_the_unit_of(name)))
    assert settings_from_env()[f"FETCHML_{name}"] == _ten_years_in_the_unit_of(name)


def test_a_priority_aging_rate_past_its_maximum_is_refused(monkeypatch):
    monkeypatch.setenv("FETCHML_PRIORITY_AGING_PER_HOUR", "1e300")
    with pytest.raises(ImproperlyConfigured, match=r"FETCHML_PRIORITY_AGING_PER_HOUR=.* is above the maximum"):
        settings_from_env()


def test_every_bound_names_a_number_setting_of_its_kind():
    assert all(type(DEFAULTS[name]) is int for name in AT_LEAST_ONE)
    assert all(type(DEFAULTS[name]) is float for name in ABOVE_ZERO)


# --- the README's configuration table ---------------------------------------------------


def _readme_configuration_rows() -> list[str]:
    readme = (PROJECT_DIR / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def _documented(variable: str, rows: list[str]) -> bool:
    # A row may list a family by its suffixes: `FETCHML_RATE_LIMIT_POST` / `_GET` / `_OTHER`.
    family, _, suffix = variable.rpartition("_")
    return any(f"`{variable}`" in row or (f"`{family}_" in row and f"`_{suffix}`" in row) for row in rows)


def test_every_fetchml_setting_is_in_the_readme_configuration_table():
    read_by_settings = set(
        re.findall(r"env_\w+\(\s*\"(FETCHML_\w+)\"", (PROJECT_DIR / "fetchml/settings.py").read_text())
    )
    variables = {f"FETCHML_{name}" for name in DEFAULTS} | read_by_settings
    rows = _readme_configuration_rows()
    assert sorted(variable for variable in variables if not _documented(variable, rows)) == []
