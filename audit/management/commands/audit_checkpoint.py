"""`manage.py audit_checkpoint`: print the current chain root as a signed checkpoint."""

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.checkpoints import NO_KEY_WARNING, signing_configured
from audit.selectors import chain_checkpoint


class Command(BaseCommand):
    help = (
        "Print the audit chain root as a checkpoint signed with FETCHML_AUDIT_SIGNING_KEY (HMAC-SHA256). "
        "Keep it outside the database; `audit_verify --checkpoint FILE` checks the chain against it later."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--unsigned",
            action="store_true",
            help="print the root without a signature when no key is configured (the root alone is still useful "
            "if it is published somewhere the database's writers cannot change)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not signing_configured():
            if not options["unsigned"]:
                raise CommandError(f"{NO_KEY_WARNING}. Set the key, or pass --unsigned to print the bare root.")
            self.stderr.write(f"warning: {NO_KEY_WARNING}")
        checkpoint = chain_checkpoint()
        self.stdout.write(json.dumps(checkpoint.as_dict(), sort_keys=True))
