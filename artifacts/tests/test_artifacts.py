import pytest

from artifacts.models import Artifact
from artifacts.tests.factories import (
    commit,
    download,
    live_run,
    put,
    sha256,
    stored_files,
    upload_and_commit,
    worker_key_pair,
)
from audit.models import AuditEvent
from conftest import KeyClient
from scheduler.models import NodeAssignment
from tasks.states import TaskStatus

MODEL = b"\x00weights\xff" * 500
LOG = b"epoch 1 loss 0.3\nepoch 2 loss 0.2\n"


@pytest.fixture
def worker(db):
    return worker_key_pair()


@pytest.fixture
def run(user, worker) -> NodeAssignment:
    return live_run(key=worker[0], owner=user)


@pytest.fixture
def agent(worker) -> KeyClient:
    return KeyClient(worker[1])


def listed(client: KeyClient, run: NodeAssignment) -> list[tuple[str, int]]:
    return [(a["path"], a["attempt"]) for a in client.get(f"/v1/tasks/{run.task_id}/artifacts").json()]


def test_upload_is_stored_but_not_listed_before_the_commit(agent, run, user_client):
    response = put(agent, run, "model.bin", MODEL)

    assert response.status_code == 201
    assert response.json()["sha256"] == sha256(MODEL)
    assert Artifact.objects.get().complete is False
    assert listed(user_client, run) == []
    assert download(user_client, f"/v1/tasks/{run.task_id}/artifacts/model.bin").status_code == 404


def test_commit_makes_the_manifests_artifacts_listed(agent, run, user_client):
    upload_and_commit(agent, run, {"model.bin": MODEL, "logs/output.log": LOG})

    response = user_client.get(f"/v1/tasks/{run.task_id}/artifacts")

    assert [(a["path"], a["size"], a["sha256"], a["attempt"]) for a in response.json()] == [
        ("logs/output.log", len(LOG), sha256(LOG), 1),
        ("model.bin", len(MODEL), sha256(MODEL), 1),
    ]


def test_commit_drops_uploads_missing_from_the_manifest(
    agent, run, user_client, storage_dir, django_capture_on_commit_callbacks
):
    put(agent, run, "model.bin", MODEL)
    put(agent, run, "half-written.tmp", b"partial")

    with django_capture_on_commit_callbacks(execute=True):
        commit(agent, run, {"model.bin": MODEL})

    assert listed(user_client, run) == [("model.bin", 1)]
    assert len(stored_files(storage_dir)) == 1


def test_manifest_not_matching_the_uploads_is_422_and_commits_nothing(agent, run):
    put(agent, run, "model.bin", MODEL)

    response = commit(agent, run, {"model.bin": MODEL + b"more", "never-sent.txt": b"x"})

    assert response.status_code == 422
    assert {d["field"] for d in response.json()["details"]} == {"model.bin", "never-sent.txt"}
    assert not Artifact.objects.filter(complete=True).exists()


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"size": str(len(MODEL))}, "artifacts[0].size"),
        ({"size": float(len(MODEL))}, "artifacts[0].size"),
        ({"sha256": 7}, "artifacts[0].sha256"),
    ],
)
def test_manifest_entry_of_the_wrong_json_type_is_422(agent, run, entry, field):
    put(agent, run, "model.bin", MODEL)
    manifest = [{"path": "model.bin", "size": len(MODEL), "sha256": sha256(MODEL), **entry}]

    response = agent.post(
        f"/v1/tasks/{run.task_id}/artifacts/commit",
        data={"artifacts": manifest},
        format="json",
        HTTP_X_FETCHML_TOKEN=str(run.token),
    )

    assert response.status_code == 422, response.content
    assert [d["field"] for d in response.json()["details"]] == [field]
    assert not Artifact.objects.filter(complete=True).exists()


def test_fields_a_newer_agent_adds_to_a_commit_are_ignored(agent, run):
    put(agent, run, "model.bin", MODEL)
    manifest = [{"path": "model.bin", "size": len(MODEL), "sha256": sha256(MODEL), "mtime": 1}]

    response = agent.post(
        f"/v1/tasks/{run.task_id}/artifacts/commit",
        data={"artifacts": manifest, "skipped": []},
        format="json",
        HTTP_X_FETCHML_TOKEN=str(run.token),
    )

    assert response.status_code == 200, response.content
    assert Artifact.objects.filter(complete=True, path="model.bin").exists()


def test_wrong_sha256_is_422_and_nothing_is_stored(agent, run, storage_dir, spool_dir):
    response = put(agent, run, "model.bin", MODEL, digest=sha256(b"something else"))

    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "X-Content-SHA256"
    assert not Artifact.objects.exists()
    assert stored_files(storage_dir) == [] and stored_files(spool_dir) == []


