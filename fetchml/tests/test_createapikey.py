"""manage.py createapikey USERNAME [--role user|admin|worker] [--name NAME] [--expires-in-days N]."""

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from conftest import KeyClient
from fetchml import apikeys
from fetchml.models import ApiKey
from fetchml.tests.factories import UserFactory

pytestmark = [pytest.mark.urls("fetchml.tests.urls"), pytest.mark.django_db]


def create_key(*args: str) -> str:
    """Runs the command; returns the last line of everything it printed."""
    out, err = StringIO(), StringIO()
    call_command("createapikey", *args, stdout=out, stderr=err)
    lines = (err.getvalue() + out.getvalue()).strip().splitlines()
    return lines[-1]


def test_creates_the_user_if_missing_and_prints_a_working_key_last():
    raw = create_key("carol")
    assert apikeys.split(raw) is not None
    user = get_user_model().objects.get(username="carol")
    assert not user.has_usable_password()
    assert not user.is_staff
    response = KeyClient(raw).get("/v1/test/echo")
    assert response.status_code == 200
    assert response.json() == {"user": "carol"}


def test_the_key_is_the_last_line_of_stdout():
    out = StringIO()
    call_command("createapikey", "carol", stdout=out, stderr=StringIO())
    assert apikeys.split(out.getvalue().strip().splitlines()[-1]) is not None


def test_reuses_an_existing_user():
    existing = UserFactory(username="dave")
    create_key("dave")
    assert ApiKey.objects.get().user == existing
    assert get_user_model().objects.filter(username="dave").count() == 1


def test_role_and_name_are_stored():
    raw = create_key("agent-7", "--role", "worker", "--name", "gpu-box-7")
    key = ApiKey.objects.get(prefix=apikeys.split(raw)[0])
    assert (key.role, key.name, key.user.username) == ("worker", "gpu-box-7", "agent-7")


def test_admin_role_makes_the_user_staff():
    UserFactory(username="erin")
    raw = create_key("erin", "--role", "admin")
    assert get_user_model().objects.get(username="erin").is_staff
    assert KeyClient(raw).get("/v1/test/admin-only").status_code == 200


def test_user_role_is_the_default_and_not_admin():
    raw = create_key("frank")
    assert ApiKey.objects.get().role == "user"
    assert KeyClient(raw).get("/v1/test/admin-only").status_code == 403


def test_a_bad_role_is_refused():
    with pytest.raises(CommandError, match="role"):
        call_command("createapikey", "gina", "--role", "root", stdout=StringIO(), stderr=StringIO())
    assert not get_user_model().objects.filter(username="gina").exists()


def test_a_blank_username_is_refused():
    with pytest.raises(CommandError, match="USERNAME"):
        call_command("createapikey", " ", stdout=StringIO(), stderr=StringIO())


def test_creation_is_audited_as_the_consoles_not_as_the_owners():
    from audit.models import AuditEvent

    create_key("hank", "--name", "laptop")
    event = AuditEvent.objects.get(event_type="api_key_created")
    assert event.metadata["owner"] == "hank"
    assert event.metadata["name"] == "laptop"
    assert event.user_id == ""  # hank did not mint his own key: an operator did, at the console


@pytest.mark.parametrize("username", ["bad user!!", "x" * 151, ""])
def test_a_username_the_user_model_refuses_is_a_usage_error(username):
    with pytest.raises(CommandError, match="is not a valid username"):
        call_command("createapikey", username, stdout=StringIO(), stderr=StringIO())
    assert not get_user_model().objects.exists()


def test_a_key_name_longer_than_the_column_is_refused_not_cut():
    with pytest.raises(CommandError, match="--name must be at most 100 characters"):
        call_command("createapikey", "ivy", "--name", "n" * 101, stdout=StringIO(), stderr=StringIO())
    assert not ApiKey.objects.exists()


def test_bootstrap_local_refuses_an_empty_username(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    with pytest.raises(CommandError, match="--username '' is not a valid username"):
        call_command("bootstrap_local", "--username", "", stdout=StringIO())
    assert not get_user_model().objects.exists()


def _stderr_of(*args: str) -> str:
    err = StringIO()
    call_command("createapikey", *args, stdout=StringIO(), stderr=err)
    return err.getvalue()


def test_a_key_of_another_role_on_one_account_is_pointed_out():
    create_key("fleet", "--role", "worker")

    said = _stderr_of("fleet", "--role", "user")

    assert "Note: fleet also has live worker key(s); this user key acts as the same user." in said


def test_a_second_key_of_the_same_role_is_not_pointed_out():
    create_key("alice")

    assert "Note:" not in _stderr_of("alice")


def test_expires_in_days_sets_when_the_key_stops_working():
    raw = create_key("alice", "--expires-in-days", "30")

    key = ApiKey.objects.get(prefix=apikeys.split(raw)[0])
    assert key.expires_at is not None
    assert 29.9 < (key.expires_at - key.created_at).total_seconds() / 86400 <= 30


@pytest.mark.parametrize("days", ["0", "-3"])
def test_expires_in_days_below_one_is_a_usage_error(days):
    with pytest.raises(CommandError, match="--expires-in-days must be 1 or more"):
        create_key("alice", "--expires-in-days", days)


@pytest.mark.parametrize("days", ["36501", "100000000"])
def test_expires_in_days_past_a_hundred_years_is_a_usage_error(days):
    with pytest.raises(CommandError, match="--expires-in-days must be at most 36500"):
        create_key("alice", "--expires-in-days", days)
    assert not ApiKey.objects.exists()


def test_a_key_may_expire_in_a_hundred_years():
    raw = create_key("alice", "--expires-in-days", "36500")

    key = ApiKey.objects.get(prefix=apikeys.split(raw)[0])
    # expires_at is computed a moment before the row's created_at.
    assert 36499.9 < (key.expires_at - key.created_at).total_seconds() / 86400 <= 36500
