from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from fetchml.management.usernames import clean_username
from fetchml.models import ApiKey
from fetchml.services import apikey_create, user_get_or_create

NAME_MAX = ApiKey._meta.get_field("name").max_length
# A hundred years: longer is no expiry at all, and far longer overflows the dates the database holds.
EXPIRES_IN_DAYS_MAX = 36500


class Command(BaseCommand):
    help = "Create an API key for USERNAME (the user is created if missing). The key is the last line printed."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", choices=ApiKey.Role.values, default=ApiKey.Role.USER)
        parser.add_argument("--name", default="", help="a label for the key, e.g. the machine it is for")
        parser.add_argument(
            "--expires-in-days",
            type=int,
            default=None,
            metavar="N",
            help=f"the key stops working after N days (1 to {EXPIRES_IN_DAYS_MAX})",
        )

    def handle(self, *args, username: str, role: str, name: str, expires_in_days: int | None, **options):
        clean_username(username, argument="USERNAME")
        if len(name) > NAME_MAX:
            raise CommandError(f"--name must be at most {NAME_MAX} characters")
        if expires_in_days is not None and expires_in_days < 1:
            raise CommandError("--expires-in-days must be 1 or more")
        if expires_in_days is not None and expires_in_days > EXPIRES_IN_DAYS_MAX:
            raise CommandError(
                f"--expires-in-days must be at most {EXPIRES_IN_DAYS_MAX} (100 years); leave it out for a key that "
                "does not expire"
            )
        expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        with transaction.atomic():
            user = user_get_or_create(username=username, is_staff=role == ApiKey.Role.ADMIN)
            if not user.is_active:
                # Its keys are refused (ApiKey.is_usable): one printed now could never work.
                raise CommandError(f"user {username} is inactive: reactivate the account before creating a key")
            if role == ApiKey.Role.ADMIN and not user.is_staff:
                user.is_staff = True
                user.save(update_fields=["is_staff"])
            other_roles = sorted(
                set(user.api_keys.filter(revoked_at__isnull=True).exclude(role=role).values_list("role", flat=True))
            )
            key, raw = apikey_create(user=user, role=role, name=name, expires_at=expires_at)
        if other_roles:
            # One account, several roles: each key acts as this user with its own role (a user key on a
            # worker account submits tasks as that account; an admin key sees everyone's work).
            self.stderr.write(
                f"Note: {username} also has live {' and '.join(other_roles)} key(s); "
                f"this {role} key acts as the same user. Use another username to keep them apart."
            )
        until = f", valid until {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""
        self.stderr.write(
            f"Created {role} key {key.prefix} for {username}{until}. Store it now; it is not shown again."
        )
        self.stdout.write(raw)
