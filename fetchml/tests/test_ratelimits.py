"""Rate limits per verified API key and method class; failed authentications per client IP."""

import time

import pytest
from django.core.cache import cache
from django.test import override_settings

from conftest import KeyClient
from fetchml.ratelimits import consume_request
from fetchml.testing import ThreadedGate
from fetchml.tests.factories import ApiKeyFactory, UserFactory

pytestmark = [pytest.mark.urls("fetchml.tests.urls"), pytest.mark.django_db]
ENDPOINT = "/v1/test/echo"
BAD_KEY = "fetchml_abcdefghij_" + "a" * 40


def assert_rate_limited(response) -> None:
    assert response.status_code == 429, response.content
    assert response.json()["code"] == "RATE_LIMITED"
    assert 1 <= int(response["Retry-After"]) <= 60


def test_authenticated_responses_carry_rate_limit_headers(user_client):
    before = int(time.time())
    response = user_client.get(ENDPOINT)
    assert response["X-RateLimit-Limit"] == "300"
    assert response["X-RateLimit-Remaining"] == "299"
    assert before <= int(response["X-RateLimit-Reset"]) <= before + 61


def test_error_responses_of_authenticated_requests_carry_rate_limit_headers(user_client):
    response = user_client.get("/v1/test/admin-only")
    assert response.status_code == 403
    assert response["X-RateLimit-Remaining"] == "299"


@override_settings(FETCHML_RATE_LIMIT_GET="2/m")
def test_worker_keys_are_not_rate_limited(worker_key):
    # A fleet shares its key and its requests follow the work it is given: never a 429.
    responses = [KeyClient(worker_key).get(ENDPOINT) for _ in range(5)]
    assert [response.status_code for response in responses] == [403] * 5  # refused here for its role only
    assert "X-RateLimit-Limit" not in responses[-1]


def test_unauthenticated_responses_have_no_rate_limit_headers(anon_client):
    assert "X-RateLimit-Limit" not in anon_client.get(ENDPOINT)


@override_settings(FETCHML_RATE_LIMIT_GET="3/m")
def test_burst_over_the_get_limit_is_rate_limited(user_client):
    remaining = [user_client.get(ENDPOINT)["X-RateLimit-Remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    response = user_client.get(ENDPOINT)
    assert_rate_limited(response)
    assert response["X-RateLimit-Remaining"] == "0"


@override_settings(FETCHML_RATE_LIMIT_POST="2/m", FETCHML_RATE_LIMIT_GET="5/m", FETCHML_RATE_LIMIT_OTHER="1/m")
def test_each_method_class_has_its_own_limit(user_client):
    for _ in range(2):
        assert user_client.post(ENDPOINT, {"name": "x"}, format="json").status_code == 201
    assert_rate_limited(user_client.post(ENDPOINT, {"name": "x"}, format="json"))
    assert user_client.get(ENDPOINT)["X-RateLimit-Limit"] == "5"
    assert user_client.delete(ENDPOINT).status_code == 204
    assert_rate_limited(user_client.delete(ENDPOINT))


@override_settings(FETCHML_RATE_LIMIT_GET="2/m")
def test_varying_client_headers_does_not_reset_the_count(user_client):
    for n in range(2):
        assert user_client.get(ENDPOINT, HTTP_X_FORWARDED_FOR=f"10.0.0.{n}").status_code == 200
    assert_rate_limited(
        user_client.get(
            ENDPOINT,
            HTTP_X_FORWARDED_FOR="10.9.9.9",
            HTTP_X_REAL_IP="10.9.9.9",
            HTTP_USER_AGENT="other",
            HTTP_X_REQUEST_ID="fresh-request-id",
            REMOTE_ADDR="192.0.2.99",
        )
    )


@override_settings(FETCHML_RATE_LIMIT_GET="2/m")
def test_two_keys_of_the_same_user_have_separate_counters(user):
    first, second = KeyClient(ApiKeyFactory.raw(user=user)), KeyClient(ApiKeyFactory.raw(user=user))
    for _ in range(2):
        assert first.get(ENDPOINT).status_code == 200
    assert_rate_limited(first.get(ENDPOINT))
    assert second.get(ENDPOINT).status_code == 200


@override_settings(FETCHML_RATE_LIMIT_GET="2/m")
def test_a_logged_in_session_is_limited_per_user(client):
    client.force_login(UserFactory(username="operator"))
    assert [client.get(ENDPOINT).status_code for _ in range(2)] == [200, 200]
    assert_rate_limited(client.get(ENDPOINT))


@override_settings(FETCHML_RATE_LIMIT_GET="2/m")
def test_the_counter_lives_in_the_shared_cache(user):
    key, raw = ApiKeyFactory.pair(user=user)
    client = KeyClient(raw)
    assert client.get(ENDPOINT).status_code == 200
    # Another server process sees the same counter: count through the cache directly.
    consume_request(f"key:{key.id}", "GET")
    assert_rate_limited(client.get(ENDPOINT))
    cache.clear()
    assert client.get(ENDPOINT).status_code == 200


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="3/m")
def test_failed_authentications_are_limited_per_client_ip(user):
    valid = KeyClient(ApiKeyFactory.raw(user=user))
    for _ in range(3):
        assert KeyClient(BAD_KEY).get(ENDPOINT, REMOTE_ADDR="203.0.113.5").status_code == 401
    assert_rate_limited(KeyClient(BAD_KEY).get(ENDPOINT, REMOTE_ADDR="203.0.113.5"))
    assert valid.get(ENDPOINT, REMOTE_ADDR="203.0.113.6").status_code == 200


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="3/m")
def test_a_valid_key_gets_through_from_an_address_whose_failed_authentications_ran_out(user):
    # One client's typos behind a shared NAT or proxy must not lock out the others, nor the workers.
    for _ in range(4):
        KeyClient(BAD_KEY).get(ENDPOINT, REMOTE_ADDR="203.0.113.5")
    assert KeyClient(ApiKeyFactory.raw(user=user)).get(ENDPOINT, REMOTE_ADDR="203.0.113.5").status_code == 200
    assert_rate_limited(KeyClient(BAD_KEY).get(ENDPOINT, REMOTE_ADDR="203.0.113.5"))


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="2/m")
def test_varying_forwarded_for_does_not_escape_the_auth_failure_limit(db):
    for n in range(2):
        KeyClient(BAD_KEY).get(ENDPOINT, HTTP_X_FORWARDED_FOR=f"10.0.0.{n}")
    assert_rate_limited(KeyClient(BAD_KEY).get(ENDPOINT, HTTP_X_FORWARDED_FOR="10.0.0.99"))


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="2/m")
def test_refused_attempts_over_the_limit_are_not_audited_again(db):
    from audit.models import AuditEvent

    for _ in range(5):
        KeyClient(BAD_KEY).get(ENDPOINT)
    assert AuditEvent.objects.filter(event_type="auth_attempt", success=False).count() == 2


