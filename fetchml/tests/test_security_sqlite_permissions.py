"""The embedded mode's SQLite database (session keys, task env secrets, plugin settings) is readable
by its owner only, under any umask: the var directory settings create is 0700, the database 0600,
and SQLite gives its -wal and -shm files the database's permissions."""

import json
import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

PROJECT_DIR = Path(settings.BASE_DIR)

# Settings are read at start-up: a fresh process, umask 022, that writes a row (so the -wal and
# -shm files exist) and prints the mode of the database's directory and of everything in it while
# it is connected.
WRITE_AND_LIST = """
import json, os, stat
from pathlib import Path
os.umask(0o022)
import django
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("CREATE TABLE IF NOT EXISTS t (x TEXT)")
    cursor.execute("INSERT INTO t VALUES ('secret')")
folder = Path(connection.settings_dict["NAME"]).parent
modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [folder, *folder.iterdir()]}
print(json.dumps(modes))
"""


def modes_after_a_write(var_dir: Path, **env: str) -> dict[str, int]:
    clean = {
        "PATH": os.environ.get("PATH", ""),
        "DJANGO_SETTINGS_MODULE": "fetchml.settings",
        "FETCHML_VAR_DIR": str(var_dir),
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", WRITE_AND_LIST], cwd=PROJECT_DIR, env=clean, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_new_var_dir_is_0700_and_the_database_and_its_wal_and_shm_files_0600(tmp_path):
    var_dir = tmp_path / "var"
    modes = modes_after_a_write(var_dir)
    assert modes["var"] == 0o700
    assert {name: modes[name] for name in ("fetchml.sqlite3", "fetchml.sqlite3-wal", "fetchml.sqlite3-shm")} == {
        "fetchml.sqlite3": 0o600,
        "fetchml.sqlite3-wal": 0o600,
        "fetchml.sqlite3-shm": 0o600,
    }
    assert modes["secret_key"] == 0o600


def test_a_database_left_readable_is_narrowed_but_the_operators_var_dir_is_kept(tmp_path):
    var_dir = tmp_path / "var"
    var_dir.mkdir(mode=0o755)
    var_dir.chmod(0o755)
    modes_after_a_write(var_dir)  # made the database and the secret key
    database = var_dir / "fetchml.sqlite3"
    for path in (database, var_dir / "fetchml.sqlite3-wal"):
        path.touch()
        path.chmod(0o644)
    modes = modes_after_a_write(var_dir)
    assert modes["var"] == 0o755
    assert modes["fetchml.sqlite3"] == modes["fetchml.sqlite3-wal"] == modes["fetchml.sqlite3-shm"] == 0o600


def test_a_database_named_by_database_url_is_made_0600(tmp_path):
    elsewhere = tmp_path / "db"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    database = elsewhere / "fetchml.sqlite3"
    modes = modes_after_a_write(tmp_path / "var", DATABASE_URL=f"sqlite:///{database}", DJANGO_SECRET_KEY="x" * 50)
    assert modes == {"db": 0o755, "fetchml.sqlite3": 0o600, "fetchml.sqlite3-wal": 0o600, "fetchml.sqlite3-shm": 0o600}


def test_a_postgresql_set_up_makes_no_var_dir_and_no_database_file(tmp_path):
    var_dir = tmp_path / "var"
    code = "import django; django.setup(); print('ok')"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DJANGO_SETTINGS_MODULE": "fetchml.settings",
        "FETCHML_VAR_DIR": str(var_dir),
        "DATABASE_URL": "postgres://fetchml@127.0.0.1:5432/fetchml",
        "DJANGO_SECRET_KEY": "x" * 50,
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert not var_dir.exists()
