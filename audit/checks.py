"""System checks: say plainly when chain roots cannot be signed."""

from typing import Any

from django.core.checks import Warning, register

from fetchml.conf import app_settings

MIN_KEY_LENGTH = 32


@register(deploy=True)
def signing_key_set_check(app_configs: Any, **kwargs: Any) -> list[Warning]:
    """Part of `check --deploy`; the API responses and commands also say it every time."""
    if not app_settings.AUDIT_SIGNING_KEY:
        return [
            Warning(
                "FETCHML_AUDIT_SIGNING_KEY is not set: audit chain roots and checkpoints are not signed.",
                hint="Set it to a long random secret kept outside the database (e.g. `openssl rand -hex 32`).",
                id="audit.W001",
            )
        ]
    return []


@register()
def signing_key_length_check(app_configs: Any, **kwargs: Any) -> list[Warning]:
    key = app_settings.AUDIT_SIGNING_KEY
    if key and len(key) < MIN_KEY_LENGTH:
        return [
            Warning(
                f"FETCHML_AUDIT_SIGNING_KEY is shorter than {MIN_KEY_LENGTH} characters and may be guessable.",
                hint="Use a long random secret, e.g. `openssl rand -hex 32`.",
                id="audit.W002",
            )
        ]
    return []