def test_upload_is_accepted_before_the_running_report_is_applied(agent, user, worker):
    # The agent's status reports travel over the WebSocket; its first upload may overtake them.
    early = live_run(key=worker[0], owner=user, status=TaskStatus.PREPARING)

    assert put(agent, early, "logs/stdout.log", MODEL).status_code == 201


@pytest.mark.parametrize("status", [TaskStatus.QUEUED, TaskStatus.COMPLETED, TaskStatus.FAILED])
def test_upload_for_a_task_that_is_not_running_is_409(agent, user, worker, status):
    stale = live_run(key=worker[0], owner=user, status=status)

    assert put(agent, stale, "model.bin", MODEL).status_code == 409


def test_token_of_an_assignment_that_ended_is_409(agent, run):
    NodeAssignment.objects.filter(pk=run.pk).update(holds_capacity=False)

    response = put(agent, run, "model.bin", MODEL)

    assert response.status_code == 409
    assert response.json()["code"] == "CONFLICT"
    assert not Artifact.objects.exists()


def test_token_of_an_earlier_attempt_is_409(agent, run):
    run.task.attempt = 2
    run.task.save()

    assert put(agent, run, "model.bin", MODEL).status_code == 409


def test_token_quoted_by_another_worker_is_409(run):
    _, other_raw = worker_key_pair("agent-two")

    assert put(KeyClient(other_raw), run, "model.bin", MODEL).status_code == 409


def test_commit_with_a_stale_token_is_409_and_commits_nothing(agent, run):
    put(agent, run, "model.bin", MODEL)
    NodeAssignment.objects.filter(pk=run.pk).update(holds_capacity=False)

    assert commit(agent, run, {"model.bin": MODEL}).status_code == 409
    assert not Artifact.objects.filter(complete=True).exists()


def test_missing_token_is_400(agent, run):
    response = agent.put(
        f"/v1/tasks/{run.task_id}/artifacts/model.bin",
        data=MODEL,
        content_type="application/octet-stream",
        HTTP_X_CONTENT_SHA256=sha256(MODEL),
    )

    assert response.status_code == 400


def test_user_keys_cannot_upload_artifacts(user_client, run):
    assert put(user_client, run, "model.bin", MODEL).status_code == 403


@pytest.mark.parametrize(
    "path",
    ["../escape.txt", "a/../../escape.txt", "%2e%2e/escape.txt", "/etc/passwd", "a//b", "a/./b", "a/", "bad%00name"],
)
def test_unsafe_paths_are_refused(agent, run, path):
    response = put(agent, run, path, MODEL)

    assert response.status_code == 422
    assert not Artifact.objects.exists()


def test_path_longer_than_1024_bytes_is_refused(agent, run):
    assert put(agent, run, "a" * 1025, MODEL).status_code == 422


def test_uploads_over_the_task_budget_are_413_and_report_the_file(agent, run, settings, storage_dir):
    settings.FETCHML_MAX_ARTIFACT_BYTES_PER_TASK = 100

    assert put(agent, run, "first.bin", b"a" * 60).status_code == 201
    refused = put(agent, run, "second.bin", b"b" * 60)
    assert put(agent, run, "third.bin", b"c" * 40).status_code == 201

    assert refused.status_code == 413
    assert refused.json()["details"][0]["field"] == "second.bin"
    assert sorted(Artifact.objects.values_list("path", flat=True)) == ["first.bin", "third.bin"]
    assert len(stored_files(storage_dir)) == 2


def test_uploading_a_path_again_replaces_the_upload(agent, run, storage_dir, django_capture_on_commit_callbacks):
    put(agent, run, "model.bin", b"first try")

    with django_capture_on_commit_callbacks(execute=True):
        response = put(agent, run, "model.bin", MODEL)

    assert response.status_code == 201
    assert Artifact.objects.get().sha256 == sha256(MODEL)
    assert len(stored_files(storage_dir)) == 1


def test_committed_path_cannot_be_uploaded_again(agent, run):
    upload_and_commit(agent, run, {"model.bin": MODEL})

    assert put(agent, run, "model.bin", b"changed").status_code == 409


def test_retried_attempt_replaces_the_listing_only_when_it_commits(
    agent, run, user_client, storage_dir, django_capture_on_commit_callbacks
):
    upload_and_commit(agent, run, {"model.bin": MODEL})
    task = run.task
    NodeAssignment.objects.filter(pk=run.pk).update(holds_capacity=False)
    task.attempt = 2
    task.save()
    retry = NodeAssignment.objects.create(task=task, attempt=2, worker=run.worker)

    put(agent, retry, "model-v2.bin", MODEL + b"2")
    assert listed(user_client, run) == [("model.bin", 1)]

    with django_capture_on_commit_callbacks(execute=True):
        commit(agent, retry, {"model-v2.bin": MODEL + b"2"})
    assert listed(user_client, run) == [("model-v2.bin", 2)]
    assert len(stored_files(storage_dir)) == 1


