"""GET/POST /v1/experiments."""

import pytest

from tasks.models import Experiment
from tasks.tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db


def test_create_experiment_returns_it(user_client, user):
    response = user_client.post("/v1/experiments", {"name": "resnet sweep", "description": "lr"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "name", "commit_id", "created_at", "status", "description", "user_id"}
    assert (body["name"], body["description"], body["status"], body["user_id"]) == (
        "resnet sweep",
        "lr",
        "active",
        "alice",
    )
    assert Experiment.objects.get(id=body["id"]).owner == user


def test_description_is_optional(user_client):
    assert user_client.post("/v1/experiments", {"name": "e"}, format="json").json()["description"] == ""


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"name": 3}, "name"),
        ({"name": "e", "description": "x" * 10_001}, "description"),
        ({"name": "e", "commit_id": "c" * 65}, "commit_id"),
    ],
)
def test_invalid_experiment_is_refused(user_client, payload, field):
    response = user_client.post("/v1/experiments", payload, format="json")
    assert response.status_code == 422
    assert [detail["field"] for detail in response.json()["details"]] == [field]
    assert not Experiment.objects.exists()


def test_name_of_128_characters_is_accepted(user_client):
    assert user_client.post("/v1/experiments", {"name": "x" * 128}, format="json").status_code == 201


def test_user_lists_own_experiments_as_an_array(user_client, user, other_user):
    mine = ExperimentFactory(owner=user)
    ExperimentFactory(owner=other_user)
    response = user_client.get("/v1/experiments")
    assert response.status_code == 200
    assert [e["id"] for e in response.json()] == [str(mine.id)]
    assert response["X-Total-Count"] == "1"


def test_other_user_does_not_list_my_experiments(other_client, user):
    ExperimentFactory(owner=user)
    assert other_client.get("/v1/experiments").json() == []


def test_admin_lists_everyones_experiments(admin_client_key, user, other_user):
    ExperimentFactory(owner=user)
    ExperimentFactory(owner=other_user)
    assert len(admin_client_key.get("/v1/experiments").json()) == 2


def test_experiment_list_pages_with_limit_and_offset(user_client, user):
    ExperimentFactory.create_batch(3, owner=user)
    everything = [e["id"] for e in user_client.get("/v1/experiments").json()]
    response = user_client.get("/v1/experiments", {"limit": 1, "offset": 1})
    assert [e["id"] for e in response.json()] == everything[1:2]
    assert response["X-Total-Count"] == "3"


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}])
def test_invalid_experiment_paging_is_bad_request(user_client, params):
    assert user_client.get("/v1/experiments", params).status_code == 400


def test_the_schema_offers_only_the_statuses_a_client_may_set(anon_client):
    schema = anon_client.get("/v1/schema", {"format": "json"}).json()

    assert schema["components"]["schemas"]["ExperimentUpdateStatusEnum"]["enum"] == ["active", "archived"]
