"""manage.py bootstrap_local: where it says the admin password and key are kept."""

import os
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def _bootstrap() -> str:
    out = StringIO()
    call_command("bootstrap_local", stdout=out)
    return out.getvalue()


def test_the_admin_files_are_named_by_their_real_path_when_var_dir_is_elsewhere(settings, tmp_path, monkeypatch):
    settings.VAR_DIR = tmp_path / "state"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    printed = _bootstrap()

    assert f"(stored in {tmp_path / 'state' / 'admin-password'})" in printed
    assert f"(stored in {tmp_path / 'state' / 'admin.key'})" in printed
    assert (tmp_path / "state" / "admin.key").exists()


def test_the_admin_files_are_named_relative_to_the_current_directory_when_inside_it(settings, tmp_path, monkeypatch):
    # `make run`: FETCHML_VAR_DIR is ./var of the checkout it runs in, as the README shows.
    settings.VAR_DIR = tmp_path / "var"
    monkeypatch.chdir(tmp_path)

    printed = _bootstrap()

    assert "(stored in var/admin-password)" in printed
    assert "(stored in var/admin.key)" in printed
    assert Path(os.getcwd(), "var", "admin-password").exists()
