"""audit_verify, audit_export (checked by the standalone verifier of docs/audit.md), audit_checkpoint."""

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction

from audit.management.commands.audit_verify import Command
from audit.models import AuditEvent
from audit.selectors import chain_checkpoint
from audit.services import record
from audit.tests import tampering
from audit.tests.factories import append_events
from audit.tests.processes import REPO_ROOT, child_env, manage

KEY = "c" * 40


def _verify(*args: str) -> str:
    out = StringIO()
    call_command("audit_verify", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _verify_fails(*args: str) -> CommandError:
    with pytest.raises(CommandError) as failure:
        call_command("audit_verify", *args, stdout=StringIO(), stderr=StringIO())
    return failure.value


def _docs_verifier(tmp_path: Path) -> Path:
    docs = (REPO_ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    code = docs.split("<!-- verifier -->\n```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "verify_audit.py"
    script.write_text(code, encoding="utf-8")
    return script


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=child_env())


@pytest.mark.django_db
def test_audit_verify_of_an_intact_chain_succeeds_and_records_the_check() -> None:
    append_events(5)
    assert "audit chain valid: 5 events" in _verify()
    assert AuditEvent.objects.get(sequence_num=6).event_type == "audit_verified"


@pytest.mark.django_db
def test_audit_verify_no_record_leaves_the_chain_alone() -> None:
    append_events(5)
    _verify("--no-record")
    assert AuditEvent.objects.count() == 5


@pytest.mark.django_db
def test_audit_verify_of_a_tampered_chain_exits_1_naming_the_event() -> None:
    append_events(5)
    tampering.set_field(3, "user_id", "mallory")
    failure = _verify_fails()
    assert failure.returncode == 1
    assert "first tampered event 3" in str(failure)


@pytest.mark.django_db
def test_audit_verify_against_an_earlier_root_detects_truncation() -> None:
    append_events(8)
    root = chain_checkpoint()
    tampering.delete_after(5, fix_head=True)
    failure = _verify_fails("--expect-root", root.root_hash, "--expect-count", str(root.sequence_num))
    assert failure.returncode == 1
    assert "first tampered event 6" in str(failure)


@pytest.mark.django_db
def test_audit_verify_against_the_current_root_succeeds() -> None:
    append_events(4)
    root = chain_checkpoint()
    assert "valid" in _verify("--expect-root", root.root_hash, "--expect-count", "4", "--no-record")


@pytest.mark.django_db
def test_audit_verify_with_a_signed_checkpoint_file_detects_a_recomputed_chain(tmp_path, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = KEY
    append_events(6)
    saved = tmp_path / "checkpoint.json"
    call_command("audit_checkpoint", stdout=(out := StringIO()))
    saved.write_text(out.getvalue())
    assert "signed by this server" in _verify("--checkpoint", str(saved), "--no-record")
    tampering.rehash_from(1, resource="file:rewritten")
    failure = _verify_fails("--checkpoint", str(saved))
    assert (failure.returncode, "first tampered event 6" in str(failure)) == (1, True)


@pytest.mark.django_db
def test_audit_verify_refuses_a_checkpoint_signed_with_another_key(tmp_path, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = KEY
    append_events(2)
    saved = tmp_path / "checkpoint.json"
    saved.write_text(json.dumps({**chain_checkpoint().as_dict(), "signature": "ab" * 32}))
    failure = _verify_fails("--checkpoint", str(saved))
    assert failure.returncode == 2
    assert "signature does not match" in str(failure)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args", [["--expect-root", "0" * 64], ["--checkpoint", "x.json", "--expect-count", "1", "--expect-root", "0" * 64]]
)
def test_audit_verify_misuse_is_a_usage_error(args) -> None:
    assert _verify_fails(*args).returncode == 2


@pytest.mark.django_db
def test_audit_export_to_a_file_it_cannot_write_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(CommandError, match=r"cannot write .*missing/out\.jsonl: No such file or directory"):
        call_command("audit_export", "--output", str(tmp_path / "missing" / "out.jsonl"), stdout=StringIO())


def test_audit_checkpoint_without_a_key_refuses_to_pretend(settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = ""
    with pytest.raises(CommandError, match="FETCHML_AUDIT_SIGNING_KEY is not set"):
        call_command("audit_checkpoint", stdout=StringIO())


@pytest.mark.django_db
def test_audit_checkpoint_unsigned_prints_the_bare_root_with_a_warning(settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = ""
    append_events(3)
    out, err = StringIO(), StringIO()
    call_command("audit_checkpoint", "--unsigned", stdout=out, stderr=err)
    printed = json.loads(out.getvalue())
    assert (printed["sequence_num"], printed["signature"]) == (3, None)
    assert "not set" in err.getvalue()


@pytest.mark.django_db(transaction=True)
def test_audit_verify_exit_status_from_a_real_process() -> None:
    append_events(4)
    assert _run(*manage("audit_verify", "--no-record")).returncode == 0
    tampering.set_field(2, "action", "write")
    completed = _run(*manage("audit_verify", "--no-record"))
    assert completed.returncode == 1
    assert "first tampered event 2" in completed.stderr


def _export(tmp_path: Path, *args: str) -> Path:
    export = tmp_path / "audit.jsonl"
    completed = _run(*manage("audit_export", "--output", str(export), *args))
    assert completed.returncode == 0, completed.stderr
    return export


def _run_verifier(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(_docs_verifier(tmp_path)), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def exported_chain() -> AuditEvent:
    append_events(30, batch=7)
    with transaction.atomic():  # non-ASCII and control characters survive byte for byte
        record(event_type="file_access", user="zoë", resource="file:日本/\u2028\n", metadata={"q": 'a "b" \\ c'})
    append_events(3)
    return AuditEvent.objects.latest("sequence_num")


@pytest.mark.django_db(transaction=True)
def test_the_documented_verifier_accepts_a_real_export(tmp_path, exported_chain) -> None:
    completed = _run_verifier(tmp_path, str(_export(tmp_path)))
    assert completed.returncode == 0, completed.stderr
    last = exported_chain
    expected = f"OK {last.sequence_num} events, last sequence_num {last.sequence_num}, root {last.event_hash}"
    assert completed.stdout.strip() == expected


@pytest.mark.django_db(transaction=True)
def test_the_documented_verifier_checks_a_partial_export_from_a_known_hash(tmp_path, exported_chain) -> None:
    known = AuditEvent.objects.get(sequence_num=20).event_hash
    completed = _run_verifier(tmp_path, str(_export(tmp_path, "--since", "20")), known)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(f"OK {exported_chain.sequence_num - 20} events")


@pytest.mark.django_db(transaction=True)
def test_the_documented_verifier_rejects_an_export_of_a_tampered_chain(tmp_path, exported_chain) -> None:
    tampering.set_field(12, "success", False)
    completed = _run_verifier(tmp_path, str(_export(tmp_path)))
    assert completed.returncode == 1
    assert "event 12: content does not match its hash" in completed.stderr


@pytest.mark.django_db(transaction=True)
def test_the_documented_verifier_rejects_an_export_with_a_missing_line(tmp_path, exported_chain) -> None:
    export = _export(tmp_path)
    lines = export.read_bytes().splitlines(keepends=True)
    export.write_bytes(b"".join(lines[:9] + lines[10:]))
    completed = _run_verifier(tmp_path, str(export))
    assert completed.returncode == 1
    assert "event 11: chain broken" in completed.stderr


@pytest.mark.django_db
def test_audit_verify_reports_a_wrong_checkpoint_before_a_later_tampered_event() -> None:
    append_events(8)
    tampering.set_field(7, "user_id", "mallory")
    out = StringIO()
    with pytest.raises(CommandError) as failure:
        call_command("audit_verify", "--expect-root", "f" * 64, "--expect-count", "3", stdout=out, stderr=StringIO())
    assert "checked against checkpoint at 3" in out.getvalue()
    assert "first tampered event 3" in str(failure.value)


@pytest.mark.django_db
def test_audit_verify_does_not_claim_a_checkpoint_past_the_first_tampered_event_was_checked() -> None:
    append_events(8)
    tampering.set_field(2, "user_id", "mallory")
    out = StringIO()
    with pytest.raises(CommandError) as failure:
        call_command("audit_verify", "--expect-root", "f" * 64, "--expect-count", "6", stdout=out, stderr=StringIO())
    assert "checked against checkpoint" not in out.getvalue()
    assert "checkpoint at 6 not checked" in out.getvalue()
    assert "first tampered event 2" in str(failure.value)


def test_audit_verify_help_names_exit_status_2_for_usage_errors() -> None:
    help_text = " ".join(Command().help.split())
    assert "2 on a usage error" in help_text
