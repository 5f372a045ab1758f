"""Changes to user accounts made in the operator console are in the audit chain (`user_changed`),
with the operator, the request's address and the changed fields, never a password or its hash."""

import json
from datetime import datetime

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils.timezone import localtime

import fetchml.services
from audit.models import AuditEvent
from audit.verification import verify_chain

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple 9"


def user_events() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event_type="user_changed"))


def change_form_data(console, user) -> dict:
    """The user's change form as the admin renders it, ready to post back."""
    form = console.get(reverse("admin:auth_user_change", args=[user.pk])).context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        value = form[name].value()
        if field.disabled or value is None or value is False:
            continue
        if value is True:
            data[name] = "on"
        elif isinstance(value, datetime):  # a split date and time, and its initial value as rendered
            for prefix in ("", "initial-"):
                data[f"{prefix}{name}_0"] = f"{localtime(value):%Y-%m-%d}"
                data[f"{prefix}{name}_1"] = f"{localtime(value):%H:%M:%S}"
        elif isinstance(value, list | tuple):
            data[name] = [str(item) for item in value]
        else:
            data[name] = value
    return data


def save_user(console, user, **changes) -> None:
    data = change_form_data(console, user)
    for name, value in changes.items():
        if value is False:
            data.pop(name, None)
        else:
            data[name] = "on" if value is True else value
    response = console.post(reverse("admin:auth_user_change", args=[user.pk]), data)
    assert response.status_code == 302, response.context["adminform"].form.errors


def test_deactivating_a_user_is_recorded_with_the_operator_address_and_field(console, user):
    save_user(console, user, is_active=False)
    [event] = user_events()
    assert (event.user_id, event.ip_address, event.resource) == ("root", "127.0.0.1", "user:alice")
    assert event.action == "change"
    assert event.metadata == {"changed": ["is_active"], "is_active": False}
    assert not get_user_model().objects.get(pk=user.pk).is_active
    assert verify_chain().valid


def test_granting_staff_and_superuser_status_is_recorded_with_the_new_values(console, user):
    save_user(console, user, is_staff=True, is_superuser=True)
    [event] = user_events()
    assert event.metadata == {"changed": ["is_staff", "is_superuser"], "is_staff": True, "is_superuser": True}


def test_a_renamed_user_is_recorded_under_the_new_name_with_the_old_one(console, user):
    save_user(console, user, username="alicia")
    [event] = user_events()
    assert (event.resource, event.metadata) == ("user:alicia", {"changed": ["username"], "previous_username": "alice"})


def test_a_save_that_changes_nothing_records_nothing(console, user):
    save_user(console, user)
    assert user_events() == []


def test_the_change_and_its_event_commit_together(console, user, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("audit unavailable")

    monkeypatch.setattr(fetchml.services, "record", refuse)
    with pytest.raises(RuntimeError):
        save_user(console, user, is_active=False)
    assert get_user_model().objects.get(pk=user.pk).is_active


def test_adding_a_user_is_recorded_without_the_password(console):
    data = {"username": "newcomer", "usable_password": "true", "password1": PASSWORD, "password2": PASSWORD}
    response = console.post(reverse("admin:auth_user_add"), data)
    assert response.status_code == 302
    [event] = user_events()
    assert (event.user_id, event.ip_address, event.resource, event.action) == (
        "root",
        "127.0.0.1",
        "user:newcomer",
        "create",
    )
    assert event.metadata["changed"] == ["password", "username"]
    assert (event.metadata["is_active"], event.metadata["is_staff"], event.metadata["is_superuser"]) == (
        True,
        False,
        False,
    )
    stored = json.dumps(event.metadata) + event.error
    assert PASSWORD not in stored
    assert get_user_model().objects.get(username="newcomer").password not in stored


def test_setting_a_password_is_recorded_without_the_password_or_its_hash(console, user):
    url = reverse("admin:auth_user_password_change", args=[user.pk])
    response = console.post(url, {"password1": PASSWORD, "password2": PASSWORD, "usable_password": "true"})
    assert response.status_code == 302
    [event] = user_events()
    assert (event.user_id, event.ip_address, event.resource, event.action) == (
        "root",
        "127.0.0.1",
        "user:alice",
        "set_password",
    )
    assert event.metadata == {"changed": ["password"], "usable_password": True}
    stored = json.dumps(event.metadata)
    assert PASSWORD not in stored
    assert get_user_model().objects.get(pk=user.pk).password not in stored


def test_a_refused_password_change_records_nothing(console, user):
    url = reverse("admin:auth_user_password_change", args=[user.pk])
    response = console.post(url, {"password1": PASSWORD, "password2": "something else", "usable_password": "true"})
    assert response.status_code == 200
    assert user_events() == []


def test_deleting_a_user_is_recorded(console, user):
    response = console.post(reverse("admin:auth_user_delete", args=[user.pk]), {"post": "yes"})
    assert response.status_code == 302
    [event] = user_events()
    assert (event.user_id, event.ip_address, event.resource, event.action) == (
        "root",
        "127.0.0.1",
        "user:alice",
        "delete",
    )
    assert not get_user_model().objects.filter(pk=user.pk).exists()


def test_deleting_users_with_the_bulk_action_records_each(console, user, other_user):
    data = {"action": "delete_selected", "_selected_action": [user.pk, other_user.pk], "post": "yes"}
    response = console.post(reverse("admin:auth_user_changelist"), data)
    assert response.status_code == 302
    assert sorted(event.resource for event in user_events()) == ["user:alice", "user:bob"]
    assert not get_user_model().objects.filter(pk__in=[user.pk, other_user.pk]).exists()


def test_the_user_admin_is_the_audited_one():
    from django.contrib import admin

    from fetchml.admin import AuditedUserAdmin

    assert isinstance(admin.site._registry[get_user_model()], AuditedUserAdmin)
