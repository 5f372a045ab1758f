"""An experiment's name identifies it among its owner's live (active or archived) experiments."""

import pytest
from django.db import IntegrityError

from tasks.models import Experiment
from tasks.tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db


def url(experiment: Experiment) -> str:
    return f"/v1/experiments/{experiment.pk}"


def test_creating_a_second_experiment_with_the_same_name_is_conflict(user_client, user):
    ExperimentFactory(owner=user, name="baseline")

    response = user_client.post("/v1/experiments", {"name": "baseline"}, format="json")

    assert response.status_code == 409
    body = response.json()
    assert (body["code"], body["details"][0]["field"]) == ("CONFLICT", "name")
    assert set(body) == {"error", "code", "trace_id", "details"}
    assert Experiment.objects.filter(owner=user, name="baseline").count() == 1


def test_another_user_may_use_a_name_i_use(user_client, other_user):
    ExperimentFactory(owner=other_user, name="baseline")

    assert user_client.post("/v1/experiments", {"name": "baseline"}, format="json").status_code == 201


def test_an_archived_experiment_keeps_its_name(user_client, user):
    ExperimentFactory(owner=user, name="baseline", status=Experiment.Status.ARCHIVED)

    assert user_client.post("/v1/experiments", {"name": "baseline"}, format="json").status_code == 409


def test_the_name_of_a_deleted_experiment_can_be_used_again(user_client, user):
    ExperimentFactory(owner=user, name="baseline", status=Experiment.Status.DELETED)

    assert user_client.post("/v1/experiments", {"name": "baseline"}, format="json").status_code == 201


def test_names_differing_in_case_are_different_names(user_client, user):
    ExperimentFactory(owner=user, name="baseline")

    assert user_client.post("/v1/experiments", {"name": "Baseline"}, format="json").status_code == 201


@pytest.mark.parametrize("name", ["baseline ", " baseline", "\tbaseline", "   "])
def test_a_name_beginning_or_ending_with_whitespace_is_refused(user_client, name):
    response = user_client.post("/v1/experiments", {"name": name}, format="json")

    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "name"


def test_renaming_to_a_name_ending_with_whitespace_is_refused(user_client, user):
    experiment = ExperimentFactory(owner=user, name="baseline")

    assert user_client.patch(url(experiment), {"name": "baseline "}, format="json").status_code == 422


def test_renaming_onto_a_name_already_in_use_is_conflict_and_changes_nothing(user_client, user):
    ExperimentFactory(owner=user, name="baseline")
    other = ExperimentFactory(owner=user, name="sweep", description="lr")

    response = user_client.patch(url(other), {"name": "baseline", "description": "changed"}, format="json")

    assert response.status_code == 409
    assert response.json()["details"][0]["field"] == "name"
    other.refresh_from_db()
    assert (other.name, other.description) == ("sweep", "lr")


def test_an_admin_renaming_onto_the_owners_name_in_use_is_conflict(admin_client_key, user):
    ExperimentFactory(owner=user, name="baseline")
    other = ExperimentFactory(owner=user, name="sweep")

    assert admin_client_key.patch(url(other), {"name": "baseline"}, format="json").status_code == 409


def test_renaming_an_experiment_to_its_own_name_is_accepted(user_client, user):
    experiment = ExperimentFactory(owner=user, name="baseline")

    assert user_client.patch(url(experiment), {"name": "baseline"}, format="json").status_code == 200


def test_unarchiving_is_not_refused_for_its_own_name(user_client, user):
    experiment = ExperimentFactory(owner=user, name="baseline", status=Experiment.Status.ARCHIVED)

    assert user_client.patch(url(experiment), {"status": "active"}, format="json").status_code == 200


def test_the_database_refuses_two_live_experiments_of_one_owner_with_one_name(user):
    ExperimentFactory(owner=user, name="baseline")

    with pytest.raises(IntegrityError):
        ExperimentFactory(owner=user, name="baseline", status=Experiment.Status.ARCHIVED)
