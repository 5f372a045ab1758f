import factory

from fetchml.tests.factories import UserFactory
from tasks.models import Task


class TaskFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Task

    owner = factory.SubFactory(UserFactory)
    job_name = factory.Sequence(lambda n: f"job-{n}")
    entrypoint = "python train.py"
    plugin_configs = factory.LazyFunction(dict)
    plugin_status = factory.LazyFunction(dict)
