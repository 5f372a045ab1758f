"""Factories for tasks, experiments and the scheduler rows tasks point at."""

from datetime import timedelta

import factory
from django.utils import timezone

from fetchml.tests.factories import UserFactory
from scheduler.models import NodeAssignment, Reservation, Worker
from tasks.models import Experiment, Task
from tasks.services import dispatch_key


class ExperimentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Experiment

    owner = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"experiment-{n}")
    commit_id = "0" * 40


class TaskFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Task

    owner = factory.SubFactory(UserFactory)
    job_name = factory.Sequence(lambda n: f"job-{n}")
    priority = 5
    entrypoint = "train.py"
    created_at = factory.LazyFunction(timezone.now)
    queued_at = factory.LazyAttribute(lambda t: t.created_at)
    dispatch_key = factory.LazyAttribute(lambda t: dispatch_key(priority=t.priority, queued_at=t.queued_at))


class WorkerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Worker

    name = factory.Sequence(lambda n: f"gpu-box-{n}")
    status = Worker.Status.ACTIVE
    # Connected: an active worker without a connection is given no work (Worker.taking_work).
    channel_name = factory.Sequence(lambda n: f"specific.test!worker-{n}")
    cpu_cores = 32
    memory_gb = 128
    gpu_count = 4
    batch_slots = 4
    last_heartbeat = factory.LazyFunction(timezone.now)


class ReservationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Reservation

    owner = factory.SubFactory(UserFactory)
    gpu_count = 1
    status = Reservation.Status.ACTIVE
    expires_at = factory.LazyFunction(lambda: timezone.now() + timedelta(hours=1))


class NodeAssignmentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = NodeAssignment

    task = factory.SubFactory(TaskFactory)
    attempt = factory.LazyAttribute(lambda a: a.task.attempt)
    worker = factory.SubFactory(WorkerFactory)
