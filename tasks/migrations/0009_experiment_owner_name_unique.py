"""An experiment's name is unique among its owner's experiments that are not deleted.

Duplicates made before this rule are renamed, not refused: they were allowed
until now, and an upgrade that stops on users' data would leave the operator
editing rows by hand. Tasks point at experiments by id, so nothing else
changes. In each group of one owner's live experiments sharing a name, the
oldest keeps it and the others become "name (2)", "name (3)", ... in order of
creation, skipping any name the owner already uses. Each rename is logged.
"""

import logging

from django.conf import settings
from django.db import migrations, models
from django.db.models import Count, Q
from django.utils import timezone

logger = logging.getLogger("fetchml.migrations")

NAME_MAX_LENGTH = 128
DELETED = "deleted"


def _free_name(name: str, taken: set[str]) -> str:
    number = 2
    while True:
        suffix = f" ({number})"
        candidate = name[: NAME_MAX_LENGTH - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        number += 1


def rename_duplicate_names(apps, schema_editor) -> None:
    Experiment = apps.get_model("tasks", "Experiment")
    live = Experiment.objects.exclude(status=DELETED)
    groups = live.values("owner_id", "name").annotate(rows=Count("id")).filter(rows__gt=1).order_by("owner_id", "name")
    taken_by_owner: dict = {}
    for group in groups:
        owner_id, name = group["owner_id"], group["name"]
        if owner_id not in taken_by_owner:
            taken_by_owner[owner_id] = set(live.filter(owner_id=owner_id).values_list("name", flat=True))
        taken = taken_by_owner[owner_id]
        _keeper, *renamed = live.filter(owner_id=owner_id, name=name).order_by("created_at", "id")
        for experiment in renamed:
            new_name = _free_name(name, taken)
            taken.add(new_name)
            Experiment.objects.filter(pk=experiment.pk).update(name=new_name, updated_at=timezone.now())
            logger.warning("experiment %s: duplicate name %r renamed to %r", experiment.pk, name, new_name)


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0008_task_dataset_digests"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        # Going back leaves the new names: they are valid names either way.
        migrations.RunPython(rename_duplicate_names, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="experiment",
            constraint=models.UniqueConstraint(
                condition=~Q(status="deleted"), fields=("owner", "name"), name="experiment_owner_name_unique"
            ),
        ),
    ]
