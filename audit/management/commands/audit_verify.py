"""`manage.py audit_verify`: the chain check of POST /v1/audit/verify, for the command line."""

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit import checkpoints
from audit.services import audit_verify

USAGE_ERROR = 2


class Command(BaseCommand):
    help = (
        "Verify the audit hash chain. Exit status 0 when it is intact, 1 when it is not, 2 on a usage error "
        "(conflicting options, an unreadable or malformed checkpoint, a checkpoint signed with another key). "
        "With a root published earlier (--expect-root/--expect-count) or a saved checkpoint (--checkpoint) "
        "it also detects truncation, rollback and a recomputed chain."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--expect-root", metavar="HASH", help="root hash published earlier")
        parser.add_argument("--expect-count", metavar="N", type=int, help="number of events at that root")
        parser.add_argument("--checkpoint", metavar="FILE", help="checkpoint JSON from audit_checkpoint or chain-root")
        parser.add_argument(
            "--no-record",
            action="store_true",
            help="do not append an audit_verified event (for a read-only database role)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        checkpoint = self._checkpoint(options)
        result = audit_verify(user=None, checkpoint=checkpoint, source="cli", record_event=not options["no_record"])
        for warning in result.warnings:
            self.stderr.write(f"warning: {warning}")
        if checkpoint is not None and result.checkpoint_checked:
            signed = "signed by this server" if result.checkpoint_signature_verified else "unsigned or unchecked"
            self.stdout.write(f"checked against checkpoint at {checkpoint.sequence_num} ({signed})")
        elif checkpoint is not None:
            self.stdout.write(
                f"checkpoint at {checkpoint.sequence_num} not checked: the walk stopped at an earlier event"
            )
        if not result.valid:
            raise CommandError(
                f"audit chain is NOT valid: first tampered event {result.first_tampered}: {result.reason} "
                f"({result.total_events} events stored)",
                returncode=1,
            )
        self.stdout.write(f"audit chain valid: {result.total_events} events, root {result.chain_root_hash}")

    def _checkpoint(self, options: dict[str, Any]) -> checkpoints.Checkpoint | None:
        root, count, path = options["expect_root"], options["expect_count"], options["checkpoint"]
        if path and (root or count is not None):
            raise CommandError("use either --checkpoint or --expect-root/--expect-count", returncode=USAGE_ERROR)
        if (root is None) != (count is None):
            raise CommandError("--expect-root and --expect-count go together", returncode=USAGE_ERROR)
        try:
            if path:
                return checkpoints.parse(json.loads(Path(path).read_text(encoding="utf-8")))
            if root is not None:
                return checkpoints.parse({"sequence_num": count, "root_hash": root})
        except OSError as exc:
            raise CommandError(f"cannot read checkpoint: {exc}", returncode=USAGE_ERROR) from exc
        except ValueError as exc:  # includes JSON errors and CheckpointError
            raise CommandError(f"bad checkpoint: {exc}", returncode=USAGE_ERROR) from exc
        return None
