"""Writes of Jupyter services: start, stop, the worker's reports, and the scheduler's duties.

A service is a task of kind `service` (it holds a worker's service slot while it
runs) plus this row. Life cycle: `starting` (queued or launching) -> `running`
(the worker saw its HTTP endpoint answer: `service_ready`) -> `stopping` (the
owner asked; its task is being cancelled) -> `stopped`. When the task ends any
other way -- the Jupyter process died, the worker went offline, the run could
not start -- the service becomes `error` with the reason. The scheduler loop
calls `scheduler_pass()`, which applies those task endings and stops idle
services. Every status change is audited (`jupyter_changed`).
"""

import functools
import logging
import posixpath
import re
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import record
from fetchml.auth import Actor
from fetchml.conf import app_settings
from fetchml.errors import Invalid
from fetchml.models import ApiKey
from jupyter.models import JupyterService
from jupyter.sealing import seal
from jupyter.selectors import DEFAULT_IMAGE
from tasks.models import Task
from tasks.services import task_cancel, task_submit
from tasks.states import FINAL_STATES, TaskStatus

logger = logging.getLogger("fetchml.jupyter")

Status = JupyterService.Status
LIVE = (Status.STARTING, Status.RUNNING, Status.STOPPING)
MAX_WORKSPACE = 1024
MAX_URL = 200  # JupyterService.url
STOP_GRACE_SECONDS = 10


def clean_workspace(workspace: Any) -> str:
    """A directory relative to the worker's work root: no absolute path, no `..`, no control characters."""
    if workspace is None:
        return ""
    error = None
    if not isinstance(workspace, str):
        error = "Must be a string."
    elif len(workspace) > MAX_WORKSPACE or any(not ch.isprintable() for ch in workspace):
        error = f"At most {MAX_WORKSPACE} printable characters."
    elif workspace.startswith(("/", "\\")) or (len(workspace) > 1 and workspace[1] == ":"):
        error = "Must be relative to the worker's work directory."
    elif ".." in workspace.replace("\\", "/").split("/"):
        error = "Must not contain '..'."
    if error:
        raise Invalid("Invalid workspace", details=[{"field": "workspace", "message": error}])
    normalised = posixpath.normpath(workspace.replace("\\", "/"))
    return "" if normalised == "." else normalised


def _audit(service: JupyterService, *, action: str, user: Any = "", actor: Actor | None = None, **extra: Any) -> None:
    record(
        event_type="jupyter_changed",
        user=user,
        resource=f"jupyter:{service.id}",
        action=action,
        ip_address=actor.ip_address if actor else None,
        metadata={"name": service.name, "status": service.status, **extra},
    )


def _move(service: JupyterService, *, to: str, from_states: tuple[str, ...], **fields: Any) -> bool:
    """A conditional UPDATE of the status, so concurrent reports cannot move a service backwards."""
    won = JupyterService.objects.filter(id=service.id, status__in=from_states).update(status=to, **fields)
    if won:
        service.status = to
        for name, value in fields.items():
            setattr(service, name, value)
    return bool(won)


