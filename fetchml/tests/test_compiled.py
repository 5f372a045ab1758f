"""Querysets compiled once and run again as raw SQL."""

from datetime import datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from conftest import requires_postgres
from fetchml.compiled import compiled_once, compiled_per_shape

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


def _joined_by(*, names: list[str], before: datetime):
    return get_user_model().objects.filter(username__in=names, date_joined__lt=before).order_by("username")


def test_a_query_compiled_per_shape_runs_again_with_new_values():
    User = get_user_model()
    for name in ("ada", "bob", "cyd"):
        User.objects.create(username=name)
    joined = compiled_per_shape(_joined_by)
    later = timezone.now() + timedelta(minutes=1)

    first = [user.username for user in joined(names=["ada", "bob"], before=later)]
    second = [user.username for user in joined(names=["bob", "cyd"], before=later)]
    third = [user.username for user in joined(names=["ada", "bob", "cyd"], before=later)]
    none_yet = [user.username for user in joined(names=["ada", "bob"], before=later - timedelta(days=1))]
    empty = list(joined(names=[], before=later))

    assert (first, second, third, none_yet, empty) == (["ada", "bob"], ["bob", "cyd"], ["ada", "bob", "cyd"], [], [])


@requires_postgres
def test_on_postgresql_a_query_is_built_once_per_shape():
    builds = []

    def build(**values):
        builds.append(1)
        return _joined_by(**values)

    joined = compiled_per_shape(build)
    later = timezone.now()
    for names in (["ada"], ["bob"], ["ada", "bob"], ["cyd", "dan"]):
        list(joined(names=names, before=later))

    assert len(builds) == 2  # one list of one name, one of two


@requires_postgres
def test_on_postgresql_dispatch_rounds_run_the_compiled_task_claim(monkeypatch):
    from scheduler import dispatch
    from scheduler.tests.factories import queued_task, worker

    builds = []

    def counted(**values):
        builds.append(1)
        return dispatch._claim_tasks_queryset(**values)

    monkeypatch.setattr(dispatch, "_compiled_claim", compiled_per_shape(counted))
    worker(batch_slots=3)
    for _ in range(3):
        queued_task()
        assert dispatch.dispatch_round() == 1

    assert len(builds) == 1
