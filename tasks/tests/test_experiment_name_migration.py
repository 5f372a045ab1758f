"""Migration 0009 makes names unique per owner, renaming the duplicates made before it."""

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from fetchml.tests.factories import UserFactory

BEFORE = ("tasks", "0008_task_dataset_digests")
AFTER = ("tasks", "0009_experiment_owner_name_unique")


@pytest.fixture
def migrate_to():
    """Migrate tasks to a state; the test's end migrates everything forward again."""

    def migrate(target: tuple[str, str]):
        executor = MigrationExecutor(connection)
        executor.migrate([target])
        return executor.loader.project_state([target]).apps

    yield migrate
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.mark.django_db(transaction=True)
def test_migration_keeps_the_oldest_name_and_numbers_the_later_duplicates(migrate_to):
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    Experiment = migrate_to(BEFORE).get_model("tasks", "Experiment")
    start = timezone.now()

    def make(owner, name: str, minutes: int, status: str = "active"):
        return Experiment.objects.create(
            owner_id=owner.pk, name=name, status=status, created_at=start + timedelta(minutes=minutes)
        ).pk

    oldest, second, third = make(alice, "base", 0), make(alice, "base", 1), make(alice, "base", 2)
    already_numbered = make(alice, "base (2)", 3)
    deleted = make(alice, "base", 4, status="deleted")
    bobs = make(bob, "base", 5)
    long_first, long_second = make(alice, "x" * 128, 6), make(alice, "x" * 128, 7)

    Experiment = migrate_to(AFTER).get_model("tasks", "Experiment")

    names = dict(Experiment.objects.values_list("pk", "name"))
    assert (names[oldest], names[second], names[third]) == ("base", "base (3)", "base (4)")
    assert (names[already_numbered], names[deleted], names[bobs]) == ("base (2)", "base", "base")
    assert (names[long_first], names[long_second]) == ("x" * 128, "x" * 124 + " (2)")