def service_job_name(name: str) -> str:
    """The job name of a service's task: `jupyter-<name>`, within the job-name rule (letters, digits,
    `_`, `-`; 64 characters), so `my.notebook` runs as `jupyter-my_notebook`. The service is found
    from its task by `jupyter_service_id`, not by this name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"jupyter-{name}")[:64]


def jupyter_start(*, actor: Actor, name: str, workspace: str = "", image: str = "") -> JupyterService:
    """Create the service and queue its task on a service slot."""
    workspace = clean_workspace(workspace)
    with transaction.atomic():
        service = JupyterService.objects.create(
            owner=actor.user, name=name, workspace=workspace, image=image or DEFAULT_IMAGE
        )
        task_submit(
            owner=actor.user,
            actor=actor,
            job_name=service_job_name(name),
            kind=Task.Kind.SERVICE,
            entrypoint="jupyter server",
            metadata={"jupyter_service_id": str(service.id)},
            # A service is not retried: a crash or a lost worker shows as `error`, and the owner decides.
            max_retries=0,
            cancel_grace_seconds=STOP_GRACE_SECONDS,
            # Linked before the task can be placed: its `assign` carries the service it starts.
            linked=functools.partial(_link, service),
        )
        _audit(service, action="start", user=actor.user, actor=actor, workspace=workspace, image=service.image)
    return service


def _link(service: JupyterService, task: Task) -> None:
    service.task = task
    service.save(update_fields=["task"])


def jupyter_stop(*, service: JupyterService, actor: Actor) -> JupyterService:
    """Ask for the service to stop: its task is cancelled, the worker kills Jupyter and frees the slot."""
    with transaction.atomic():
        service = JupyterService.objects.select_for_update().get(id=service.id)
        if service.status not in LIVE or service.status == Status.STOPPING:
            return service  # stopping twice, or stopping a stopped service, changes nothing
        task = Task.objects.filter(id=service.task_id).first()
        if task is None or task.status in FINAL_STATES:
            _move(service, to=Status.STOPPED, from_states=LIVE, url="", token_sealed="")
        else:
            _move(service, to=Status.STOPPING, from_states=LIVE)
            task = task_cancel(task=task, actor=actor)
            if task.status in FINAL_STATES:  # it was still queued: cancelled at once
                _move(service, to=Status.STOPPED, from_states=LIVE, url="", token_sealed="")
        _audit(service, action="stop", user=actor.user, actor=actor)
    return service


def jupyter_ready(*, task_id: Any, url: str, service_token: str) -> bool:
    """The worker reached the service's HTTP endpoint: it is running, at `url`, with this token.

    The caller has checked that the report comes from the worker currently running the task.
    """
    try:
        parts = urlsplit(url)
        hostname = parts.hostname  # raises for a malformed host, such as an unclosed IPv6 bracket
    except ValueError:
        parts, hostname = None, None
    # urlsplit drops tabs and newlines as it reads: a URL holding any is not given to clients.
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not hostname
        or len(url) > MAX_URL
        or not url.isprintable()
    ):
        raise Invalid("Invalid service URL", details=[{"field": "url", "message": "An http(s) URL."}])
    with transaction.atomic():
        service = JupyterService.objects.select_for_update().filter(task_id=task_id).first()
        if service is None:
            return False
        moved = _move(
            service,
            to=Status.RUNNING,
            from_states=(Status.STARTING,),
            url=url,
            token_sealed=seal(service_token),
            last_activity_at=timezone.now(),
            error="",
        )
        if moved:
            _audit(service, action="running", url=url)
    return moved


def jupyter_activity(*, task_id: Any, last_activity: datetime) -> bool:
    """Jupyter's own `last_activity`, reported by the worker; only ever moves forward, and never past
    now (a worker's clock ahead, or a date past any the database holds, is taken as now)."""
    last_activity = min(last_activity, timezone.now())
    updated = JupyterService.objects.filter(task_id=task_id, status=Status.RUNNING, last_activity_at__lt=last_activity)
    return bool(updated.update(last_activity_at=last_activity))


def _ending_of(service: JupyterService, task: Task | None) -> tuple[str, str]:
    """(new status, error) for a live service whose task has ended."""
    if task is None:
        return Status.ERROR, "its task was deleted"
    if service.status == Status.STOPPING or task.status == TaskStatus.CANCELLED:
        return Status.STOPPED, ""
    if task.status == TaskStatus.COMPLETED:
        return Status.STOPPED, ""  # Jupyter was shut down from its own UI
    if task.failure_reason == Task.FailureReason.WORKER_LOST:
        # What befell the worker (lost, shut down, drained): the first line; Jupyter's output is in the log.
        return Status.ERROR, (task.error.strip().splitlines() or ["worker lost"])[0]
    reason = task.error.strip() or task.failure_reason or "the service ended"
    return Status.ERROR, reason[-4000:]


def sync_with_tasks() -> int:
    """Services whose task has ended become `stopped` or `error`; the number changed."""
    ended = JupyterService.objects.filter(Q(task__isnull=True) | Q(task__status__in=FINAL_STATES), status__in=LIVE)
    changed = 0
    for service_id in ended.values_list("id", flat=True):
        with transaction.atomic():
            service = JupyterService.objects.select_for_update().filter(id=service_id, status__in=LIVE).first()
            if service is None:
                continue
            task = Task.objects.filter(id=service.task_id).first()
            if task is not None and task.status not in FINAL_STATES:
                continue
            status, error = _ending_of(service, task)
            if _move(service, to=status, from_states=LIVE, error=error, url="", token_sealed=""):
                _audit(service, action=status, user="", reason=error[:500])
                changed += 1
    return changed


def stop_idle(*, now: datetime | None = None) -> int:
    """Stop running services with no activity for JUPYTER_IDLE_MINUTES (0 turns this off)."""
    minutes = app_settings.JUPYTER_IDLE_MINUTES
    if not minutes:
        return 0
    cutoff = (now or timezone.now()) - timedelta(minutes=minutes)
    idle = JupyterService.objects.filter(status=Status.RUNNING, last_activity_at__lt=cutoff).select_related("owner")
    stopped = 0
    for service in idle:
        # The stop is done on the owner's behalf; the audit event says it was the idle rule.
        actor = Actor(user=service.owner, role=ApiKey.Role.USER)
        with transaction.atomic():
            jupyter_stop(service=service, actor=actor)
            _audit(service, action="idle_stop", user="", idle_minutes=minutes)
        logger.info("jupyter service %s idle for %s minutes; stopping it", service.id, minutes)
        stopped += 1
    return stopped


def scheduler_pass() -> int:
    """The Jupyter part of a scheduler pass: apply task endings, then stop idle services."""
    return sync_with_tasks() + stop_idle()
