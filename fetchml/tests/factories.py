from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from fetchml.models import ApiKey
from fetchml.services import apikey_create, apikey_revoke


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")


class ApiKeyFactory:
    """Keys are minted by the service (the raw secret exists only at creation)."""

    @staticmethod
    def create(*, user=None, role: str = "user", **kwargs):
        key, _raw = apikey_create(user=user or UserFactory(), role=role, **kwargs)
        return key

    @staticmethod
    def raw(*, user=None, role: str = "user", **kwargs) -> str:
        _key, raw = apikey_create(user=user or UserFactory(), role=role, **kwargs)
        return raw

    @staticmethod
    def pair(*, user=None, role: str = "user", **kwargs):
        return apikey_create(user=user or UserFactory(), role=role, **kwargs)


# --- a key that stops being usable, each way it can ---------------------------------------------


def revoke_key(key: ApiKey) -> None:
    apikey_revoke(api_key=ApiKey.objects.select_related("user").get(pk=key.pk))


def expire_key(key: ApiKey) -> None:
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


def deactivate_key_user(key: ApiKey) -> None:
    type(key.user).objects.filter(pk=key.user_id).update(is_active=False)


def revoke_key_unannounced(key: ApiKey) -> None:
    """Revoked, its message lost on the way (Redis away)."""
    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
