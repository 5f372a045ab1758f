"""HEAD is the read its GET is: the same callers may make it, and it answers the GET's headers."""

from artifacts.tests.factories import live_run, sha256, upload_and_commit, worker_key_pair
from conftest import KeyClient

MODEL = b"weights" * 100


def stored_artifact(owner) -> str:
    """The URL of a committed artifact of a task of `owner`."""
    key, raw = worker_key_pair()
    run = live_run(key=key, owner=owner)
    upload_and_commit(KeyClient(raw), run, {"metrics.json": MODEL})
    return f"/v1/tasks/{run.task_id}/artifacts/metrics.json"


def head(client: KeyClient, url: str):
    """A HEAD request, its (emptied) streamed body drained, which is what closes the stored file."""
    response = client.head(url)
    if response.streaming:
        b"".join(response.streaming_content)
    return response


def test_owner_head_of_an_artifact_answers_its_length_and_digest(user, user_client):
    url = stored_artifact(user)

    response = head(user_client, url)

    assert response.status_code == 200
    assert (response["Content-Length"], response["ETag"]) == (str(len(MODEL)), f'"{sha256(MODEL)}"')


def test_head_of_an_artifact_by_another_user_is_404_as_its_get(user, other_client):
    url = stored_artifact(user)

    assert head(other_client, url).status_code == 404


def test_worker_head_of_the_metadata_of_a_dataset_its_live_task_lists(user, user_client):
    user_client.post("/v1/datasets?name=mnist", data=b"7,0\n", content_type="application/octet-stream")
    key, raw = worker_key_pair()
    run = live_run(key=key, owner=user, status="preparing", datasets=["fetchml://datasets/mnist"])

    response = head(KeyClient(raw), f"/v1/datasets/mnist?task_id={run.task_id}")

    assert response.status_code == 200
