"""createapikey as an operator runs it: a real process, exit status and output."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from fetchml import apikeys


def run_command(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if connection.vendor == "sqlite":
        # The child process must write to this run's test database, not the real one.
        env["DATABASE_URL"] = "sqlite:///" + str(Path(connection.settings_dict["NAME"]).resolve())
    else:
        db = connection.settings_dict
        env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    # Any DATABASE_URL means "not embedded", where a secret key is required.
    env.setdefault("DJANGO_SECRET_KEY", "test")
    return subprocess.run(
        [sys.executable, "manage.py", "createapikey", *args],
        cwd=Path(settings.BASE_DIR),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.django_db(transaction=True)
def test_the_command_prints_the_key_as_the_last_line_and_exits_zero():
    result = run_command("ivy", "--role", "worker")
    assert result.returncode == 0, result.stderr
    raw = result.stdout.strip().splitlines()[-1]
    from fetchml.models import ApiKey

    key = ApiKey.objects.get(prefix=apikeys.split(raw)[0])
    assert (key.user.username, key.role) == ("ivy", "worker")


@pytest.mark.django_db(transaction=True)
def test_a_bad_role_exits_non_zero():
    result = run_command("ivy", "--role", "superuser")
    assert result.returncode != 0
    assert "invalid choice" in result.stderr
