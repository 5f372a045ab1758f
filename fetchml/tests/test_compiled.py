"""Querysets compiled once and run again as raw SQL."""

from datetime import datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from conftest import requires_postgres
from fetchml.compiled import compiled_count_per_shape, compiled_once, compiled_per_shape, compiled_update_per_shape
from tasks.models import Task

pytestmark = pytest.mark.django_db


def _counting(build):
    """`build`, noting each call in the list returned with it."""
    builds = []

    def counted(**values):
        builds.append(1)
        return build(**values)

    return counted, builds


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


def test_rows_of_a_compiled_query_are_instances_as_the_orm_loads_them():
    from django.db.models import F

    from scheduler.tests.factories import queued_task
    from tasks.models import Task

    task = queued_task(env={"SEED": "1"}, job_name="resnet")
    chosen = compiled_once(
        lambda: Task.objects.only("id", "env", "queued_at").annotate(owner_name=F("owner__username"))
    )

    [row] = chosen()

    assert (row.id, row.env, row.queued_at, row.owner_name) == (
        task.id,
        {"SEED": "1"},
        task.queued_at,
        task.owner.username,
    )
    assert "job_name" in row.get_deferred_fields()
    assert row.job_name == "resnet"  # a field left out is loaded when read, as after only()


def _users(*names: str):
    """The user model, with a user of each name."""
    User = get_user_model()
    for name in names:
        User.objects.create(username=name)
    return User


def _joined_by(*, names: list[str], before: datetime):
    return get_user_model().objects.filter(username__in=names, date_joined__lt=before).order_by("username")


def test_a_query_compiled_per_shape_runs_again_with_new_values():
    _users("ada", "bob", "cyd")
    joined = compiled_per_shape(_joined_by)
    later = timezone.now() + timedelta(minutes=1)

    first = [user.username for user in joined(names=["ada", "bob"], before=later)]
    second = [user.username for user in joined(names=["bob", "cyd"], before=later)]
    third = [user.username for user in joined(names=["ada", "bob", "cyd"], before=later)]
    none_yet = [user.username for user in joined(names=["ada", "bob"], before=later - timedelta(days=1))]
    empty = list(joined(names=[], before=later))

    assert (first, second, third, none_yet, empty) == (["ada", "bob"], ["bob", "cyd"], ["ada", "bob", "cyd"], [], [])


@requires_postgres
@pytest.mark.parametrize("compiled", [compiled_per_shape, compiled_count_per_shape])
def test_on_postgresql_a_query_is_built_once_per_shape(compiled):
    build, builds = _counting(_joined_by)
    run = compiled(build)
    later = timezone.now()
    for names in (["ada"], ["bob"], ["ada", "bob"], ["cyd", "dan"]):
        run(names=names, before=later)  # on PostgreSQL a compiled query runs when called

    assert len(builds) == 2  # one list of one name, one of two


@requires_postgres
def test_on_postgresql_lists_up_to_the_same_power_of_two_share_one_compiled_query():
    User = get_user_model()
    for name in ("ada", "bob", "cyd", "dan", "eve"):
        User.objects.create(username=name)
    build, builds = _counting(_joined_by)
    joined = compiled_per_shape(build)
    later = timezone.now() + timedelta(minutes=1)

    three = [user.username for user in joined(names=["ada", "bob", "cyd"], before=later)]
    four = [user.username for user in joined(names=["bob", "cyd", "dan", "eve"], before=later)]

    assert (three, four) == (["ada", "bob", "cyd"], ["bob", "cyd", "dan", "eve"])
    assert len(builds) == 1


@requires_postgres
def test_on_postgresql_dispatch_rounds_run_the_compiled_task_claim(monkeypatch):
    from scheduler import dispatch
    from scheduler.tests.factories import queued_task, worker

    counted, builds = _counting(dispatch._claim_tasks_queryset)
    monkeypatch.setattr(dispatch, "_compiled_claim", compiled_per_shape(counted))
    worker(batch_slots=100)  # the claim's LIMIT stays the batch size
    for _ in range(3):
        queued_task()
        assert dispatch.dispatch_round() == 1

    assert len(builds) == 1


def _renamed(*, names: list[str], to: str, joined: datetime):
    return get_user_model().objects.filter(username__in=names), {"first_name": to, "date_joined": joined}


def test_an_update_compiled_per_shape_changes_the_rows_of_each_call_and_counts_them():
    User = _users("ada", "bob", "cyd")
    rename = compiled_update_per_shape(_renamed)
    now = timezone.now()

    counts = (rename(names=["ada", "bob"], to="A", joined=now), rename(names=["bob", "cyd"], to="B", joined=now))

    assert counts == (2, 2)
    assert dict(User.objects.values_list("username", "first_name")) == {"ada": "A", "bob": "B", "cyd": "B"}


