"""The admin shows the audit log and never lets anyone change it."""

import pytest
from django.contrib.admin.sites import site
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.test import Client
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import Entry, record_many
from audit.tests.factories import append_events

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser_client(admin_user) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def test_superusers_have_no_add_change_or_delete_permission(rf, admin_user) -> None:
    model_admin = site._registry[AuditEvent]
    request = rf.get("/")
    request.user = admin_user
    event = AuditEvent(sequence_num=1)
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, event)
    assert not model_admin.has_delete_permission(request, event)
    assert model_admin.has_view_permission(request, event)
    assert "delete_selected" not in model_admin.get_actions(request)


def test_the_list_filters_and_searches(superuser_client) -> None:
    append_events(3, user="carol")
    url = reverse("admin:audit_auditevent_changelist")
    assert superuser_client.get(url, {"event_type__exact": "file_access", "success__exact": "1"}).status_code == 200
    response = superuser_client.get(url, {"q": "carol"})
    assert response.status_code == 200
    assert response.context["cl"].result_count == 3


def test_the_detail_page_is_read_only(superuser_client) -> None:
    append_events(1, user="carol")
    url = reverse("admin:audit_auditevent_change", args=[1])
    page = superuser_client.get(url)
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert superuser_client.post(url, {"user_id": "mallory"}).status_code == 403
    assert AuditEvent.objects.get(sequence_num=1).user_id == "carol"


def test_add_and_delete_pages_are_forbidden(superuser_client) -> None:
    append_events(1)
    assert superuser_client.get(reverse("admin:audit_auditevent_add")).status_code == 403
    delete_url = reverse("admin:audit_auditevent_delete", args=[1])
    assert superuser_client.post(delete_url, {"post": "yes"}).status_code == 403
    assert AuditEvent.objects.filter(sequence_num=1).exists()


def test_a_forged_bulk_delete_deletes_nothing(superuser_client) -> None:
    append_events(2)
    url = reverse("admin:audit_auditevent_changelist")
    response = superuser_client.post(url, {"action": "delete_selected", "_selected_action": ["1", "2"], "post": "yes"})
    assert response.status_code in (200, 302)
    assert AuditEvent.objects.filter(sequence_num__in=[1, 2]).count() == 2


@pytest.mark.parametrize("write", ["save_model", "delete_model", "delete_queryset"])
def test_the_admin_write_hooks_refuse_even_when_called_directly(rf, admin_user, write) -> None:
    append_events(1)
    model_admin = site._registry[AuditEvent]
    request = rf.post("/")
    request.user = admin_user
    event = AuditEvent.objects.get(sequence_num=1)
    arguments = {
        "save_model": (request, event, None, True),
        "delete_model": (request, event),
        "delete_queryset": (request, AuditEvent.objects.all()),
    }[write]
    with pytest.raises(PermissionDenied):
        getattr(model_admin, write)(*arguments)
    assert AuditEvent.objects.filter(sequence_num=1).exists()


def test_the_list_finds_an_event_by_its_sequence_number(superuser_client) -> None:
    append_events(12, user="carol")  # resources file:data/0.csv .. file:data/11.csv
    response = superuser_client.get(reverse("admin:audit_auditevent_changelist"), {"q": "12"})
    assert [event.sequence_num for event in response.context["cl"].result_list] == [12]


def test_the_list_finds_events_by_the_start_of_an_ip_address(superuser_client) -> None:
    with transaction.atomic():
        record_many(
            [
                Entry(event_type="auth_attempt", user="carol", action="authenticate", ip_address="203.0.113.9"),
                Entry(event_type="auth_attempt", user="dave", action="authenticate", ip_address="198.51.100.7"),
            ]
        )
    response = superuser_client.get(reverse("admin:audit_auditevent_changelist"), {"q": "203.0.113."})
    assert [event.user_id for event in response.context["cl"].result_list] == ["carol"]
