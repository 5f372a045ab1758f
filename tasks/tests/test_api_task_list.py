"""GET /v1/tasks: visibility, filters, paging and a fixed number of queries."""

import pytest
from django.test import override_settings
from django.utils import timezone

from tasks.states import TaskStatus
from tasks.tests.factories import (
    ExperimentFactory,
    NodeAssignmentFactory,
    ReservationFactory,
    TaskFactory,
    WorkerFactory,
)

pytestmark = pytest.mark.django_db


def ids(response) -> set[str]:
    return {task["id"] for task in response.json()["tasks"]}


def test_user_lists_only_own_tasks(user_client, user, other_user):
    mine = TaskFactory.create_batch(2, owner=user)
    TaskFactory(owner=other_user)
    body = user_client.get("/v1/tasks").json()
    assert {t["id"] for t in body["tasks"]} == {str(t.id) for t in mine}
    assert body["total"] == 2


def test_other_user_does_not_list_my_tasks(other_client, user):
    TaskFactory(owner=user)
    assert other_client.get("/v1/tasks").json()["total"] == 0


def test_admin_lists_everyones_tasks(admin_client_key, user, other_user):
    TaskFactory(owner=user)
    TaskFactory(owner=other_user)
    assert admin_client_key.get("/v1/tasks").json()["total"] == 2


def test_list_is_newest_first(user_client, user):
    older = TaskFactory(owner=user, created_at=timezone.now() - timezone.timedelta(minutes=5))
    newer = TaskFactory(owner=user)
    assert [t["id"] for t in user_client.get("/v1/tasks").json()["tasks"]] == [str(newer.id), str(older.id)]


@pytest.mark.parametrize("status", list(TaskStatus))
def test_status_filter_accepts_every_status(user_client, user, status):
    wanted = TaskFactory(owner=user, status=status)
    other = TaskStatus.QUEUED if status != TaskStatus.QUEUED else TaskStatus.FAILED
    TaskFactory(owner=user, status=other)
    assert ids(user_client.get("/v1/tasks", {"status": status})) == {str(wanted.id)}


def test_unknown_status_filter_is_bad_request(user_client):
    response = user_client.get("/v1/tasks", {"status": "sleeping"})
    assert response.status_code == 400
    assert response.json()["details"][0]["field"] == "status"


def test_admin_filters_by_owner_username(admin_client_key, user, other_user):
    TaskFactory(owner=user)
    bobs = TaskFactory(owner=other_user)
    assert ids(admin_client_key.get("/v1/tasks", {"user_id": "bob"})) == {str(bobs.id)}


def test_user_filtering_by_another_username_sees_nothing(user_client, user, other_user):
    TaskFactory(owner=user)
    TaskFactory(owner=other_user)
    body = user_client.get("/v1/tasks", {"user_id": "bob"}).json()
    assert body == {"tasks": [], "total": 0, "limit": 50, "offset": 0}


def test_user_filtering_by_own_username_sees_own_tasks(user_client, user):
    TaskFactory(owner=user)
    assert user_client.get("/v1/tasks", {"user_id": "alice"}).json()["total"] == 1


def test_experiment_filter(user_client, user):
    experiment = ExperimentFactory(owner=user)
    inside = TaskFactory(owner=user, experiment=experiment)
    TaskFactory(owner=user)
    assert ids(user_client.get("/v1/tasks", {"experiment_id": str(experiment.id)})) == {str(inside.id)}


def test_job_name_filter_matches_the_whole_name(user_client, user):
    sweep = TaskFactory.create_batch(2, owner=user, job_name="sweep")
    TaskFactory(owner=user, job_name="sweep-2")
    assert ids(user_client.get("/v1/tasks", {"job_name": "sweep"})) == {str(task.id) for task in sweep}


def test_node_count_filter(user_client, user):
    wide = TaskFactory(owner=user, node_count=4)
    TaskFactory(owner=user)
    assert ids(user_client.get("/v1/tasks", {"node_count": 4})) == {str(wide.id)}


def test_reservation_filter(user_client, user):
    reservation = ReservationFactory(owner=user)
    reserved = TaskFactory(owner=user, reservation=reservation)
    TaskFactory(owner=user)
    assert ids(user_client.get("/v1/tasks", {"reservation_id": str(reservation.id)})) == {str(reserved.id)}


def test_creation_only_parameters_are_not_required_when_listing(user_client, user):
    TaskFactory(owner=user)
    assert user_client.get("/v1/tasks").status_code == 200


def test_paging_returns_the_requested_window_and_the_total(user_client, user):
    TaskFactory.create_batch(5, owner=user)
    everything = [t["id"] for t in user_client.get("/v1/tasks").json()["tasks"]]
    body = user_client.get("/v1/tasks", {"limit": 2, "offset": 2}).json()
    assert [t["id"] for t in body["tasks"]] == everything[2:4]
    assert (body["total"], body["limit"], body["offset"]) == (5, 2, 2)


def test_offset_past_the_end_is_an_empty_page(user_client, user):
    TaskFactory(owner=user)
    body = user_client.get("/v1/tasks", {"offset": 10}).json()
    assert body["tasks"] == []
    assert body["total"] == 1


def test_default_limit_is_50(user_client):
    assert user_client.get("/v1/tasks").json()["limit"] == 50


def test_limit_of_1000_is_accepted(user_client):
    assert user_client.get("/v1/tasks", {"limit": 1000}).status_code == 200


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": "x"}, "offset"),
        ({"offset": 10**20}, "offset"),
        ({"node_count": 0}, "node_count"),
        ({"experiment_id": "nope"}, "experiment_id"),
        ({"job_name": "x" * 65}, "job_name"),
    ],
)
def test_invalid_paging_or_filter_is_bad_request_with_details(user_client, params, field):
    response = user_client.get("/v1/tasks", params)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "BAD_REQUEST"
    assert [detail["field"] for detail in body["details"]] == [field]


@override_settings(FETCHML_MAX_PAGE_SIZE=10)
def test_limit_ceiling_follows_the_max_page_size_setting(user_client):
    assert user_client.get("/v1/tasks", {"limit": 11}).status_code == 400


def test_listing_runs_a_fixed_number_of_queries(user_client, user, django_assert_max_num_queries):
    worker = WorkerFactory()
    experiment = ExperimentFactory(owner=user)
    for _ in range(20):
        task = TaskFactory(
            owner=user,
            experiment=experiment,
            status=TaskStatus.RUNNING,
            worker=worker,
            cancelled_by=user,
            cancel_requested_at=timezone.now(),
        )
        NodeAssignmentFactory(task=task, worker=worker)
    user_client.get("/v1/tasks")  # authentication's once-per-interval bookkeeping
    # key lookup, count, page, node assignments (+ savepoints on some backends)
    with django_assert_max_num_queries(6):
        response = user_client.get("/v1/tasks")
    assert len(response.json()["tasks"]) == 20
    assert all(t["node_assignments"] and t["cancelled_by"] == "alice" for t in response.json()["tasks"])