def test_an_update_with_a_value_it_cannot_mark_is_run_by_django():
    User = get_user_model()
    User.objects.create(username="ada", last_login=timezone.now())
    forget = compiled_update_per_shape(
        lambda *, names, when: (User.objects.filter(username__in=names), {"last_login": when})
    )

    assert forget(names=["ada"], when=None) == 1
    assert User.objects.get(username="ada").last_login is None


@requires_postgres
def test_on_postgresql_an_update_is_built_once_per_shape():
    User = _users("ada", "bob", "cyd")
    build, builds = _counting(_renamed)
    rename = compiled_update_per_shape(build)
    now = timezone.now()
    for names in (["ada"], ["bob"], ["ada", "bob"], ["bob", "cyd"]):
        rename(names=names, to=names[-1].upper(), joined=now)

    assert len(builds) == 2
    assert dict(User.objects.values_list("username", "first_name")) == {"ada": "BOB", "bob": "CYD", "cyd": "CYD"}


@requires_postgres
def test_on_postgresql_an_update_of_a_padded_list_counts_each_row_once():
    _users("ada", "bob", "cyd")
    rename = compiled_update_per_shape(_renamed)

    assert rename(names=["ada", "bob", "cyd"], to="A", joined=timezone.now()) == 3


@requires_postgres
def test_on_postgresql_an_update_filtered_through_a_relation_is_left_to_django():
    from fetchml.tests.factories import ApiKeyFactory

    ApiKeyFactory.create(user=get_user_model().objects.create(username="ada"), name="laptop")
    ApiKeyFactory.create(user=get_user_model().objects.create(username="bob"), name="cluster")
    deactivate = compiled_update_per_shape(
        lambda *, key_names: (get_user_model().objects.filter(api_keys__name__in=key_names), {"is_active": False})
    )

    assert deactivate(key_names=["laptop"]) == 1
    assert dict(get_user_model().objects.values_list("username", "is_active")) == {"ada": False, "bob": True}


def test_a_count_compiled_per_shape_counts_the_rows_of_each_call():
    _users("ada", "bob", "cyd")
    count = compiled_count_per_shape(_joined_by)
    later = timezone.now() + timedelta(minutes=1)

    counts = [count(names=names, before=later) for names in (["ada", "bob"], ["cyd"], ["ada", "bob", "cyd"], [])]

    assert counts == [2, 1, 3, 0]
    assert count(names=["ada"], before=later - timedelta(days=1)) == 0


@requires_postgres
def test_on_postgresql_a_value_compared_with_a_small_integer_column_is_marked():
    build, builds = _counting(lambda *, priority: Task.objects.filter(priority__gte=priority))
    count = compiled_count_per_shape(build)

    counts = [count(priority=priority) for priority in (1, 5, 9)]

    assert (counts, len(builds)) == ([0, 0, 0], 1)


def test_rows_of_a_compiled_query_are_saved_as_rows_already_in_the_database():
    from scheduler.tests.factories import queued_task

    task = queued_task(job_name="resnet")
    chosen = compiled_once(lambda: Task.objects.only("id", "priority"))

    [row] = chosen()
    row.priority = 7
    row.save(update_fields=["priority"])

    assert row._state.adding is False
    assert row._state.db == "default"
    assert Task.objects.get(id=task.id).priority == 7
    assert Task.objects.count() == 1  # an UPDATE, not an INSERT


def test_rows_of_a_compiled_query_are_built_by_from_db_while_a_model_has_init_listeners():
    from django.db.models.signals import post_init

    from scheduler.tests.factories import queued_task

    queued_task()
    chosen = compiled_once(lambda: Task.objects.only("id", "status"))
    initialised = []

    def listener(sender, instance, **kwargs):
        initialised.append(instance)

    post_init.connect(listener, sender=Task)
    try:
        [row] = chosen()
    finally:
        post_init.disconnect(listener, sender=Task)

    assert initialised == [row]


@requires_postgres
@pytest.mark.parametrize("key", ["username", "id"])
def test_on_postgresql_a_list_travels_as_one_array_parameter(key):
    from django.db import connection

    User = _users("ada", "bob", "cyd", "dan", "eve")
    chosen = {user.username: getattr(user, key) for user in User.objects.filter(username__in=["bob", "dan", "eve"])}
    run = compiled_per_shape(lambda *, keys: User.objects.filter(**{f"{key}__in": keys}).order_by("username"))
    statements = []

    def capture(execute, sql, params, many, context):
        statements.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(capture):
        found = [user.username for user in run(keys=list(chosen.values()))]

    assert found == ["bob", "dan", "eve"]
    [(sql, params)] = statements
    assert "= ANY(" in sql and " IN (" not in sql
    assert len(params) == 1


@requires_postgres
def test_on_postgresql_a_single_value_matched_with_in_stays_a_parameter_of_its_own():
    User = _users("ada", "bob")
    ids = dict(User.objects.values_list("username", "id"))
    run = compiled_per_shape(lambda *, key: User.objects.filter(id__in=[key]))

    assert [user.username for user in run(key=ids["bob"])] == ["bob"]
    assert [user.username for user in run(key=ids["ada"])] == ["ada"]
