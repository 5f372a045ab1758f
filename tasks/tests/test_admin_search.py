"""The operator console finds rows by what an operator types (usernames, names, ids),
filters them, and lists a page in a fixed number of queries."""

import uuid

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from audit.tests.factories import append_events
from fetchml.tests.factories import ApiKeyFactory, UserFactory
from jupyter.models import JupyterService
from plugins.models import PluginConfig
from tasks.models import Task
from tasks.states import TaskStatus
from tasks.tests.factories import ExperimentFactory, ReservationFactory, TaskFactory, WorkerFactory

pytestmark = pytest.mark.django_db

TASKS_URL = reverse("admin:tasks_task_changelist")


def found(console: Client, model: str, **params: str) -> set:
    response = console.get(reverse(f"admin:{model}_changelist"), params)
    assert response.status_code == 200
    return {row.pk for row in response.context["cl"].result_list}


def task_with_id(prefix: str, **fields) -> Task:
    return TaskFactory(id=uuid.UUID(prefix.ljust(32, "0")), **fields)


# --- tasks -------------------------------------------------------------------------------------


def test_task_search_by_owner_username_finds_their_tasks(console) -> None:
    carol = UserFactory(username="carol")
    wanted = {TaskFactory(owner=carol).pk, TaskFactory(owner=carol).pk}
    TaskFactory(owner=UserFactory(username="dave"))
    assert found(console, "tasks_task", q="carol") == wanted


def test_task_search_by_part_of_a_username_finds_the_task(console) -> None:
    wanted = TaskFactory(owner=UserFactory(username="carol.smith"))
    TaskFactory(owner=UserFactory(username="dave"))
    assert found(console, "tasks_task", q="smith") == {wanted.pk}


def test_task_search_by_worker_name_finds_the_tasks_it_ran(console) -> None:
    wanted = TaskFactory(worker=WorkerFactory(name="gpu-node-17"))
    TaskFactory(worker=WorkerFactory(name="gpu-node-18"))
    assert found(console, "tasks_task", q="gpu-node-17") == {wanted.pk}


@pytest.mark.parametrize("typed", ["3f2a9c1b", "3F2A9C1B", "3f2a9c1b-77", "3f2a9c1b77", " 3f2a9c1b7 "])
def test_task_search_by_the_first_digits_of_its_id_finds_the_task(console, typed) -> None:
    wanted = task_with_id("3f2a9c1b77")
    task_with_id("3f2a9c1c77")
    assert found(console, "tasks_task", q=typed) == {wanted.pk}


def test_task_search_by_a_short_id_prefix_finds_every_task_sharing_it(console) -> None:
    first, second = task_with_id("3f2a9c1b"), task_with_id("3f2a9c2b")
    task_with_id("4f2a9c1b")
    assert found(console, "tasks_task", q="3f2a9c") == {first.pk, second.pk}


def test_task_search_does_not_take_fewer_than_six_hex_digits_as_an_id(console) -> None:
    task_with_id("beef01")
    assert found(console, "tasks_task", q="beef") == set()


def test_task_search_by_whole_id_still_finds_exactly_that_task(console) -> None:
    wanted = TaskFactory()
    TaskFactory()
    assert found(console, "tasks_task", q=str(wanted.pk)) == {wanted.pk}


def test_task_search_by_id_prefix_respects_the_list_filters(console) -> None:
    queued = task_with_id("3f2a9c1b")
    task_with_id("3f2a9c2b", status=TaskStatus.FAILED, ended_at=timezone.now())
    assert found(console, "tasks_task", q="3f2a9c", status__exact="queued") == {queued.pk}


def test_task_list_filters_by_failure_reason(console) -> None:
    ended = {"status": TaskStatus.FAILED, "ended_at": timezone.now()}
    timed_out = TaskFactory(failure_reason=Task.FailureReason.TIMEOUT, **ended)
    TaskFactory(failure_reason=Task.FailureReason.EXIT_CODE, **ended)
    assert found(console, "tasks_task", failure_reason__exact="timeout") == {timed_out.pk}


