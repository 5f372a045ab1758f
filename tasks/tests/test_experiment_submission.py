"""Submitting a task into an experiment."""

import pytest

from tasks.models import Experiment, Task
from tasks.tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db


def submit(client, experiment: Experiment):
    payload = {"job_name": "j", "entrypoint": "train.py", "experiment_id": str(experiment.id)}
    return client.post("/v1/tasks", payload, format="json")


def test_submitting_into_an_archived_experiment_is_refused_naming_experiment_id(user_client, user):
    experiment = ExperimentFactory(owner=user, status=Experiment.Status.ARCHIVED)

    response = submit(user_client, experiment)

    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "VALIDATION_ERROR"
    assert [detail["field"] for detail in body["details"]] == ["experiment_id"]
    assert "archived" in body["details"][0]["message"]
    assert not Task.objects.exists()


def test_submitting_into_an_active_experiment_is_accepted(user_client, user):
    experiment = ExperimentFactory(owner=user)

    response = submit(user_client, experiment)

    assert response.status_code == 201
    assert response.json()["experiment_id"] == str(experiment.id)
