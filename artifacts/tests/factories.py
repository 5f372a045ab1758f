"""Builders for the bytes tests send and the runs that may read or write them."""

import gzip
import hashlib
import io
import tarfile

import factory
from rest_framework.test import APIClient

from artifacts.models import Dataset, Snapshot, SnapshotOwner
from fetchml.models import ApiKey
from fetchml.tests.factories import ApiKeyFactory, UserFactory
from scheduler.models import NodeAssignment
from tasks.states import TaskStatus
from tasks.tests.factories import NodeAssignmentFactory, TaskFactory, WorkerFactory


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A .tar.gz holding `files` (name -> content): the same bytes for the same files, whenever
    made (gzip's header would otherwise hold the second it was written)."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w") as archive,
    ):
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def worker_key_pair(username: str = "worker-agent") -> tuple[ApiKey, str]:
    """A worker-role key (the row and the raw header value)."""
    return ApiKeyFactory.pair(user=UserFactory(username=username), role="worker")


def live_run(
    *, key: ApiKey, owner=None, status: str = TaskStatus.COLLECTING, attempt: int = 1, **task_fields
) -> NodeAssignment:
    """A task of `owner` with a live assignment on a worker registered with `key`."""
    task = TaskFactory(owner=owner or UserFactory(), status=status, attempt=attempt, **task_fields)
    worker = WorkerFactory(api_key=key)
    return NodeAssignmentFactory(task=task, worker=worker, attempt=attempt, holds_capacity=True)


def stored_files(root) -> list:
    """Every file under a storage (or spool) directory."""
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def download(client, url: str, **headers):
    """GET a download; returns the response with its body read (which closes the stored file)."""
    response = client.get(url, **headers)
    response.content_bytes = b"".join(response.streaming_content) if response.streaming else response.content
    return response


class SnapshotFactory(factory.django.DjangoModelFactory):
    """A snapshot row (no stored bytes) uploaded by the users in `uploaded_by`."""

    class Meta:
        model = Snapshot
        skip_postgeneration_save = True

    sha256 = factory.Sequence(lambda n: hashlib.sha256(f"snapshot {n}".encode()).hexdigest())
    size = 100
    storage_key = factory.LazyAttribute(lambda snapshot: f"snapshots/{snapshot.sha256[:2]}/{snapshot.sha256}")

    @factory.post_generation
    def uploaded_by(snapshot, create, users, **kwargs):
        for user in users or []:
            SnapshotOwner.objects.create(snapshot=snapshot, user=user)


class DatasetFactory(factory.django.DjangoModelFactory):
    """A dataset row (no stored bytes) in its owner's namespace."""

    class Meta:
        model = Dataset

    name = factory.Sequence(lambda n: f"dataset-{n}")
    size = 100
    sha256 = factory.Sequence(lambda n: hashlib.sha256(f"dataset {n}".encode()).hexdigest())
    storage_key = factory.LazyAttribute(lambda dataset: f"datasets/{dataset.sha256[:2]}/{dataset.sha256}")


# --- an agent's requests (what scheduler.agent.artifacts sends) ---------------


def put(client: APIClient, run: NodeAssignment, path: str, data: bytes, *, token=None, digest=None):
    return client.put(
        f"/v1/tasks/{run.task_id}/artifacts/{path}",
        data=data,
        content_type="application/octet-stream",
        HTTP_X_FETCHML_TOKEN=str(token or run.token),
        HTTP_X_CONTENT_SHA256=digest or sha256(data),
    )


def commit(client: APIClient, run: NodeAssignment, files: dict[str, bytes], *, token=None):
    manifest = [{"path": path, "size": len(data), "sha256": sha256(data)} for path, data in files.items()]
    return client.post(
        f"/v1/tasks/{run.task_id}/artifacts/commit",
        data={"artifacts": manifest},
        format="json",
        HTTP_X_FETCHML_TOKEN=str(token or run.token),
    )


def upload_and_commit(client: APIClient, run: NodeAssignment, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert put(client, run, path, data).status_code == 201
    assert commit(client, run, files).status_code == 200
