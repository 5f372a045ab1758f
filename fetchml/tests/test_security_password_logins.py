"""Password logins (/admin/login/ and the browsable API's /api-auth/login/) are held to the per-IP
limit on failed authentications that API keys have (each counted on its own), and audited as
`auth_attempt` like them."""

import logging
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from audit.models import AuditEvent
from conftest import KeyClient

pytestmark = pytest.mark.django_db

LOGIN_PATHS = ["/admin/login/", "/api-auth/login/"]
PASSWORD = "right-horse-battery-staple"
WRONG = "wrong-password-never-stored"
IP = "203.0.113.5"
THROTTLED = b"Too many failed login attempts from your address"
INVALID = b"correct username and password"  # the admin's words and the plain form's


@pytest.fixture(autouse=True)
def _fast_hashing(settings):
    """Dozens of logins: a fast hasher, not PBKDF2's 250 ms apiece."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def operator(db):
    return get_user_model().objects.create_user(username="root", password=PASSWORD, is_staff=True, is_superuser=True)


def log_in(client: Client, path: str, password: str, *, ip: str = IP, username: str = "root"):
    return client.post(path, {"username": username, "password": password, "next": "/admin/"}, REMOTE_ADDR=ip)


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def auth_events(**filters) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event_type="auth_attempt", **filters))


@pytest.mark.parametrize("path", LOGIN_PATHS)
def test_a_wrong_password_is_audited_as_a_failed_auth_attempt_without_the_password(operator, path, caplog):
    caplog.set_level(logging.DEBUG)
    client = Client()
    response = log_in(client, path, WRONG)
    assert response.status_code == 200 and INVALID in response.content
    [event] = auth_events()
    assert (event.success, event.resource, event.action, event.ip_address, event.user_id) == (
        False,
        "user:root",
        "login",
        IP,
        "",
    )
    assert event.metadata == {"path": path}
    stored = " ".join(str(value) for value in AuditEvent.objects.values_list().get(pk=event.pk))
    assert WRONG not in stored
    assert WRONG not in caplog.text


@pytest.mark.parametrize("path", LOGIN_PATHS)
def test_a_successful_login_is_audited_as_an_auth_attempt(operator, path):
    client = Client()
    response = log_in(client, path, PASSWORD)
    assert response.status_code == 302 and logged_in(client)
    [event] = auth_events()
    assert (event.success, event.user_id, event.resource, event.ip_address) == (True, "root", "user:root", IP)
    assert PASSWORD not in str(event.metadata) + event.error


@pytest.mark.parametrize("path", LOGIN_PATHS)
def test_thirty_wrong_passwords_in_a_row_are_refused_after_the_limit(operator, path):
    client = Client()
    answers = [log_in(client, path, f"{WRONG}-{n}") for n in range(30)]
    assert all(answer.status_code == 200 for answer in answers)
    assert all(INVALID in answer.content for answer in answers[:20])  # FETCHML_RATE_LIMIT_AUTH_FAILURES: 20/m
    assert all(THROTTLED in answer.content for answer in answers[20:])
    # Attempts refused by the limit are neither checked nor audited again.
    assert len(auth_events(success=False)) == 20


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="3/m")
@pytest.mark.parametrize("path", LOGIN_PATHS)
def test_over_the_limit_even_the_right_password_is_refused_from_that_address_only(operator, path):
    client = Client()
    for _ in range(3):
        log_in(client, path, WRONG)
    response = log_in(client, path, PASSWORD)
    assert response.status_code == 200 and THROTTLED in response.content
    assert not logged_in(client)
    assert auth_events(success=True) == []
    other = Client()
    assert log_in(other, path, PASSWORD, ip="203.0.113.6").status_code == 302
    assert logged_in(other)


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="3/m")
def test_the_right_password_logs_in_again_once_the_window_has_passed(operator, monkeypatch):
    import django_ratelimit.core

    now = [django_ratelimit.core.time.time()]
    monkeypatch.setattr(django_ratelimit.core, "time", SimpleNamespace(time=lambda: now[0]))
    client = Client()
    for _ in range(3):
        log_in(client, "/admin/login/", WRONG)
    assert THROTTLED in log_in(client, "/admin/login/", PASSWORD).content
    now[0] += 61
    assert log_in(client, "/admin/login/", PASSWORD).status_code == 302
    assert logged_in(client)


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="3/m")
@pytest.mark.parametrize("path", LOGIN_PATHS)
def test_wrong_api_keys_from_an_address_do_not_lock_its_password_logins_out(operator, path):
    # A broken script or a scanner sending junk keys from behind the operators' address.
    junk = KeyClient("fetchml_nosuchkey_" + "x" * 43)
    for _ in range(3):
        assert junk.get("/v1/tasks", REMOTE_ADDR=IP).status_code == 401
    assert junk.get("/v1/tasks", REMOTE_ADDR=IP).status_code == 429
    client = Client()
    log_in(client, path, PASSWORD)
    assert logged_in(client)


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="2/m")
def test_wrong_passwords_from_an_address_do_not_refuse_its_api_keys(operator):
    client = Client()
    for _ in range(2):
        log_in(client, "/api-auth/login/", WRONG)
    assert KeyClient("fetchml_nosuchkey_" + "x" * 43).get("/v1/tasks", REMOTE_ADDR=IP).status_code == 401