@override_settings(FETCHML_RATE_LIMIT_AUTH_FAILURES="1/m")
def test_successful_requests_do_not_count_as_auth_failures(user_client):
    for _ in range(3):
        assert user_client.get(ENDPOINT).status_code == 200
    assert KeyClient(BAD_KEY).get(ENDPOINT).status_code == 401


@pytest.fixture
def unreachable_cache():
    """The shared cache is a Redis that no longer answers: a port nothing listens on."""
    from fetchml.testing import HOST, free_port

    location = f"redis://{HOST}:{free_port()}/0"
    with override_settings(
        CACHES={"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": location}}
    ):
        yield


def test_requests_go_on_uncounted_while_the_shared_cache_is_unreachable(user_client, unreachable_cache):
    response = user_client.get(ENDPOINT)

    assert response.status_code == 200
    assert "X-RateLimit-Limit" not in response


def test_a_bad_key_is_still_refused_while_the_shared_cache_is_unreachable(db, unreachable_cache):
    response = KeyClient(BAD_KEY).get(ENDPOINT)

    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"


def test_each_successful_key_use_is_audited_while_the_shared_cache_is_unreachable(user_client, unreachable_cache):
    from audit.models import AuditEvent

    for _ in range(2):
        assert user_client.get(ENDPOINT).status_code == 200

    assert AuditEvent.objects.filter(event_type="auth_attempt", success=True).count() == 2


@pytest.fixture
def silent_cache(settings):
    """The shared cache, with the project's options, is a Redis that went silent: the connection
    stays open and nothing comes back (`ThreadedGate.mute`)."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis: set REDIS_URL=redis://... (CI always does)")
    with (
        ThreadedGate(settings.REDIS_URL) as gate,
        override_settings(CACHES={"default": {**settings.CACHES["default"], "LOCATION": gate.url}}),
    ):
        gate.mute()
        yield gate


# A request waits on the silent cache only as long as the socket time-out (settings): were that bound
# lost, the test fails after 30 s instead of hanging the run.
@pytest.mark.timeout(30)
def test_requests_go_on_uncounted_while_the_shared_cache_is_silent(user_client, silent_cache):
    response = user_client.get(ENDPOINT)

    assert response.status_code == 200
    assert "X-RateLimit-Limit" not in response


@pytest.mark.timeout(30)
def test_after_the_silent_cache_failed_a_request_the_next_ones_leave_it_alone(user_client, silent_cache):
    user_client.get(ENDPOINT)
    asked = silent_cache.swallowed

    assert user_client.get(ENDPOINT).status_code == 200
    assert silent_cache.swallowed == asked
