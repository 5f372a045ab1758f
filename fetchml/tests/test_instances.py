"""Model instances built without Model.__init__ (fetchml.instances)."""

import pytest
from django.db.models.signals import post_init

from fetchml.instances import unsaved
from scheduler.models import NodeAssignment
from scheduler.tests.factories import queued_task, worker

pytestmark = pytest.mark.django_db


def _fields(instance) -> dict:
    return {name: value for name, value in vars(instance).items() if name != "_state"}


def test_an_unsaved_instance_has_the_given_values_and_every_other_field_its_default():
    task, box = queued_task(), worker()

    built = unsaved(NodeAssignment, task_id=task.id, attempt=1, worker_id=box.id, gpu_indices=[0])
    by_django = NodeAssignment(task_id=task.id, attempt=1, worker_id=box.id, gpu_indices=[0])

    made_anew = ("id", "token", "created_at")  # callable defaults: a new value per instance
    assert _fields(built).keys() == _fields(by_django).keys()
    assert {name: value for name, value in _fields(built).items() if name not in made_anew} == {
        name: value for name, value in _fields(by_django).items() if name not in made_anew
    }
    assert built._state.adding is True


def test_unsaved_instances_each_get_their_own_default_ids():
    task, box = queued_task(), worker()

    first, second = (unsaved(NodeAssignment, task_id=task.id, worker_id=box.id) for _ in range(2))

    assert first.id != second.id
    assert first.token != second.token


def test_an_unsaved_instance_saves_as_a_new_row():
    task, box = queued_task(), worker()

    unsaved(NodeAssignment, task_id=task.id, attempt=1, worker_id=box.id).save()

    assert NodeAssignment.objects.filter(task_id=task.id, worker_id=box.id).count() == 1


def test_a_value_for_no_field_is_refused():
    with pytest.raises(TypeError, match="no field 'task'"):
        unsaved(NodeAssignment, task=None)


def test_an_unsaved_instance_is_built_by_django_while_the_model_has_init_listeners():
    task, box = queued_task(), worker()
    initialised = []

    def listener(sender, instance, **kwargs):
        initialised.append(instance)

    post_init.connect(listener, sender=NodeAssignment)
    try:
        built = unsaved(NodeAssignment, task_id=task.id, worker_id=box.id)
    finally:
        post_init.disconnect(listener, sender=NodeAssignment)

    assert initialised == [built]
