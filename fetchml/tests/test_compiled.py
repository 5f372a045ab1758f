"""Querysets compiled once and run again as raw SQL."""

import pytest
from django.contrib.auth import get_user_model

from fetchml.compiled import compiled_once

pytestmark = pytest.mark.django_db


def test_a_compiled_query_is_built_once_and_sees_the_rows_of_each_run():
    User = get_user_model()
    builds = []

    def build():
        builds.append(1)
        return User.objects.filter(is_active=True).order_by("username")

    active_users = compiled_once(build)
    User.objects.create(username="ada")
    first = [user.username for user in active_users()]
    User.objects.create(username="bob")
    User.objects.create(username="cyd", is_active=False)

    second = [user.username for user in active_users()]

    assert (first, second) == (["ada"], ["ada", "bob"])
    assert len(builds) == 1
