"""The audit API: admin only, filters and paging, verification, chain root."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from audit.checkpoints import signed_message
from audit.models import AuditEvent
from audit.services import record
from audit.tests import tampering
from audit.tests.factories import append_events

pytestmark = pytest.mark.django_db

EVENTS = "/v1/audit/events"
VERIFY = "/v1/audit/verify"
ROOT = "/v1/audit/chain-root"
KEY = "s" * 48


@pytest.fixture
def admin(admin_client_key):
    return admin_client_key


@pytest.mark.parametrize(("method", "url"), [("get", EVENTS), ("post", VERIFY), ("get", ROOT)])
def test_every_audit_endpoint_is_forbidden_to_user_keys(user_client, method, url) -> None:
    response = getattr(user_client, method)(url)
    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


@pytest.mark.parametrize(("method", "url"), [("get", EVENTS), ("post", VERIFY), ("get", ROOT)])
def test_every_audit_endpoint_needs_a_key(anon_client, method, url) -> None:
    response = getattr(anon_client, method)(url)
    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"


def test_worker_keys_are_forbidden(worker_key) -> None:
    from conftest import KeyClient

    assert KeyClient(worker_key).get(EVENTS).status_code == 403


def test_events_lists_the_chain_in_order_with_the_spec_fields(admin) -> None:
    append_events(3, user="carol")
    body = admin.get(EVENTS).json()
    assert set(body) == {"events", "total", "limit", "offset"}
    assert (body["limit"], body["offset"]) == (100, 0)
    assert body["total"] == AuditEvent.objects.count()
    sequence = [e["sequence_num"] for e in body["events"]]
    assert sequence == sorted(sequence)
    first = next(e for e in body["events"] if e["user_id"] == "carol")
    assert set(first) == {
        "timestamp",
        "event_type",
        "user_id",
        "resource",
        "action",
        "success",
        "ip_address",
        "error",
        "prev_hash",
        "event_hash",
        "sequence_num",
        "metadata",
    }
    assert first["timestamp"].endswith("Z") and len(first["timestamp"]) == 27
    assert first["metadata"] == {"bytes": 0}


def test_events_filter_by_event_type_and_user(admin) -> None:
    append_events(2, user="carol", event_type="file_access")
    append_events(3, user="dave", event_type="job_queued")
    body = admin.get(EVENTS, {"event_type": "job_queued", "user_id": "dave"}).json()
    assert body["total"] == 3
    assert {(e["event_type"], e["user_id"]) for e in body["events"]} == {("job_queued", "dave")}


def test_events_filter_by_resource(admin) -> None:
    append_events(3, user="carol")
    body = admin.get(EVENTS, {"resource": "file:data/1.csv"}).json()
    assert body["total"] == 1
    assert [e["resource"] for e in body["events"]] == ["file:data/1.csv"]


def test_events_filter_by_time_range_inclusive(admin) -> None:
    append_events(2, user="carol")
    stamp = AuditEvent.objects.filter(user_id="carol").first().timestamp
    inside = admin.get(EVENTS, {"from": stamp.isoformat(), "to": stamp.isoformat(), "user_id": "carol"}).json()
    assert inside["total"] == 2
    later = (stamp + timedelta(microseconds=1)).isoformat()
    assert admin.get(EVENTS, {"from": later, "user_id": "carol"}).json()["total"] == 0


def test_events_page_with_limit_and_offset(admin) -> None:
    append_events(10, user="carol")
    page = admin.get(EVENTS, {"user_id": "carol", "limit": 3, "offset": 4}).json()
    assert (page["total"], page["limit"], page["offset"]) == (10, 3, 4)
    assert [e["resource"] for e in page["events"]] == [f"file:data/{i}.csv" for i in (4, 5, 6)]


def test_limit_of_1000_is_accepted(admin) -> None:
    assert admin.get(EVENTS, {"limit": 1000}).status_code == 200


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 1001}, "limit"),
        ({"limit": 0}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": 2**63}, "offset"),  # past the databases' integers: an error of the query, not a 500
        ({"from": "yesterday"}, "from"),
        ({"event_type": "job_exploded"}, "event_type"),
    ],
)
def test_bad_query_parameters_are_400_with_the_standard_error(admin, params, field) -> None:
    response = admin.get(EVENTS, params)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "BAD_REQUEST" and body["trace_id"]
    assert [d["field"] for d in body["details"]] == [field]


def test_from_after_to_is_400(admin) -> None:
    now = timezone.now()
    response = admin.get(EVENTS, {"from": now.isoformat(), "to": (now - timedelta(hours=1)).isoformat()})
    assert response.status_code == 400


def test_verify_reports_a_valid_chain_and_records_audit_verified(admin) -> None:
    append_events(5)
    body = admin.post(VERIFY).json()
    assert body["valid"] is True and body["first_tampered"] is None
    assert body["verified_at"]
    recorded = AuditEvent.objects.latest("sequence_num")  # appended after the walk
    assert (recorded.event_type, recorded.user_id, recorded.success) == ("audit_verified", "root", True)
    walked = recorded.sequence_num - 1
    assert body["total_events"] == recorded.metadata["total_events"] == walked
    assert body["chain_root_hash"] == AuditEvent.objects.get(sequence_num=walked).event_hash


def test_verify_reports_the_first_tampered_event(admin) -> None:
    append_events(6)
    tampered = AuditEvent.objects.order_by("sequence_num").values_list("sequence_num", flat=True)[3]
    tampering.set_field(tampered, "action", "write")
    body = admin.post(VERIFY).json()
    assert (body["valid"], body["first_tampered"]) == (False, tampered)
    assert AuditEvent.objects.filter(event_type="audit_verified", success=False).exists()


def test_verify_without_a_key_says_roots_are_unsigned(admin, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = ""
    warnings = admin.post(VERIFY).json()["warnings"]
    assert any("FETCHML_AUDIT_SIGNING_KEY is not set" in w for w in warnings)


def test_chain_root_is_the_newest_event(admin) -> None:
    append_events(4)
    body = admin.get(ROOT).json()
    last = AuditEvent.objects.order_by("-sequence_num").first()  # includes this request's auth_attempt
    assert (body["root_hash"], body["total_events"], body["sequence_num"]) == (
        last.event_hash,
        last.sequence_num,
        last.sequence_num,
    )
    assert body["timestamp"].endswith("Z")


def test_chain_root_without_a_key_is_unsigned_and_says_so(admin, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = ""
    body = admin.get(ROOT).json()
    assert body["signature"] is None
    assert any("not signed" in w for w in body["warnings"])


def test_chain_root_with_a_key_carries_an_hmac_of_the_root(admin, settings) -> None:
    import hashlib
    import hmac

    from django.utils.dateparse import parse_datetime

    settings.FETCHML_AUDIT_SIGNING_KEY = KEY
    body = admin.get(ROOT).json()
    message = signed_message(
        sequence_num=body["sequence_num"], root_hash=body["root_hash"], timestamp=parse_datetime(body["timestamp"])
    )
    assert body["signature"] == hmac.new(KEY.encode(), message, hashlib.sha256).hexdigest()
    assert (body["signature_algorithm"], body["warnings"]) == ("HMAC-SHA256", [])


def test_a_saved_chain_root_posted_back_verifies_while_the_chain_is_intact(admin, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = KEY
    append_events(5)
    checkpoint = admin.get(ROOT).json()
    append_events(5)
    body = admin.post(VERIFY, {"checkpoint": checkpoint}, format="json").json()
    assert (body["valid"], body["checkpoint_checked"], body["checkpoint_signature_verified"]) == (True, True, True)


def test_a_recomputed_chain_fails_against_the_saved_chain_root(admin, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = KEY
    append_events(5)
    checkpoint = admin.get(ROOT).json()
    tampering.rehash_from(1, user_id="mallory")
    body = admin.post(VERIFY, {"checkpoint": checkpoint}, format="json").json()
    assert (body["valid"], body["first_tampered"]) == (False, checkpoint["sequence_num"])


def test_a_wrong_checkpoint_before_a_later_tampered_event_is_reported_first_and_checked(admin) -> None:
    append_events(3)
    checkpoint = {**admin.get(ROOT).json(), "root_hash": "f" * 64}
    append_events(5)
    tampering.set_field(AuditEvent.objects.latest("sequence_num").sequence_num, "action", "write")
    body = admin.post(VERIFY, {"checkpoint": checkpoint}, format="json").json()
    assert (body["valid"], body["first_tampered"], body["checkpoint_checked"]) == (
        False,
        checkpoint["sequence_num"],
        True,
    )


def test_a_checkpoint_past_the_first_tampered_event_is_not_reported_as_checked(admin) -> None:
    append_events(3)
    tampered = AuditEvent.objects.latest("sequence_num").sequence_num
    append_events(3)
    checkpoint = admin.get(ROOT).json()
    tampering.set_field(tampered, "action", "write")
    body = admin.post(VERIFY, {"checkpoint": checkpoint}, format="json").json()
    assert (body["valid"], body["first_tampered"], body["checkpoint_checked"]) == (False, tampered, False)


def test_a_checkpoint_with_a_forged_signature_is_refused(admin, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = KEY
    checkpoint = {**admin.get(ROOT).json(), "signature": "0" * 64}
    response = admin.post(VERIFY, {"checkpoint": checkpoint}, format="json")
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "checkpoint.signature"


def test_a_malformed_checkpoint_is_refused(admin) -> None:
    response = admin.post(VERIFY, {"checkpoint": {"sequence_num": -1, "root_hash": "xyz"}}, format="json")
    assert response.status_code == 422
    assert {d["field"] for d in response.json()["details"]} == {"checkpoint.sequence_num", "checkpoint.root_hash"}


def test_a_failed_authentication_leaves_an_auth_attempt_event(anon_client) -> None:
    anon_client.credentials(HTTP_X_API_KEY="fetchml_nope_wrongsecret", REMOTE_ADDR="203.0.113.9")
    assert anon_client.get(EVENTS).status_code == 401
    event = AuditEvent.objects.filter(event_type="auth_attempt").latest("sequence_num")
    assert (event.success, event.ip_address) == (False, "203.0.113.9")
    assert event.error


def test_schema_documents_the_audit_operations(anon_client) -> None:
    schema = anon_client.get("/v1/schema", HTTP_ACCEPT="application/json").json()
    paths = schema["paths"]
    events_ok = paths["/v1/audit/events"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert events_ok == {"$ref": "#/components/schemas/AuditEventList"}
    assert "400" in paths["/v1/audit/events"]["get"]["responses"]
    params = {p["name"] for p in paths["/v1/audit/events"]["get"]["parameters"]}
    assert {"from", "to", "event_type", "user_id", "limit", "offset"} <= params
    verify_ok = paths["/v1/audit/verify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert verify_ok == {"$ref": "#/components/schemas/VerificationResult"}
    root = paths["/v1/audit/chain-root"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    root_fields = schema["components"]["schemas"][root["$ref"].rsplit("/", 1)[1]]["properties"]
    assert {"root_hash", "timestamp", "total_events", "signature"} <= set(root_fields)


def test_record_used_by_other_apps_appears_in_the_list(admin) -> None:
    with transaction.atomic():
        record(event_type="scheduler_drain", user="root", resource="worker:w1", action="drain")
    body = admin.get(EVENTS, {"event_type": "scheduler_drain"}).json()
    assert [e["resource"] for e in body["events"]] == ["worker:w1"]
