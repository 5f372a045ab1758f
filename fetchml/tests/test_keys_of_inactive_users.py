"""A deactivated user's keys are refused (401): everything that tells whether a key works says so."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from fetchml.models import ApiKey
from fetchml.tests.factories import ApiKeyFactory, UserFactory, deactivate_key_user

pytestmark = pytest.mark.django_db

KEYS_URL = reverse("admin:fetchml_apikey_changelist")


def test_a_key_of_a_deactivated_user_is_not_usable(user):
    key = ApiKeyFactory.create(user=user)
    deactivate_key_user(key)
    assert ApiKey.objects.select_related("user").get(pk=key.pk).is_usable is False


def test_the_admin_key_list_shows_a_deactivated_users_key_as_not_usable(console, user):
    deactivate_key_user(ApiKeyFactory.create(user=user))
    page = console.get(KEYS_URL).content.decode()
    assert 'alt="False"' in page
    assert 'alt="True"' not in page


def test_createapikey_refuses_an_inactive_user():
    UserFactory(username="frank", is_active=False)
    with pytest.raises(CommandError, match="frank is inactive"):
        call_command("createapikey", "frank", stdout=(out := StringIO()), stderr=StringIO())
    assert out.getvalue() == ""
    assert not ApiKey.objects.exists()


def test_the_admin_refuses_to_create_a_key_for_an_inactive_user(console):
    frank = UserFactory(username="frank", is_active=False)
    data = {"user": frank.pk, "role": "user", "name": "", "expires_at_0": "", "expires_at_1": ""}
    response = console.post(reverse("admin:fetchml_apikey_add"), data)
    assert response.status_code == 200
    assert "inactive" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_the_admin_refuses_an_admin_key_for_a_user_who_is_not_staff(console):
    frank = UserFactory(username="frank")
    data = {"user": frank.pk, "role": "admin", "name": "", "expires_at_0": "", "expires_at_1": ""}
    response = console.post(reverse("admin:fetchml_apikey_add"), data)
    assert response.status_code == 200
    assert "staff user" in response.content.decode()
    assert not ApiKey.objects.exists()
