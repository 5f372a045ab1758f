"""`manage.py audit_export`: the chain as JSON Lines an outside verifier checks with SHA-256 alone."""

import sys
from pathlib import Path
from typing import Any, BinaryIO

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.selectors import export_lines


class Command(BaseCommand):
    help = (
        'Write audit events as JSON Lines, one {"event":<canonical form>,"event_hash":"<hex>"} per line, '
        "in chain order. The canonical form is embedded byte for byte as it was hashed (docs/audit.md)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since",
            metavar="SEQ",
            type=int,
            default=0,
            help="export the events after this sequence number (default 0: the whole chain)",
        )
        parser.add_argument("--output", metavar="FILE", default="-", help="file to write (default: standard output)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["since"] < 0:
            raise CommandError("--since must be 0 or more")
        if options["output"] == "-":
            self._write(sys.stdout.buffer, options["since"])
            return
        try:
            with Path(options["output"]).open("wb") as out:
                self._write(out, options["since"])
        except OSError as exc:
            raise CommandError(f"cannot write {options['output']}: {exc.strerror}") from None

    @staticmethod
    def _write(out: BinaryIO, since: int) -> None:
        # Bytes, not text: the lines must reach the verifier exactly as hashed,
        # whatever the terminal's encoding.
        for line in export_lines(since=since):
            out.write(line)
        out.flush()
