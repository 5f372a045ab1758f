"""GET /v1/experiments?status=... and what the list leaves out."""

import pytest

from tasks.models import Experiment
from tasks.tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db


def test_status_filter_lists_only_experiments_in_that_status(user_client, user):
    ExperimentFactory(owner=user, status=Experiment.Status.ACTIVE)
    archived = ExperimentFactory(owner=user, status=Experiment.Status.ARCHIVED)

    response = user_client.get("/v1/experiments", {"status": "archived"})

    assert response.status_code == 200
    assert [e["id"] for e in response.json()] == [str(archived.id)]
    assert response["X-Total-Count"] == "1"


def test_status_filter_keeps_to_the_callers_experiments(user_client, user, other_user):
    mine = ExperimentFactory(owner=user)
    ExperimentFactory(owner=other_user)

    assert [e["id"] for e in user_client.get("/v1/experiments", {"status": "active"}).json()] == [str(mine.id)]


def test_unknown_status_filter_is_bad_request_naming_status(user_client):
    response = user_client.get("/v1/experiments", {"status": "finished"})

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "BAD_REQUEST"
    assert [detail["field"] for detail in body["details"]] == ["status"]


def test_a_deleted_experiment_is_not_listed(user_client, user):
    kept = ExperimentFactory(owner=user)
    ExperimentFactory(owner=user, status=Experiment.Status.DELETED)

    response = user_client.get("/v1/experiments")

    assert [e["id"] for e in response.json()] == [str(kept.id)]
    assert response["X-Total-Count"] == "1"


def test_deleted_experiments_cannot_be_listed_by_status(user_client):
    assert user_client.get("/v1/experiments", {"status": "deleted"}).status_code == 400
