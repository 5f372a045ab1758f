from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from fetchml.management.usernames import clean_username
from fetchml.models import ApiKey
from fetchml.services import apikey_create, user_get_or_create

NAME_MAX = ApiKey._meta.get_field("name").max_length


class Command(BaseCommand):
    help = "Create an API key for USERNAME (the user is created if missing). The key is the last line printed."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", choices=ApiKey.Role.values, default=ApiKey.Role.USER)
        parser.add_argument("--name", default="", help="a label for the key, e.g. the machine it is for")

    def handle(self, *args, username: str, role: str, name: str, **options):
        clean_username(username, argument="USERNAME")
        if len(name) > NAME_MAX:
            raise CommandError(f"--name must be at most {NAME_MAX} characters")
        with transaction.atomic():
            user = user_get_or_create(username=username, is_staff=role == ApiKey.Role.ADMIN)
            if role == ApiKey.Role.ADMIN and not user.is_staff:
                user.is_staff = True
                user.save(update_fields=["is_staff"])
            key, raw = apikey_create(user=user, role=role, name=name)
        self.stderr.write(f"Created {role} key {key.prefix} for {username}. Store it now; it is not shown again.")
        self.stdout.write(raw)
