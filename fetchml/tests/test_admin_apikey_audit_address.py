"""API keys created and revoked in the operator console are audited with the request's address,
as the console's other actions (cancel, re-queue, drain) are."""

import pytest
from django.urls import reverse

from audit.models import AuditEvent
from fetchml.models import ApiKey
from fetchml.tests.factories import ApiKeyFactory

pytestmark = pytest.mark.django_db

KEYS_URL = reverse("admin:fetchml_apikey_changelist")


def test_a_key_created_in_the_admin_is_audited_with_the_operators_address(console, user):
    data = {"user": user.pk, "role": "user", "name": "laptop", "expires_at_0": "", "expires_at_1": ""}
    response = console.post(reverse("admin:fetchml_apikey_add"), data, REMOTE_ADDR="198.51.100.7")
    assert response.status_code == 302
    event = AuditEvent.objects.get(event_type="api_key_created", resource=f"api_key:{ApiKey.objects.get().prefix}")
    assert (event.user_id, event.ip_address) == ("root", "198.51.100.7")


def test_a_key_revoked_in_the_admin_is_audited_with_the_operators_address(console, user):
    key = ApiKeyFactory.create(user=user)
    data = {"action": "revoke_keys", "_selected_action": [str(key.pk)]}
    response = console.post(KEYS_URL, data, REMOTE_ADDR="198.51.100.7")
    assert response.status_code == 302
    event = AuditEvent.objects.get(event_type="api_key_revoked")
    assert (event.user_id, event.ip_address) == ("root", "198.51.100.7")
