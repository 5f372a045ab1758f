"""`manage.py check`: a bad FETCHML_PLUGINS entry must stop start-up with a clear message."""

from django.core.checks import CheckMessage, Error, register
from django.core.exceptions import ImproperlyConfigured

from plugins.registry import get_plugins


@register()
def plugins_check(app_configs, **kwargs) -> list[CheckMessage]:
    try:
        get_plugins()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), hint="Fix or remove the entry in FETCHML_PLUGINS.", id="plugins.E001")]
    return []
