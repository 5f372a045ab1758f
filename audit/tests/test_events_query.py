"""GET /v1/audit/events: a bad query value is a 400 in the standard error format, never a 500."""

import pytest

pytestmark = pytest.mark.django_db

EVENTS = "/v1/audit/events"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "ten"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"offset": "-0.5"}, "offset"),
        ({"to": "2025-02-30T00:00:00Z"}, "to"),
        ({"from": "9999-12-31T23:59:59-12:00"}, "from"),  # past the last representable UTC time
        ({"to": "0001-01-01T00:00:00+05:00"}, "to"),  # before the first one
        ({"from": "2026-01-01T00:00:00"}, "from"),  # no time zone: whose midnight?
        ({"to": "2026-01-01T00:00:00"}, "to"),
        ({"event_type": "JOB_QUEUED"}, "event_type"),
        ({"user_id": "a\x00b"}, "user_id"),
        ({"user_id": "u" * 151}, "user_id"),
    ],
)
def test_a_bad_query_value_is_a_400_naming_the_parameter(admin_client_key, params, field) -> None:
    response = admin_client_key.get(EVENTS, params)
    assert response.status_code == 400, response.content
    body = response.json()
    assert (body["code"], bool(body["trace_id"])) == ("BAD_REQUEST", True)
    assert body["error"] == f"Invalid query parameters: {field}"
    assert [detail["field"] for detail in body["details"]] == [field]
    assert body["details"][0]["message"]
