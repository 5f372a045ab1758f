"""`commit_id` is a property of an experiment: set when it is created or later, by the same rules."""

import pytest

from tasks.models import Experiment
from tasks.tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db


def test_an_experiment_is_created_with_its_commit(user_client):
    response = user_client.post("/v1/experiments", {"name": "e", "commit_id": "a1b2c3d"}, format="json")

    assert response.status_code == 201
    assert response.json()["commit_id"] == "a1b2c3d"
    assert Experiment.objects.get().commit_id == "a1b2c3d"


def test_commit_id_defaults_to_empty(user_client):
    assert user_client.post("/v1/experiments", {"name": "e"}, format="json").json()["commit_id"] == ""


@pytest.mark.parametrize("commit_id", ["c" * 65, 123456, None])
def test_a_commit_id_refused_on_update_is_refused_on_create(user_client, user, commit_id):
    experiment = ExperimentFactory(owner=user)

    created = user_client.post("/v1/experiments", {"name": "e", "commit_id": commit_id}, format="json")
    updated = user_client.patch(f"/v1/experiments/{experiment.pk}", {"commit_id": commit_id}, format="json")

    assert (created.status_code, updated.status_code) == (422, 422)
    assert created.json()["details"] == updated.json()["details"]
    assert Experiment.objects.count() == 1
