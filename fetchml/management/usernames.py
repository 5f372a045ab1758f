"""Usernames given to operator commands, held to the user model's own rules."""

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError


def clean_username(username: str, *, argument: str) -> str:
    """`username` if the user model accepts it, else a CommandError naming `argument`."""
    user_model = get_user_model()
    field = user_model._meta.get_field(user_model.USERNAME_FIELD)
    try:
        if not username:  # the validators let an empty value pass
            raise ValidationError("it is empty")
        field.run_validators(username)  # the model's pattern and max_length
    except ValidationError as exc:
        raise CommandError(f"{argument} {username!r} is not a valid username: {' '.join(exc.messages)}") from None
    return username
