import pytest

from conftest import KeyClient
from tasks.models import Experiment
from tasks.tests.factories import ExperimentFactory


@pytest.fixture
def experiment(user) -> Experiment:
    return ExperimentFactory(owner=user, name="baseline", description="first try")


def url(experiment: Experiment) -> str:
    return f"/v1/experiments/{experiment.pk}"


def test_owner_gets_the_experiment(user_client, experiment):
    response = user_client.get(url(experiment))

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["name"], body["description"], body["status"], body["user_id"]) == (
        str(experiment.pk),
        "baseline",
        "first try",
        "active",
        "alice",
    )


def test_admin_gets_any_experiment(admin_client_key, experiment):
    assert admin_client_key.get(url(experiment)).status_code == 200


def test_other_user_gets_404(other_client, experiment):
    assert other_client.get(url(experiment)).status_code == 404
    assert other_client.patch(url(experiment), {"name": "mine now"}, format="json").status_code == 404
    experiment.refresh_from_db()
    assert experiment.name == "baseline"


def test_worker_keys_are_refused(worker_key, experiment):
    assert KeyClient(worker_key).get(url(experiment)).status_code == 403


def test_deleted_experiment_is_404(user_client, experiment):
    Experiment.objects.filter(pk=experiment.pk).update(status=Experiment.Status.DELETED)

    assert user_client.get(url(experiment)).status_code == 404


def test_owner_renames_describes_and_sets_the_commit(user_client, experiment):
    changes = {"name": "baseline-v2", "description": "with dropout", "commit_id": "a1b2c3d"}

    response = user_client.patch(url(experiment), changes, format="json")

    assert response.status_code == 200
    experiment.refresh_from_db()
    assert (experiment.name, experiment.description, experiment.commit_id) == ("baseline-v2", "with dropout", "a1b2c3d")
    assert response.json()["name"] == "baseline-v2"


def test_patch_changes_only_the_fields_sent(user_client, experiment):
    user_client.patch(url(experiment), {"commit_id": "ffff"}, format="json")

    experiment.refresh_from_db()
    assert (experiment.name, experiment.description, experiment.commit_id) == ("baseline", "first try", "ffff")


def test_owner_archives_and_unarchives(user_client, experiment):
    assert user_client.patch(url(experiment), {"status": "archived"}, format="json").json()["status"] == "archived"
    assert user_client.patch(url(experiment), {"status": "active"}, format="json").json()["status"] == "active"


def test_admin_archives_a_users_experiment(admin_client_key, experiment):
    assert admin_client_key.patch(url(experiment), {"status": "archived"}, format="json").status_code == 200


def test_status_deleted_cannot_be_set_by_patch(user_client, experiment):
    response = user_client.patch(url(experiment), {"status": "deleted"}, format="json")

    assert response.status_code == 422
    experiment.refresh_from_db()
    assert experiment.status == "active"


@pytest.mark.parametrize(
    "body",
    [{"name": ""}, {"name": "x" * 129}, {"commit_id": "c" * 65}, {"owner": "bob"}, {"nmae": "typo"}],
)
def test_invalid_or_unknown_fields_are_422(user_client, experiment, body):
    response = user_client.patch(url(experiment), body, format="json")

    assert response.status_code == 422
    assert response.json()["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"name": 42}, "name"), ({"description": 1.5}, "description"), ({"commit_id": 123456}, "commit_id")],
)
def test_a_number_where_a_string_belongs_is_422_and_changes_nothing(user_client, experiment, body, field):
    response = user_client.patch(url(experiment), body, format="json")

    assert response.status_code == 422, response.content
    assert [detail["field"] for detail in response.json()["details"]] == [field]
    experiment.refresh_from_db()
    assert (experiment.name, experiment.description, experiment.commit_id) == ("baseline", "first try", "0" * 40)
