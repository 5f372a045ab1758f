from collections.abc import Callable
from typing import Any

from rest_framework import serializers

from artifacts import validation
from artifacts.services import ManifestEntry
from fetchml.errors import Invalid
from fetchml.paging import PageLimitField, offset_field
from tasks.api.fields import StrictCharField, StrictIntegerField

MAX_MANIFEST_ENTRIES = 10_000


class SnapshotSerializer(serializers.Serializer):
    id = serializers.CharField(source="sha256", help_text="The sha256 of the archive's bytes (64 hex)")
    sha256 = serializers.CharField()
    size = serializers.IntegerField()
    created_at = serializers.DateTimeField()


class SnapshotListQuerySerializer(serializers.Serializer):
    limit = PageLimitField(default=100)
    offset = offset_field()


class DatasetSerializer(serializers.Serializer):
    name = serializers.CharField()
    uri = serializers.CharField(help_text="The source to use in a task: fetchml://datasets/<name>")
    description = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    created_at = serializers.DateTimeField()
    user_id = serializers.CharField(source="owner.username")


class DatasetUploadQuerySerializer(serializers.Serializer):
    name = serializers.CharField(help_text="^[a-zA-Z0-9_.-]{1,128}$, unique among your datasets")
    description = serializers.CharField(required=False, default="", allow_blank=True, max_length=10_000)

    def validate_name(self, value: str) -> str:
        return validation.dataset_name(value)


class DatasetReadQuerySerializer(serializers.Serializer):
    owner = serializers.CharField(required=False, help_text="Admins: read another user's dataset by that name")
    task_id = serializers.UUIDField(
        required=False, help_text="Worker keys: the task being prepared (names resolve in its owner's namespace)"
    )


class ArtifactSerializer(serializers.Serializer):
    path = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    created_at = serializers.DateTimeField()
    attempt = serializers.IntegerField()


# The commit body comes from agents, which may be newer than the server: fields it does not know are
# ignored (a field added to the protocol must not break older servers), while the ones it reads are
# held to their JSON types.
class ManifestEntrySerializer(serializers.Serializer):
    path = StrictCharField()
    size = StrictIntegerField(min_value=0)
    sha256 = StrictCharField()

    def validate_path(self, value: str) -> str:
        return _as_field_error(validation.artifact_path, value)

    def validate_sha256(self, value: str) -> str:
        return _as_field_error(lambda v: validation.sha256_hex(v, field="sha256"), value)


class ArtifactCommitSerializer(serializers.Serializer):
    artifacts = ManifestEntrySerializer(many=True, max_length=MAX_MANIFEST_ENTRIES)

    def validate_artifacts(self, value: list[dict[str, Any]]) -> list[ManifestEntry]:
        paths = [entry["path"] for entry in value]
        if len(set(paths)) != len(paths):
            raise serializers.ValidationError("Each path may appear once.")
        return [ManifestEntry(**entry) for entry in value]


def _as_field_error(check: Callable[[str], str], value: str) -> str:
    """Reuse the header/URL validators inside a serializer, as field errors."""
    try:
        return check(value)
    except Invalid as exc:
        raise serializers.ValidationError(exc.details[0]["message"]) from None
