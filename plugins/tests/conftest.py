import pytest

from fetchml.auth import Actor
from fetchml.models import ApiKey

SAMPLE = "plugins.tests.sample_plugin.SamplePlugin"


@pytest.fixture
def admin_actor(admin_user) -> Actor:
    return Actor(user=admin_user, role=ApiKey.Role.ADMIN)


@pytest.fixture
def sample_plugin(settings) -> str:
    """Registers the third-party test plugin by dotted path."""
    settings.FETCHML_PLUGINS = [SAMPLE]
    return "sample"
