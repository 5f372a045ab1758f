"""GET /v1/queue: queue depth, work in flight, today's outcomes and active workers."""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from scheduler.models import Worker
from tasks.selectors import queue_stats, utc_midnight
from tasks.states import TaskStatus
from tasks.tests.factories import TaskFactory, WorkerFactory

pytestmark = pytest.mark.django_db


def test_queue_stats_count_each_bucket(user_client, user, other_user):
    today = timezone.now()
    yesterday = utc_midnight() - timedelta(minutes=1)
    TaskFactory.create_batch(2, owner=user, status=TaskStatus.QUEUED)
    TaskFactory(owner=other_user, status=TaskStatus.QUEUED)
    for status in (TaskStatus.PREPARING, TaskStatus.RUNNING, TaskStatus.COLLECTING):
        TaskFactory(owner=user, status=status)
    TaskFactory(owner=user, status=TaskStatus.COMPLETED, ended_at=today)
    TaskFactory(owner=user, status=TaskStatus.COMPLETED, ended_at=yesterday)
    TaskFactory(owner=user, status=TaskStatus.FAILED, ended_at=today)
    TaskFactory(owner=user, status=TaskStatus.FAILED, ended_at=yesterday)
    TaskFactory(owner=user, status=TaskStatus.CANCELLED, ended_at=today)
    WorkerFactory.create_batch(2, status=Worker.Status.ACTIVE)
    WorkerFactory(status=Worker.Status.DRAINING)
    WorkerFactory(status=Worker.Status.OFFLINE)

    response = user_client.get("/v1/queue")

    assert response.status_code == 200
    assert response.json() == {"queued": 3, "running": 3, "completed": 1, "failed": 1, "workers": 2}


def test_queue_stats_of_an_empty_system_are_zero(user_client):
    assert user_client.get("/v1/queue").json() == {"queued": 0, "running": 0, "completed": 0, "failed": 0, "workers": 0}


def test_today_starts_at_utc_midnight():
    now = datetime(2025, 3, 4, 0, 30, tzinfo=UTC)
    assert utc_midnight(now) == datetime(2025, 3, 4, tzinfo=UTC)


def test_task_finished_just_after_utc_midnight_counts_as_today(user):
    now = datetime(2025, 3, 4, 0, 30, tzinfo=UTC)
    TaskFactory(owner=user, status=TaskStatus.COMPLETED, ended_at=datetime(2025, 3, 4, 0, 0, 1, tzinfo=UTC))
    TaskFactory(owner=user, status=TaskStatus.COMPLETED, ended_at=datetime(2025, 3, 3, 23, 59, 59, tzinfo=UTC))
    assert queue_stats(now=now)["completed"] == 1
