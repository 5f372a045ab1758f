"""Deployment checks of FetchML (`manage.py check --deploy`)."""

from django.conf import settings
from django.core.checks import CheckMessage, Tags, Warning, register


@register(Tags.caches, deploy=True)
def shared_cache_check(app_configs, **kwargs) -> list[CheckMessage]:
    """Several server processes need one cache and one channel layer: Redis.

    The embedded mode (no DATABASE_URL) is one process and needs neither.
    """
    if settings.EMBEDDED or settings.REDIS_URL:
        return []
    return [
        Warning(
            "DATABASE_URL is set but REDIS_URL is not: rate-limit counters and the channel layer "
            "are local to each process, so limits are multiplied and events are not delivered across processes.",
            hint="Set REDIS_URL=redis://host:6379/0.",
            id="fetchml.W001",
        )
    ]