def test_task_list_filters_by_owner(console) -> None:
    carol = UserFactory(username="carol")
    wanted = TaskFactory(owner=carol)
    TaskFactory(owner=UserFactory(username="dave"))
    assert found(console, "tasks_task", owner__id__exact=str(carol.pk)) == {wanted.pk}


def test_task_list_offers_the_status_failure_reason_and_owner_filters(console) -> None:
    TaskFactory(owner=UserFactory(username="carol"))
    response = console.get(TASKS_URL)
    titles = {spec.title for spec in response.context["cl"].filter_specs}
    assert {"status", "failure reason", "owner"} <= titles


# --- the other consoles ------------------------------------------------------------------------


def test_experiment_search_by_the_start_of_its_commit_finds_it(console) -> None:
    wanted = ExperimentFactory(commit_id="9b1c0ffee" + "0" * 31)
    ExperimentFactory(commit_id="1" * 40)
    assert found(console, "tasks_experiment", q="9b1c0ff") == {wanted.pk}


def test_reservation_search_by_the_first_digits_of_its_id_finds_it(console) -> None:
    wanted = ReservationFactory()
    ReservationFactory()
    assert found(console, "scheduler_reservation", q=str(wanted.pk)[:8]) == {wanted.pk}


def test_reservation_list_filters_by_owner(console) -> None:
    carol = UserFactory(username="carol")
    wanted = ReservationFactory(owner=carol)
    ReservationFactory()
    assert found(console, "scheduler_reservation", owner__id__exact=str(carol.pk)) == {wanted.pk}


def test_worker_search_by_the_first_digits_of_its_id_finds_it(console) -> None:
    wanted = WorkerFactory()
    WorkerFactory()
    assert found(console, "scheduler_worker", q=str(wanted.pk)[:8]) == {wanted.pk}


def test_jupyter_search_by_the_first_digits_of_its_id_finds_it(console, user) -> None:
    wanted = JupyterService.objects.create(owner=user, name="nb-a")
    JupyterService.objects.create(owner=user, name="nb-b")
    assert found(console, "jupyter_jupyterservice", q=str(wanted.pk)[:8]) == {wanted.pk}


@pytest.mark.parametrize("shown_as", ["fetchml_{prefix}_…", "api_key:{prefix}", "{prefix}"])
def test_api_key_search_by_the_key_as_shown_in_the_console_or_audit_finds_it(console, shown_as) -> None:
    wanted = ApiKeyFactory.create(name="ci")
    ApiKeyFactory.create(name="ci")
    assert found(console, "fetchml_apikey", q=shown_as.format(prefix=wanted.prefix)) == {wanted.pk}


def test_api_key_search_by_owner_username_finds_their_keys(console) -> None:
    wanted = ApiKeyFactory.create(user=UserFactory(username="carol"))
    ApiKeyFactory.create(user=UserFactory(username="dave"))
    assert found(console, "fetchml_apikey", q="carol") == {wanted.pk}


# --- a page costs the same number of queries however many rows it shows ------------------------


def add_rows(count: int) -> None:
    for _ in range(count):
        owner = UserFactory()
        task = TaskFactory(owner=owner, worker=WorkerFactory())
        ExperimentFactory(owner=owner)
        ReservationFactory(owner=owner)
        ApiKeyFactory.create(user=owner)
        PluginConfig.objects.create(name=f"plugin-{uuid.uuid4().hex[:8]}", mode="sidecar", updated_by=owner)
        JupyterService.objects.create(owner=owner, name="nb", task=task)
    append_events(count)


def queries_for(console: Client, url: str, params: dict) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert console.get(url, params).status_code == 200
    return len(captured)


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("tasks_task", {}),
        ("tasks_task", {"q": "user"}),
        ("tasks_experiment", {}),
        ("scheduler_worker", {}),
        ("scheduler_reservation", {}),
        ("fetchml_apikey", {}),
        ("plugins_pluginconfig", {}),
        ("jupyter_jupyterservice", {}),
        ("audit_auditevent", {}),
    ],
)
def test_a_console_page_does_not_query_once_per_row(console, model, params) -> None:
    url = reverse(f"admin:{model}_changelist")
    add_rows(1)
    one_row = queries_for(console, url, params)
    add_rows(10)
    assert queries_for(console, url, params) == one_row
