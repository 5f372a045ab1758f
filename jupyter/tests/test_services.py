"""Jupyter services and their tasks: endings, a lost worker, idle stop, activity, sealing."""

from datetime import UTC, datetime, timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from audit.models import AuditEvent
from fetchml.auth import Actor
from jupyter.models import JupyterService
from jupyter.sealing import seal, unseal
from jupyter.services import jupyter_activity, jupyter_ready, jupyter_start, scheduler_pass, sync_with_tasks
from scheduler.dispatch import dispatch_round
from scheduler.models import Worker
from scheduler.services import expire_leases
from scheduler.tests.factories import worker
from tasks.models import Task
from tasks.services import task_transition

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("queued_until_a_round")]


@pytest.fixture
def actor(user) -> Actor:
    return Actor(user=user, role="user")


def _dispatched(actor: Actor) -> JupyterService:
    """A service whose task a worker with one service slot has taken."""
    box = worker(service_slots=1)
    service = jupyter_start(actor=actor, name="nb")
    assert dispatch_round() == 1
    assert Task.objects.get(id=service.task_id).worker_id == box.id
    return service


def _running(actor: Actor) -> JupyterService:
    service = _dispatched(actor)
    task_transition(task_id=service.task_id, to="running")
    assert jupyter_ready(task_id=service.task_id, url="http://10.0.0.7:8888/", service_token="tok")
    service.refresh_from_db()
    return service


def test_service_task_is_dispatched_to_a_service_slot(actor):
    service = _dispatched(actor)
    assert Worker.objects.get().used_service_slots == 1
    assert Task.objects.get(id=service.task_id).kind == "service"


def test_service_whose_process_died_becomes_error_with_the_reason(actor):
    service = _running(actor)
    task_transition(task_id=service.task_id, to="failed", failure_reason="exit_code", error="Kernel exploded")
    assert sync_with_tasks() == 1
    service.refresh_from_db()
    assert (service.status, service.error, service.url, service.token_sealed) == ("error", "Kernel exploded", "", "")


def test_service_of_a_worker_whose_lease_expired_becomes_error(actor):
    service = _running(actor)
    Worker.objects.update(last_heartbeat=timezone.now() - timedelta(hours=1))
    expire_leases()
    assert Task.objects.get(id=service.task_id).status == "failed"  # services are not retried
    scheduler_pass()
    service.refresh_from_db()
    assert service.status == "error"
    assert service.error == "worker lost"
    assert Worker.objects.get().used_service_slots == 0


def test_stopping_service_whose_task_was_cancelled_becomes_stopped(actor, user):
    from jupyter.services import jupyter_stop

    service = _running(actor)
    jupyter_stop(service=service, actor=actor)
    task_transition(task_id=service.task_id, to="cancelled", failure_reason="cancelled")
    sync_with_tasks()
    service.refresh_from_db()
    assert service.status == "stopped"
    actions = AuditEvent.objects.filter(event_type="jupyter_changed").order_by("sequence_num")
    assert list(actions.values_list("action", flat=True)) == ["start", "running", "stop", "stopped"]


def test_live_services_of_live_tasks_are_left_alone(actor):
    _running(actor)
    assert sync_with_tasks() == 0


@override_settings(FETCHML_JUPYTER_IDLE_MINUTES=30)
def test_service_idle_for_longer_than_the_limit_is_stopped(actor):
    service = _running(actor)
    JupyterService.objects.filter(id=service.id).update(last_activity_at=timezone.now() - timedelta(minutes=31))
    assert scheduler_pass() == 1
    service.refresh_from_db()
    assert service.status == "stopping"
    assert Task.objects.get(id=service.task_id).cancel_requested_at is not None
    assert AuditEvent.objects.filter(event_type="jupyter_changed", action="idle_stop").exists()


@override_settings(FETCHML_JUPYTER_IDLE_MINUTES=30)
def test_recently_active_service_is_not_stopped(actor):
    service = _running(actor)
    JupyterService.objects.filter(id=service.id).update(last_activity_at=timezone.now() - timedelta(minutes=31))
    assert jupyter_activity(task_id=service.task_id, last_activity=timezone.now() - timedelta(minutes=1))
    assert scheduler_pass() == 0
    service.refresh_from_db()
    assert service.status == "running"


def test_activity_never_moves_backwards(actor):
    service = _running(actor)
    assert not jupyter_activity(task_id=service.task_id, last_activity=timezone.now() - timedelta(days=1))


def test_ready_after_a_stop_request_does_not_revive_the_service(actor):
    from jupyter.services import jupyter_stop

    service = _dispatched(actor)
    jupyter_stop(service=service, actor=actor)
    assert not jupyter_ready(task_id=service.task_id, url="http://10.0.0.7:8888/", service_token="tok")
    service.refresh_from_db()
    assert (service.status, service.token_sealed) == ("stopping", "")


def test_ready_said_again_changes_nothing(actor):
    service = _running(actor)

    assert not jupyter_ready(task_id=service.task_id, url="http://10.0.0.7:8888/", service_token="tok")

    again = JupyterService.objects.get(id=service.id)
    assert (again.status, again.token_sealed, again.last_activity_at) == (
        "running",
        service.token_sealed,
        service.last_activity_at,
    )
    assert AuditEvent.objects.filter(event_type="jupyter_changed", action="running").count() == 1


def test_ready_with_a_url_that_is_not_http_is_refused(actor):
    from fetchml.errors import Invalid

    service = _dispatched(actor)
    with pytest.raises(Invalid):
        jupyter_ready(task_id=service.task_id, url="javascript:alert(1)", service_token="tok")


@pytest.mark.parametrize("url", ["http://[::1", "http://10.0.0.7:8888/\nSet-Cookie: a", "http://10.0.0.7:8888/\t"])
def test_ready_with_a_malformed_url_is_refused(actor, url):
    from fetchml.errors import Invalid

    service = _dispatched(actor)
    with pytest.raises(Invalid):
        jupyter_ready(task_id=service.task_id, url=url, service_token="tok")


def test_activity_reported_in_the_future_counts_as_now(actor):
    service = _running(actor)
    before = timezone.now()

    assert jupyter_activity(task_id=service.task_id, last_activity=datetime(9999, 12, 31, 23, 59, tzinfo=UTC))

    service.refresh_from_db()
    assert before <= service.last_activity_at <= timezone.now()


def test_sealed_token_round_trips_and_is_not_readable():
    sealed = seal("abc123")
    assert "abc123" not in sealed
    assert unseal(sealed) == "abc123"


def test_token_sealed_under_another_secret_key_is_unreadable(settings):
    sealed = seal("abc123")
    settings.SECRET_KEY = "another-secret-key-for-this-test-only-0123456789"
    assert unseal(sealed) == ""


def test_tampered_token_is_unreadable():
    sealed = seal("abc123")
    assert unseal(sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")) == ""