def test_owner_downloads_an_artifact_and_the_read_is_audited(agent, run, user_client):
    upload_and_commit(agent, run, {"logs/output.log": LOG})

    response = download(user_client, f"/v1/tasks/{run.task_id}/artifacts/logs/output.log")

    assert response.status_code == 200
    assert response.content_bytes == LOG
    assert 'filename="output.log"' in response["Content-Disposition"]
    event = AuditEvent.objects.get(event_type="file_access", action="download")
    assert (event.user_id, event.resource) == ("alice", f"artifact:{run.task_id}/logs/output.log")


def test_admin_downloads_an_artifact(agent, run, admin_client_key):
    upload_and_commit(agent, run, {"model.bin": MODEL})

    response = download(admin_client_key, f"/v1/tasks/{run.task_id}/artifacts/model.bin")

    assert response.content_bytes == MODEL


def test_other_users_get_404_for_listing_and_download(agent, run, other_client):
    upload_and_commit(agent, run, {"model.bin": MODEL})

    assert other_client.get(f"/v1/tasks/{run.task_id}/artifacts").status_code == 404
    assert download(other_client, f"/v1/tasks/{run.task_id}/artifacts/model.bin").status_code == 404


def test_download_of_a_range_is_206_with_content_range(agent, run, user_client):
    upload_and_commit(agent, run, {"model.bin": MODEL})
    url = f"/v1/tasks/{run.task_id}/artifacts/model.bin"

    response = download(user_client, url, HTTP_RANGE="bytes=100-199")

    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes 100-199/{len(MODEL)}"
    assert response["Content-Length"] == "100"
    assert response.content_bytes == MODEL[100:200]


@pytest.mark.parametrize(("header", "expected"), [("bytes=-10", MODEL[-10:]), (f"bytes={len(MODEL) - 7}-", MODEL[-7:])])
def test_download_of_suffix_and_open_ranges(agent, run, user_client, header, expected):
    upload_and_commit(agent, run, {"model.bin": MODEL})

    response = download(user_client, f"/v1/tasks/{run.task_id}/artifacts/model.bin", HTTP_RANGE=header)

    assert response.status_code == 206
    assert response.content_bytes == expected


@pytest.mark.parametrize("header", [f"bytes={len(MODEL)}-", "bytes=20-10", "bytes=0-1,5-6", "bytes=x-"])
def test_unsatisfiable_range_is_416(agent, run, user_client, header):
    upload_and_commit(agent, run, {"model.bin": MODEL})

    response = download(user_client, f"/v1/tasks/{run.task_id}/artifacts/model.bin", HTTP_RANGE=header)

    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{len(MODEL)}"
    assert not AuditEvent.objects.filter(event_type="file_access", action="download").exists()


@pytest.mark.parametrize("header", ["lines=1-2", "", "  ", "bytes=", "bytes=  "])
def test_a_range_in_another_unit_or_empty_is_ignored(agent, run, user_client, header):
    upload_and_commit(agent, run, {"model.bin": MODEL})

    response = download(user_client, f"/v1/tasks/{run.task_id}/artifacts/model.bin", HTTP_RANGE=header)

    assert response.status_code == 200
    assert response.content_bytes == MODEL


@pytest.mark.parametrize("header", ["Bytes=100-199", "BYTES=100-199"])
def test_the_range_unit_is_case_insensitive(agent, run, user_client, header):
    upload_and_commit(agent, run, {"model.bin": MODEL})

    response = download(user_client, f"/v1/tasks/{run.task_id}/artifacts/model.bin", HTTP_RANGE=header)

    assert response.status_code == 206
    assert response.content_bytes == MODEL[100:200]


def test_a_file_named_commit_is_an_ordinary_artifact(agent, run, user_client):
    assert put(agent, run, "commit", LOG).status_code == 201
    assert commit(agent, run, {"commit": LOG}).status_code == 200

    assert download(user_client, f"/v1/tasks/{run.task_id}/artifacts/commit").content_bytes == LOG


def test_commit_is_audited(agent, run):
    upload_and_commit(agent, run, {"model.bin": MODEL})

    event = AuditEvent.objects.get(event_type="file_access", action="commit")
    assert event.resource == f"artifact:{run.task_id}"
    assert event.metadata == {"attempt": 1, "files": 1, "bytes": len(MODEL)}
