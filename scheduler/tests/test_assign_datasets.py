"""An `assign` pins each server dataset to the bytes it had when the task was submitted."""

import pytest

from artifacts.models import Dataset
from artifacts.tests.factories import DatasetFactory
from scheduler.assigns import assign_messages
from scheduler.dispatch import dispatch_round
from scheduler.tests.factories import assignments_of, worker
from tasks.services import task_submit

pytestmark = pytest.mark.django_db

DIGEST_AT_SUBMISSION = "a" * 64


def _assign_of(task) -> dict:
    [placed] = assignments_of(task)
    return assign_messages(assignment_ids=[placed.id], worker_id=placed.worker_id)[0]


def test_a_dataset_uploaded_again_under_its_name_after_submission_is_not_what_the_task_is_sent(user):
    DatasetFactory(owner=user, name="toy.csv", sha256=DIGEST_AT_SUBMISSION)
    spec = {"name": "ref", "source": "fetchml://datasets/toy.csv", "mount_path": "data/ref"}
    task = task_submit(owner=user, job_name="pinned", entrypoint="true", datasets=["toy.csv"], dataset_specs=[spec])
    # Deleted and uploaded again with other bytes while the task waits.
    Dataset.objects.filter(owner=user, name="toy.csv").update(sha256="b" * 64)
    worker()
    dispatch_round()

    message = _assign_of(task)

    assert message["datasets"] == []
    assert message["dataset_specs"] == [
        {"name": "toy.csv", "sha256": DIGEST_AT_SUBMISSION},
        {**spec, "sha256": DIGEST_AT_SUBMISSION},
    ]


def test_a_digest_the_submitter_gave_and_other_sources_are_sent_as_given(user):
    DatasetFactory(owner=user, name="toy.csv", sha256=DIGEST_AT_SUBMISSION)
    specs = [
        {"name": "mine", "source": "fetchml://datasets/toy.csv", "sha256": DIGEST_AT_SUBMISSION},
        {"name": "web", "source": "https://data.example/web.csv", "sha256": "c" * 64},
    ]
    task = task_submit(owner=user, job_name="given", entrypoint="true", dataset_specs=specs)
    Dataset.objects.filter(owner=user, name="toy.csv").update(sha256="b" * 64)
    worker()
    dispatch_round()

    assert _assign_of(task)["dataset_specs"] == specs
