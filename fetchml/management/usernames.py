"""Usernames given to operator commands, held to the user model's own rules."""

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError


def clean_username(username: str, *, argument: str) -> str:
    """`username` if the user model accepts it, else a CommandError naming `argument`."""
    field = get_user_model()._meta.get_field(get_user_model().USERNAME_FIELD)
    try:
        field.run_validators(username)
        if not username or len(username) > field.max_length:
            raise ValidationError(f"1 to {field.max_length} characters")
    except ValidationError as exc:
        raise CommandError(f"{argument} {username!r} is not a valid username: {' '.join(exc.messages)}") from None
    return username
