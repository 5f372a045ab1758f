"""The secret of an API key created in the admin is shown once, from the session: no cookie carries it
(Django's default message storage would put it in a signed, readable `messages` cookie)."""

import pytest
from django.contrib.messages.storage.cookie import CookieStorage
from django.http import HttpRequest
from django.urls import reverse

from fetchml import apikeys
from fetchml.models import ApiKey

pytestmark = pytest.mark.django_db

KEYS_URL = reverse("admin:fetchml_apikey_changelist")


def readable(cookie_value: str) -> str:
    """A cookie's value as anyone holding it can read it: as sent, and decoded as a messages cookie
    (signed and compressed, not encrypted)."""
    messages = CookieStorage(HttpRequest())._decode(cookie_value) or []
    return " ".join([cookie_value, *(str(message) for message in messages)])


def raw_keys_in(response) -> list[str]:
    words = [word for message in response.context["messages"] for word in str(message).split()]
    return [word for word in words if apikeys.split(word) is not None]


def test_the_created_keys_secret_is_in_no_cookie_and_shown_once(console, user):
    data = {"user": user.pk, "role": "user", "name": "laptop", "expires_at_0": "", "expires_at_1": ""}
    created = console.post(reverse("admin:fetchml_apikey_add"), data)
    assert created.status_code == 302
    shown = console.get(created.url)
    [raw] = raw_keys_in(shown)
    assert apikeys.split(raw)[0] == ApiKey.objects.get(user=user).prefix
    for response in (created, shown):
        assert "messages" not in response.cookies
        assert not [name for name, cookie in response.cookies.items() if raw in readable(cookie.value)]
    assert "messages" not in console.cookies
    assert raw_keys_in(console.get(KEYS_URL)) == []  # once only
    assert raw.encode() not in console.get(KEYS_URL).content
