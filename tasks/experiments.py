"""Experiments: creating, reading and editing them (the list is a shared read, in tasks/selectors.py).

A name identifies an experiment among its owner's experiments that are not
deleted (the `experiment_owner_name_unique` constraint); taking one already in
use, by a create or a rename, is a Conflict naming `name`.
"""

import uuid
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from fetchml.auth import Actor
from fetchml.errors import Conflict, Invalid, NotFound
from tasks.models import Experiment

EDITABLE_FIELDS = frozenset({"name", "description", "commit_id", "status"})
# `deleted` is not reachable by an edit: deletion, if it comes, is its own operation.
SETTABLE_STATUSES = (Experiment.Status.ACTIVE, Experiment.Status.ARCHIVED)


def _name_in_use(experiment: Experiment) -> bool:
    """Whether another live experiment of the same owner has this one's name."""
    return (
        Experiment.objects.filter(owner_id=experiment.owner_id, name=experiment.name)
        .exclude(status=Experiment.Status.DELETED)
        .exclude(pk=experiment.pk)
        .exists()
    )


def _name_conflict(name: str) -> Conflict:
    return Conflict(
        f"An experiment named {name!r} already exists",
        details=[{"field": "name", "message": "The owner already has an experiment with this name."}],
    )


def _save_unique(experiment: Experiment, **save_kwargs: Any) -> None:
    """Save, answering a name already in use with a Conflict (the constraint decides, so two racing
    requests cannot both win); any other integrity error is left as it is."""
    try:
        with transaction.atomic():
            experiment.save(**save_kwargs)
    except IntegrityError:
        if experiment.status != Experiment.Status.DELETED and _name_in_use(experiment):
            raise _name_conflict(experiment.name) from None
        raise


def experiment_create(*, owner: AbstractBaseUser, name: str, description: str = "", commit_id: str = "") -> Experiment:
    experiment = Experiment(owner=owner, name=name, description=description, commit_id=commit_id)
    _save_unique(experiment, force_insert=True)
    return experiment


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
        _save_unique(locked, update_fields=[*changes, "updated_at"])
    return locked
