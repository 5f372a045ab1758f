import factory
from django.contrib.auth import get_user_model

from fetchml.services import apikey_create


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
