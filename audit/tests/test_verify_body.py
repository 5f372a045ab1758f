"""POST /v1/audit/verify takes no body or a strict one, refused as every other body is."""

import json

import pytest

from audit.models import AuditEvent
from audit.tests.factories import append_events

pytestmark = pytest.mark.django_db

VERIFY = "/v1/audit/verify"
ROOT = "/v1/audit/chain-root"
HASH = "a" * 64


@pytest.fixture
def admin(admin_client_key):
    return admin_client_key


def verifications() -> int:
    return AuditEvent.objects.filter(event_type="audit_verified").count()


def assert_refused(response, *fields: str) -> None:
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["code"] == "VALIDATION_ERROR" and body["trace_id"]
    assert [detail["field"] for detail in body["details"]] == list(fields)
    assert verifications() == 0  # refused before the chain is walked


def test_a_request_without_a_body_verifies_the_chain(admin) -> None:
    append_events(2)
    response = admin.post(VERIFY)
    assert response.status_code == 200
    assert response.json()["valid"] is True


def test_a_json_request_with_an_empty_body_verifies_the_chain(admin) -> None:
    response = admin.generic("POST", VERIFY, "", content_type="application/json")
    assert response.status_code == 200


@pytest.mark.parametrize("body", [{}, {"checkpoint": None}])
def test_an_empty_object_or_a_null_checkpoint_verifies_the_chain(admin, body) -> None:
    response = admin.post(VERIFY, body, format="json")
    assert response.status_code == 200
    assert response.json()["checkpoint_checked"] is False


def test_an_unknown_field_is_refused_by_name(admin) -> None:
    response = admin.post(VERIFY, {"checkpiont": {"sequence_num": 1, "root_hash": HASH}}, format="json")
    assert_refused(response, "checkpiont")
    assert response.json()["details"][0]["message"] == "Unknown field."


def test_an_unknown_field_inside_the_checkpoint_is_refused_by_name(admin) -> None:
    response = admin.post(VERIFY, {"checkpoint": {"sequence_num": 0, "root_hash": HASH, "seq": 5}}, format="json")
    assert_refused(response, "checkpoint.seq")


@pytest.mark.parametrize("body", [[], ["checkpoint"], "checkpoint", 1, True, None])
def test_a_body_that_is_not_an_object_is_refused(admin, body) -> None:
    response = admin.generic("POST", VERIFY, json.dumps(body), content_type="application/json")
    assert response.status_code == 422, response.content
    assert response.json()["code"] == "VALIDATION_ERROR"
    assert verifications() == 0


@pytest.mark.parametrize("checkpoint", ["latest", 5, [], True])
def test_a_checkpoint_that_is_not_an_object_is_refused(admin, checkpoint) -> None:
    assert_refused(admin.post(VERIFY, {"checkpoint": checkpoint}, format="json"), "checkpoint")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sequence_num", "5"),
        ("sequence_num", 5.0),
        ("sequence_num", True),
        ("root_hash", 1234),
        ("root_hash", HASH + "\n"),
        ("root_hash", HASH.upper()),
        ("timestamp", 1700000000),
        ("timestamp", "2025-01-01T00:00:00"),
        ("signature", 0),
        ("signature", ["a" * 64]),
        ("total_events", "5"),
        ("signature_algorithm", "MD5"),
        ("warnings", "unsigned"),
        ("warnings", [1]),
    ],
)
def test_a_checkpoint_field_of_the_wrong_type_or_form_is_refused(admin, field, value) -> None:
    checkpoint = {"sequence_num": 0, "root_hash": HASH, field: value}
    response = admin.post(VERIFY, {"checkpoint": checkpoint}, format="json")
    assert response.status_code == 422, response.content
    named = [detail["field"] for detail in response.json()["details"]]
    assert named and all(name.startswith(f"checkpoint.{field}") for name in named), named


def test_an_unsigned_chain_root_posted_back_as_it_came_is_accepted(admin, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = ""
    append_events(3)
    checkpoint = admin.get(ROOT).json()
    assert {"total_events", "signature_algorithm", "warnings"} <= set(checkpoint)
    response = admin.post(VERIFY, {"checkpoint": checkpoint}, format="json")
    assert response.status_code == 200, response.content
    assert (response.json()["valid"], response.json()["checkpoint_checked"]) == (True, True)


def test_malformed_json_is_a_bad_request(admin) -> None:
    response = admin.generic("POST", VERIFY, "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["code"] == "BAD_REQUEST"
