"""Reading and editing one experiment. Creating and listing live in tasks/services.py and tasks/selectors.py."""

import uuid
from typing import Any

from django.db import transaction

from fetchml.auth import Actor
from fetchml.errors import Invalid, NotFound
from tasks.models import Experiment

EDITABLE_FIELDS = frozenset({"name", "description", "commit_id", "status"})
# `deleted` is not reachable by an edit: deletion, if it comes, is its own operation.
SETTABLE_STATUSES = (Experiment.Status.ACTIVE, Experiment.Status.ARCHIVED)


def experiment_get(*, actor: Actor, experiment_id: uuid.UUID) -> Experiment:
    """The experiment if the caller owns it or is an admin; anyone else gets a 404."""
    experiments = Experiment.objects.select_related("owner").exclude(status=Experiment.Status.DELETED)
    if not actor.is_admin:
        experiments = experiments.filter(owner=actor.user)
    experiment = experiments.filter(pk=experiment_id).first()
    if experiment is None:
        raise NotFound("Experiment not found")
    return experiment


def experiment_update(*, experiment: Experiment, actor: Actor, **changes: Any) -> Experiment:
    """Rename, describe, archive/unarchive or set the commit of an experiment."""
    unknown = set(changes) - EDITABLE_FIELDS
    if unknown:
        raise TypeError(f"experiment_update() cannot change {sorted(unknown)}")
    if "status" in changes and changes["status"] not in SETTABLE_STATUSES:
        raise Invalid("Invalid status", details=[{"field": "status", "message": "must be one of: active, archived"}])
    if not (actor.is_admin or experiment.owner_id == actor.user.pk):
        raise NotFound("Experiment not found")
    with transaction.atomic():
        locked = (
            Experiment.objects.select_for_update()
            .select_related("owner")
            .exclude(status=Experiment.Status.DELETED)
            .filter(pk=experiment.pk)
            .first()
        )
        if locked is None:
            raise NotFound("Experiment not found")
        for name, value in changes.items():
            setattr(locked, name, value)
        locked.save(update_fields=[*changes, "updated_at"])
    return locked
