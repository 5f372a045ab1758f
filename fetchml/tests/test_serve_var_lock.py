"""One `manage.py serve` per FETCHML_VAR_DIR in the embedded mode: a second one is refused, saying which
process holds the directory; the lock goes with the process that held it, however it ended."""

import os
from pathlib import Path

import pytest
from django.core.management import CommandError

from fetchml.management.commands.serve import LOCK_FILE, lock_var_dir
from fetchml.testing import free_port
from fetchml.tests.test_serve_command import _manage, _Serve


@pytest.fixture
def serves():
    """Start `_Serve`s on a var dir; every one still running is stopped at the end."""
    started: list[_Serve] = []

    def start(var_dir: Path) -> _Serve:
        started.append(_Serve(var_dir))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def test_the_var_dir_lock_refuses_a_second_holder_naming_the_first_and_is_free_once_closed(tmp_path: Path) -> None:
    held = lock_var_dir(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(CommandError, match=f"another FetchML \\(pid {os.getpid()}\\) is running on {tmp_path}"):
            lock_var_dir(tmp_path)
    finally:
        os.close(held)

    again = lock_var_dir(tmp_path)
    os.close(again)


@pytest.mark.e2e
def test_a_second_serve_on_the_same_var_dir_is_refused_naming_the_first(tmp_path: Path, serves) -> None:
    first = serves(tmp_path)
    first.wait_for("Health:")

    second = _manage(tmp_path, "serve", "--port", str(free_port()), "--workers", "0")

    assert second.returncode != 0
    assert f"another FetchML (pid {first.process.pid}) is running on {tmp_path}" in second.stderr
    assert f"kill {first.process.pid}" in second.stderr
    assert "FETCHML_VAR_DIR" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.process.poll() is None
    assert first.stop() == 0
