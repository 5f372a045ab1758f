"""X-API-Key authentication, roles, revocation, expiry, sessions and the audit of failures."""

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from conftest import KeyClient
from fetchml import apikeys
from fetchml.auth import usable_api_keys
from fetchml.models import ApiKey
from fetchml.services import apikey_revoke
from fetchml.tests.factories import ApiKeyFactory, UserFactory

pytestmark = [pytest.mark.urls("fetchml.tests.urls"), pytest.mark.django_db]
ENDPOINT = "/v1/test/echo"


def assert_unauthorized(response) -> None:
    assert response.status_code == 401, response.content
    assert response.json()["code"] == "UNAUTHORIZED"
    assert "X-API-Key" in response["WWW-Authenticate"]


def failed_attempts() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event_type="auth_attempt", success=False))


def test_minted_key_has_the_documented_shape():
    minted = apikeys.mint()
    marker, prefix, secret = minted.raw.split("_")
    assert marker == "fetchml"
    assert prefix == minted.prefix
    assert apikeys.split(minted.raw) == (prefix, secret)


def test_only_the_prefix_and_a_hash_of_the_secret_are_stored(user):
    key, raw = ApiKeyFactory.pair(user=user)
    secret = raw.split("_")[2]
    stored = ApiKey.objects.filter(pk=key.pk).values().get()
    assert all(secret not in str(value) for value in stored.values())
    assert stored["secret_hash"] == apikeys.hash_secret(secret)


def test_secrets_are_compared_in_constant_time():
    with mock.patch("fetchml.apikeys.hmac.compare_digest", return_value=True) as compare:
        assert apikeys.secret_matches("s" * 40, "h" * 64)
    compare.assert_called_once()


def test_a_valid_key_authenticates_as_its_user(user_client):
    response = user_client.get(ENDPOINT)
    assert response.status_code == 200
    assert response.json() == {"user": "alice"}


def test_missing_key_is_unauthorized(anon_client):
    assert_unauthorized(anon_client.get(ENDPOINT))


@pytest.mark.parametrize(
    "raw",
    ["", "garbage", "fetchml_short_secret", "token_abcdefghij_" + "a" * 40, "fetchml_abcdefghij_" + "a" * 40],
)
def test_malformed_or_unknown_key_is_unauthorized(raw):
    assert_unauthorized(KeyClient(raw).get(ENDPOINT))


def test_right_prefix_with_a_wrong_secret_is_unauthorized(user):
    raw = ApiKeyFactory.raw(user=user)
    forged = raw[:-1] + ("x" if raw[-1] != "x" else "y")
    assert_unauthorized(KeyClient(forged).get(ENDPOINT))


def test_revoked_key_is_unauthorized(user):
    key, raw = ApiKeyFactory.pair(user=user)
    assert KeyClient(raw).get(ENDPOINT).status_code == 200
    apikey_revoke(api_key=key)
    assert_unauthorized(KeyClient(raw).get(ENDPOINT))


def test_expired_key_is_unauthorized(user):
    key, raw = ApiKeyFactory.pair(user=user, expires_at=timezone.now() + timedelta(hours=1))
    assert KeyClient(raw).get(ENDPOINT).status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert_unauthorized(KeyClient(raw).get(ENDPOINT))


def test_key_of_a_deactivated_user_is_unauthorized(user):
    raw = ApiKeyFactory.raw(user=user)
    user.is_active = False
    user.save(update_fields=["is_active"])
    assert_unauthorized(KeyClient(raw).get(ENDPOINT))


def test_failed_attempt_is_audited_with_success_false(db):
    KeyClient("fetchml_abcdefghij_" + "a" * 40).get(ENDPOINT, REMOTE_ADDR="198.51.100.7")
    [event] = failed_attempts()
    assert event.action == "authenticate"
    assert event.ip_address == "198.51.100.7"
    assert event.error


def test_failed_attempt_with_a_revoked_key_names_the_key_and_its_owner(user):
    key, raw = ApiKeyFactory.pair(user=user)
    apikey_revoke(api_key=key)
    KeyClient(raw).get(ENDPOINT)
    [event] = failed_attempts()
    assert event.user_id == "alice"
    assert event.resource == f"api_key:{key.prefix}"


def test_successful_use_is_audited_once_per_interval_and_updates_last_used(user):
    key, raw = ApiKeyFactory.pair(user=user)
    client = KeyClient(raw)
    client.get(ENDPOINT)
    client.get(ENDPOINT)
    successes = AuditEvent.objects.filter(event_type="auth_attempt", success=True)
    assert successes.count() == 1
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_worker_key_is_forbidden_on_a_human_endpoint(worker_key):
    response = KeyClient(worker_key).get(ENDPOINT)
    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


def test_user_key_is_forbidden_on_an_admin_endpoint(user_client):
    response = user_client.get("/v1/test/admin-only")
    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


def test_admin_key_passes_an_admin_endpoint(admin_client_key):
    assert admin_client_key.get("/v1/test/admin-only").status_code == 200


def test_admin_endpoint_without_a_key_is_unauthorized_not_forbidden(anon_client):
    assert_unauthorized(anon_client.get("/v1/test/admin-only"))


def test_logged_in_superuser_can_browse_the_api_with_a_session(client):
    client.force_login(UserFactory(username="operator", is_staff=True, is_superuser=True))
    response = client.get(ENDPOINT, HTTP_ACCEPT="text/html")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    assert client.get("/v1/test/admin-only").status_code == 200


def test_a_staff_session_without_superuser_status_is_a_user_on_the_api(client):
    client.force_login(UserFactory(username="helpdesk", is_staff=True))
    assert client.get(ENDPOINT).status_code == 200
    assert client.get("/v1/test/admin-only").status_code == 403


def test_an_admin_key_of_a_user_no_longer_staff_is_unauthorized(db):
    raw = ApiKeyFactory.raw(user=UserFactory(username="ops", is_staff=True), role=ApiKey.Role.ADMIN)
    assert KeyClient(raw).get("/v1/test/admin-only").status_code == 200
    UserFactory._meta.model.objects.filter(username="ops").update(is_staff=False)
    assert_unauthorized(KeyClient(raw).get("/v1/test/admin-only"))


def test_staff_user_can_use_the_admin_with_a_session(client):
    client.force_login(UserFactory(username="operator", is_staff=True, is_superuser=True))
    response = client.get("/admin/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")


def test_session_post_still_requires_csrf(db):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(UserFactory(username="operator"))
    response = client.post(ENDPOINT, {"name": "x"}, content_type="application/json")
    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


@pytest.mark.parametrize("path", ["/health", "/v1/schema", "/v1/docs"])
def test_public_endpoints_need_no_key(anon_client, path):
    assert anon_client.get(path).status_code == 200


def test_usability_of_several_keys_is_read_at_once(user, django_assert_num_queries):
    good, _ = ApiKeyFactory.pair(user=user)
    revoked, _ = ApiKeyFactory.pair(user=user)
    apikey_revoke(api_key=revoked)
    expired, _ = ApiKeyFactory.pair(user=user)
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    idle_user = UserFactory(is_active=False)
    of_inactive, _ = ApiKeyFactory.pair(user=idle_user)
    missing = "00000000-0000-0000-0000-000000000000"
    ids = [str(key.pk) for key in (good, revoked, expired, of_inactive)] + [missing]
    with django_assert_num_queries(1):
        usable = usable_api_keys(ids)
    assert usable == {ids[0]: True, ids[1]: False, ids[2]: False, ids[3]: False, missing: False}
