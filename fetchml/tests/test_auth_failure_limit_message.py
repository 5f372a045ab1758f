"""The 429 of the per-address limit on failed authentications says what it is (not a key's request limit)."""

import pytest
from django.test import override_settings

from conftest import KeyClient
from fetchml.tests.factories import ApiKeyFactory

pytestmark = [pytest.mark.urls("fetchml.tests.urls"), pytest.mark.django_db]
ENDPOINT = "/v1/test/echo"
BAD_KEY = "fetchml_abcdefghij_" + "a" * 40
ADDRESS = "203.0.113.5"


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="3/m")
def test_the_failed_authentication_limit_says_so_with_its_wait(db):
    for _ in range(3):
        assert KeyClient(BAD_KEY).get(ENDPOINT, REMOTE_ADDR=ADDRESS).status_code == 401
    response = KeyClient(BAD_KEY).get(ENDPOINT, REMOTE_ADDR=ADDRESS)
    assert (response.status_code, response.json()["code"]) == (429, "RATE_LIMITED")
    wait = int(response["Retry-After"])
    assert response.json()["error"] == (
        f"Too many failed authentication attempts from this address; try again in {wait} s"
    )


@override_settings(FETCHML_RATE_LIMIT_GET="1/m")
def test_a_keys_own_request_limit_keeps_the_generic_message(user):
    client = KeyClient(ApiKeyFactory.raw(user=user))
    client.get(ENDPOINT)
    response = client.get(ENDPOINT)
    assert (response.status_code, response.json()["error"]) == (429, "Rate limit exceeded")


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="3/m")
def test_a_stream_says_what_the_failed_authentication_limit_is_too(db):
    for _ in range(3):
        KeyClient(BAD_KEY).get(ENDPOINT, REMOTE_ADDR=ADDRESS)

    response = KeyClient(BAD_KEY).get("/v1/scheduler/status/stream", REMOTE_ADDR=ADDRESS)

    assert response.status_code == 429
    assert response.json()["error"].startswith("Too many failed authentication attempts from this address")
