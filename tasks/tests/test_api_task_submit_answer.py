"""POST /v1/tasks answers from what its transaction read: a lost connection after the commit
cannot turn a created task into an error (which a client would answer by submitting it again)."""

import psycopg
import pytest
from django.db import connection

from conftest import requires_postgres
from tasks import services
from tasks.models import Task


def _terminate_from_outside(backend_pid: int) -> None:
    """End a database session as a server restart or a network cut would: from another session."""
    settings = connection.settings_dict
    with psycopg.connect(
        dbname=settings["NAME"], host=settings["HOST"], port=settings["PORT"], user=settings["USER"], autocommit=True
    ) as outside:
        outside.execute("SELECT pg_terminate_backend(%s)", [backend_pid])


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_submission_whose_connection_drops_after_the_commit_is_answered_created(user_client, monkeypatch):
    submit = services.task_submit

    def submit_then_lose_the_connection(**fields):
        task = submit(**fields)
        _terminate_from_outside(connection.connection.info.backend_pid)
        return task

    monkeypatch.setattr(services, "task_submit", submit_then_lose_the_connection)

    response = user_client.post("/v1/tasks", {"job_name": "once", "entrypoint": "true"}, format="json")

    connection.close()  # the test's own session was the one cut
    assert response.status_code == 201, response.json()
    assert [str(pk) for pk in Task.objects.values_list("id", flat=True)] == [response.json()["id"]]
