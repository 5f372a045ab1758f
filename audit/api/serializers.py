"""Shapes of the audit API: query parameters in, events / verification / root out."""

from datetime import datetime
from typing import Any

from rest_framework import serializers

from audit.canonical import format_timestamp, is_hex_digest
from audit.checkpoints import SIGNATURE_ALGORITHM, Checkpoint, CheckpointError, check_signature
from audit.models import AuditEvent, EventType
from fetchml.paging import offset_field
from tasks.api.fields import (
    BoundedListField,
    StrictCharField,
    StrictIntegerField,
    StrictSerializer,
    ZonedDateTimeField,
    setting_limit,
)


def _hex_digest(value: str) -> None:
    # Not a regex: `$` would let a trailing newline through.
    if not is_hex_digest(value):
        raise serializers.ValidationError("Must be 64 lowercase hex characters.")


class CanonicalTimestampField(serializers.DateTimeField):
    """Timestamps exactly as they are hashed (UTC, microseconds, `Z`)."""

    def to_representation(self, value: datetime | None) -> str | None:
        return format_timestamp(value) if value is not None else None


class AuditEventSerializer(serializers.ModelSerializer):
    timestamp = CanonicalTimestampField()
    event_type = serializers.ChoiceField(choices=EventType.choices)
    sequence_num = serializers.IntegerField(help_text="Position in the audit chain (gap-free, from 1)")
    prev_hash = serializers.CharField(help_text="Previous event hash in chain")
    event_hash = serializers.CharField(help_text="This event's hash: SHA-256 of its canonical form")
    metadata = serializers.DictField(child=serializers.JSONField())

    class Meta:
        model = AuditEvent
        fields = [
            "timestamp",
            "event_type",
            "user_id",
            "resource",
            "action",
            "success",
            "ip_address",
            "error",
            "prev_hash",
            "event_hash",
            "sequence_num",
            "metadata",
        ]
        read_only_fields = fields


class AuditEventListSerializer(serializers.Serializer):
    events = AuditEventSerializer(many=True)
    total = serializers.IntegerField()
    limit = serializers.IntegerField()
    offset = serializers.IntegerField()


class AuditEventQuerySerializer(serializers.Serializer):
    to = ZonedDateTimeField(required=False, help_text="End timestamp (inclusive), with its offset")
    event_type = serializers.ChoiceField(choices=EventType.choices, required=False, help_text="Filter by event type")
    user_id = serializers.CharField(required=False, max_length=150, help_text="Filter by user (username)")
    resource = serializers.CharField(
        required=False, max_length=255, help_text="Filter by resource as events name it (task:<id>, api_key:<prefix>)"
    )
    limit = serializers.IntegerField(required=False, default=100, min_value=1, max_value=1000)
    offset = offset_field()

    def get_fields(self) -> dict[str, serializers.Field]:
        # `from` is a Python keyword, so it cannot be declared as an attribute.
        fields = super().get_fields()
        fields["from"] = ZonedDateTimeField(required=False, help_text="Start timestamp (inclusive), with its offset")
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs.get("from"), attrs.get("to")
        if since is not None and until is not None and since > until:
            raise serializers.ValidationError({"from": "Must not be later than `to`."})
        return attrs


_ECHOED = "Accepted as chain-root returns it, then ignored"


class CheckpointSerializer(StrictSerializer):
    """A checkpoint as exported by chain-root or `manage.py audit_checkpoint`.

    The chain-root response is accepted as it stands: its informational fields
    (`total_events`, `signature_algorithm`, `warnings`) are type-checked and
    then dropped; any other field is refused.
    """

    sequence_num = StrictIntegerField(min_value=0)
    root_hash = StrictCharField(
        validators=[_hex_digest],
        help_text="Hash of the event at sequence_num (64 lowercase hex)",
    )
    timestamp = ZonedDateTimeField(required=False, allow_null=True, default=None)
    signature = StrictCharField(
        validators=[_hex_digest],
        required=False,
        allow_null=True,
        default=None,
        help_text=f"{SIGNATURE_ALGORITHM}, 64 lowercase hex; omit if unsigned",
    )
    total_events = StrictIntegerField(min_value=0, required=False, write_only=True, help_text=_ECHOED)
    signature_algorithm = serializers.ChoiceField(
        choices=[SIGNATURE_ALGORITHM], required=False, allow_null=True, write_only=True, help_text=_ECHOED
    )
    warnings = BoundedListField(
        max_items=setting_limit("MAX_LIST_ITEMS"),
        child=StrictCharField(max_length=1000, allow_blank=True),
        required=False,
        write_only=True,
        help_text=_ECHOED,
    )

    def validate(self, attrs: dict[str, Any]) -> Checkpoint:
        fields = {name: attrs[name] for name in ("sequence_num", "root_hash", "timestamp", "signature")}
        try:
            return check_signature(Checkpoint(**fields))
        except CheckpointError as exc:
            raise serializers.ValidationError({"signature": str(exc)}) from exc


class VerifyRequestSerializer(StrictSerializer):
    """The optional body of POST /v1/audit/verify: no body (or `{}`) walks the chain alone."""

    checkpoint = CheckpointSerializer(
        required=False, allow_null=True, default=None, help_text="An earlier checkpoint the chain must still contain"
    )


class VerificationResultSerializer(serializers.Serializer):
    valid = serializers.BooleanField()
    total_events = serializers.IntegerField()
    first_tampered = serializers.IntegerField(
        allow_null=True, help_text="Sequence number of first tampered event (null when valid)"
    )
    chain_root_hash = serializers.CharField()
    verified_at = serializers.DateTimeField()
    reason = serializers.CharField(help_text="What was found wrong (empty when valid)")
    checkpoint_checked = serializers.BooleanField(
        help_text="True when the checkpoint was compared: the walk reached its sequence_num (false without one)"
    )
    checkpoint_signature_verified = serializers.BooleanField(
        help_text="True when the checkpoint carried a signature made with this server's key"
    )
    warnings = serializers.ListField(child=serializers.CharField())


class ChainRootSerializer(serializers.Serializer):
    root_hash = serializers.CharField(help_text="Hash of the newest event (64 zeros for an empty chain)")
    timestamp = CanonicalTimestampField(allow_null=True, help_text="Time of the newest event")
    total_events = serializers.IntegerField()
    sequence_num = serializers.IntegerField(help_text="Sequence number of the newest event")
    signature = serializers.CharField(
        allow_null=True, help_text="HMAC-SHA256 over sequence_num, root_hash and timestamp; null without a key"
    )
    signature_algorithm = serializers.CharField(allow_null=True)
    warnings = serializers.ListField(child=serializers.CharField())
