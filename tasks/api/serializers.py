"""Input (strict, bounded) and output serializers of the tasks, queue and experiments API."""

import re
from typing import Any

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fetchml.conf import app_settings
from fetchml.paging import PageLimitField, offset_field
from scheduler import selectors as scheduler_selectors
from scheduler.agent.protocol import CommandLineError, command_argv
from tasks.api.fields import (
    BoundedDictField,
    BoundedListField,
    JsonObjectField,
    StrictBooleanField,
    StrictCharField,
    StrictIntegerField,
    StrictSerializer,
    WholeValueRegexValidator,
    setting_limit,
)
from tasks.models import Experiment, Task
from tasks.services import priority_aged
from tasks.states import TaskStatus

JOB_NAME_REGEX = r"^[a-zA-Z0-9_-]+$"
SHA256_REGEX = r"^[0-9a-f]{64}$"
ENV_NAME_REGEX = r"^[A-Za-z_][A-Za-z0-9_]*$"
PLUGIN_NAME_REGEX = r"^[A-Za-z0-9_.-]+$"
# Per-quantity ceiling for resource requests: far above any real machine, well
# inside the integer columns, so absurd numbers are a 422 and not a database error.
MAX_RESOURCE = 1_000_000
MAX_NODE_COUNT = 1024
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600
MAX_CANCEL_GRACE_SECONDS = 3600


# --- task input -------------------------------------------------------------


def _string_map(*, max_entries: str, key_regex: str | None = None) -> BoundedDictField:
    return BoundedDictField(
        max_entries=setting_limit(max_entries),
        key_regex=key_regex,
        child=StrictCharField(allow_blank=True, max_length=app_settings.MAX_STRING_LENGTH),
        required=False,
    )


class DatasetSpecSerializer(StrictSerializer):
    name = StrictCharField(max_length=255)
    source = StrictCharField(max_length=2048, required=False, allow_blank=True)
    sha256 = StrictCharField(max_length=64, required=False)
    mount_path = StrictCharField(max_length=1024, required=False)

    def validate_sha256(self, value: str) -> str:
        if not re.fullmatch(SHA256_REGEX, value):
            raise serializers.ValidationError("Must be 64 lowercase hexadecimal characters.")
        return value

    def validate_mount_path(self, value: str) -> str:
        if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or "\x00" in value:
            raise serializers.ValidationError("Must be a relative path.")
        if ".." in re.split(r"[/\\]", value):
            raise serializers.ValidationError("Must not contain '..'.")
        return value


class TaskPluginConfigSerializer(StrictSerializer):
    """The shape of one task override; what it may change is the plugins' rule (plugins.overrides)."""

    enabled = StrictBooleanField(required=False)
    mode = serializers.ChoiceField(choices=["sidecar", "remote", "disabled"], required=False)
    image = StrictCharField(max_length=255, required=False, allow_blank=True)
    settings = JsonObjectField(max_bytes=16_384, required=False)


class CreateTaskSerializer(StrictSerializer):
    job_name = StrictCharField(
        max_length=64,
        validators=[WholeValueRegexValidator(JOB_NAME_REGEX, message="May contain only letters, digits, '_' and '-'.")],
    )
    priority = StrictIntegerField(min_value=1, max_value=10, default=5, help_text="Higher runs sooner.")
    args = StrictCharField(max_length=16_384, required=False, allow_blank=True)
    entrypoint = StrictCharField(
        max_length=4096,
        required=False,
        allow_blank=True,
        help_text=(
            "The command to run, e.g. `python train.py`; `args` follow it. Both are split into words as a "
            "POSIX shell would (quotes, backslashes) and run without a shell; together they must name a command."
        ),
    )
    snapshot_id = StrictCharField(max_length=64, required=False, allow_blank=True)
    datasets = BoundedListField(
        max_items=setting_limit("MAX_LIST_ITEMS"), child=StrictCharField(max_length=255), required=False
    )
    dataset_specs = BoundedListField(
        max_items=setting_limit("MAX_LIST_ITEMS"), child=DatasetSpecSerializer(), required=False
    )
    cpu = StrictIntegerField(min_value=0, max_value=MAX_RESOURCE, required=False, help_text="CPU cores requested")
    memory_gb = StrictIntegerField(min_value=0, max_value=MAX_RESOURCE, required=False)
    gpu = StrictIntegerField(min_value=0, max_value=MAX_RESOURCE, required=False)
    metadata = _string_map(max_entries="MAX_METADATA_ENTRIES")
    # FetchML extensions
    experiment_id = serializers.UUIDField(
        required=False, allow_null=True, help_text="One of the caller's experiments, not archived"
    )
    env = _string_map(max_entries="MAX_METADATA_ENTRIES", key_regex=ENV_NAME_REGEX)
    gpu_type = StrictCharField(max_length=64, required=False, allow_blank=True)
    node_count = StrictIntegerField(min_value=1, max_value=MAX_NODE_COUNT, required=False)
    reservation_id = serializers.UUIDField(required=False, allow_null=True)
    plugin_configs = BoundedDictField(
        max_entries=setting_limit("MAX_LIST_ITEMS"),
        key_max_length=64,
        key_regex=PLUGIN_NAME_REGEX,
        child=TaskPluginConfigSerializer(),
        required=False,
    )
    timeout_seconds = StrictIntegerField(min_value=1, max_value=MAX_TIMEOUT_SECONDS, required=False, allow_null=True)
    max_retries = StrictIntegerField(min_value=0, max_value=20, required=False)
    retry_on_exit_code = StrictBooleanField(required=False)
    cancel_grace_seconds = StrictIntegerField(min_value=0, max_value=MAX_CANCEL_GRACE_SECONDS, required=False)
    allow_unschedulable = StrictBooleanField(required=False)

    def validate_snapshot_id(self, value: str) -> str:
        # A sha256 in hexadecimal, read in either case as the snapshot paths read it.
        return value.lower()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # The agent's own rule: a command it could not start is refused here, not on a worker.
        try:
            command_argv(attrs.get("entrypoint", ""), attrs.get("args", ""))
        except CommandLineError as exc:
            raise serializers.ValidationError({exc.field_name: exc.reason}) from None
        if attrs.get("gpu_type") and not attrs.get("gpu"):
            # Otherwise it would run on any worker, GPU or none, as if the type had been honoured.
            raise serializers.ValidationError({"gpu_type": "Needs gpu of 1 or more: a task without GPUs has no type."})
        return attrs


# --- task output ------------------------------------------------------------


class NodeAssignmentSerializer(serializers.Serializer):
    node_id = serializers.IntegerField()
    worker_id = serializers.UUIDField()
    slot_assigned = serializers.BooleanField(source="holds_capacity")


class EarlierAttemptSerializer(serializers.Serializer):
    attempt = serializers.IntegerField()
    worker_id = serializers.UUIDField(allow_null=True, help_text="The worker it ran on (its first node's)")
    ended_at = serializers.DateTimeField()
    failure_reason = serializers.CharField(help_text="Why it ended: worker_lost, preparation or exit_code")
    exit_code = serializers.IntegerField(allow_null=True)
    error = serializers.CharField(help_text="The end of its error (2,000 characters at most)")


class TaskSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    job_name = serializers.CharField()
    status = serializers.ChoiceField(choices=TaskStatus.choices)
    priority = serializers.IntegerField()
    priority_aged = serializers.SerializerMethodField(help_text="Effective priority with aging applied")
    created_at = serializers.DateTimeField()
    queued_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    ended_at = serializers.DateTimeField(allow_null=True)
    updated_at = serializers.DateTimeField()
    worker_id = serializers.UUIDField(allow_null=True)
    user_id = serializers.CharField(source="owner.username", help_text="The owner's username")
    experiment_id = serializers.UUIDField(allow_null=True)
    kind = serializers.ChoiceField(choices=Task.Kind.choices)
    entrypoint = serializers.CharField()
    args = serializers.CharField()
    env = serializers.DictField(child=serializers.CharField())
    snapshot_id = serializers.CharField()
    datasets = serializers.ListField(child=serializers.CharField())
    dataset_specs = DatasetSpecSerializer(many=True)
    metadata = serializers.DictField(child=serializers.CharField())
    cpu = serializers.IntegerField()
    memory_gb = serializers.IntegerField()
    gpu = serializers.IntegerField()
    gpu_type = serializers.CharField()
    node_count = serializers.IntegerField()
    reservation_id = serializers.UUIDField(allow_null=True)
    node_assignments = serializers.SerializerMethodField(help_text="Nodes of the current attempt")
    attempt = serializers.IntegerField()
    retry_count = serializers.IntegerField()
    max_retries = serializers.IntegerField()
    timeout_seconds = serializers.IntegerField(allow_null=True)
    cancel_grace_seconds = serializers.IntegerField()
    cancel_requested = serializers.SerializerMethodField()
    cancelled_by = serializers.CharField(source="cancelled_by.username", allow_null=True)
    exit_code = serializers.IntegerField(allow_null=True)
    failure_reason = serializers.CharField()
    error = serializers.CharField()
    output = serializers.CharField()
    plugin_status = serializers.DictField(child=serializers.DictField())
    earlier_attempts = EarlierAttemptSerializer(
        many=True, help_text="How each attempt that was retried ended, oldest first (the fields above are the latest's)"
    )

    def _now(self) -> Any:
        # One instant for the whole response, so aged priorities of a page compare.
        if "now" not in self.context:
            self.context["now"] = timezone.now()
        return self.context["now"]

    @extend_schema_field(OpenApiTypes.DOUBLE)
    def get_priority_aged(self, task: Task) -> float:
        return priority_aged(task, self._now())

    @extend_schema_field(NodeAssignmentSerializer(many=True))
    def get_node_assignments(self, task: Task) -> list[dict]:
        # Filtered in Python so the prefetched rows are used (no query per task).
        current = [a for a in task.node_assignments.all() if a.attempt == task.attempt]
        return NodeAssignmentSerializer(current, many=True).data

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_cancel_requested(self, task: Task) -> bool:
        return task.cancel_requested_at is not None


class TaskDetailSerializer(TaskSerializer):
    """One task, with "why is it still queued?" (computed by the dispatcher's own matching rule)."""

    queue_position = serializers.SerializerMethodField(
        help_text="Runnable tasks the scheduler considers before this one (0 = next); null unless queued"
    )
    pending_reason = serializers.SerializerMethodField(
        help_text="Why a queued task has not started, e.g. 'no worker with 4 free GPU(s) of type A100'; '' otherwise"
    )

    def _queue_position(self, task: Task) -> int | None:
        # Both fields need it, and it counts the queue ahead of the task: counted once.
        if task.status != TaskStatus.QUEUED:
            return None
        positions = self.context.setdefault("queue_positions", {})
        if task.id not in positions:
            positions[task.id] = scheduler_selectors.queue_position(task, now=self._now())
        return positions[task.id]

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_queue_position(self, task: Task) -> int | None:
        return self._queue_position(task)

    @extend_schema_field(OpenApiTypes.STR)
    def get_pending_reason(self, task: Task) -> str:
        return scheduler_selectors.pending_reason(task, now=self._now(), position=self._queue_position(task))


class TaskListQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=TaskStatus.choices, required=False)
    user_id = serializers.CharField(max_length=150, required=False, help_text="Owner's username")
    job_name = serializers.CharField(max_length=64, required=False, help_text="Tasks of this job name (exact)")
    experiment_id = serializers.UUIDField(required=False)
    node_count = serializers.IntegerField(min_value=1, max_value=MAX_NODE_COUNT, required=False)
    reservation_id = serializers.UUIDField(required=False)
    # Listed among this read's parameters by the contract, but a task-creation input (FIXES.md):
    # taken, so a client built from the contract is not refused, and not a filter.
    plugin_configs = serializers.CharField(required=False, help_text="Ignored: plugins are chosen per task at creation")
    limit = PageLimitField(default=50)
    offset = offset_field()


class TaskListSerializer(serializers.Serializer):
    tasks = TaskSerializer(many=True)
    total = serializers.IntegerField()
    limit = serializers.IntegerField()
    offset = serializers.IntegerField()


class QueueStatsSerializer(serializers.Serializer):
    queued = serializers.IntegerField(help_text="Tasks waiting to run")
    running = serializers.IntegerField(help_text="Tasks preparing, running or collecting")
    completed = serializers.IntegerField(help_text="Tasks completed since UTC midnight")
    failed = serializers.IntegerField(help_text="Tasks failed since UTC midnight")
    workers = serializers.IntegerField(help_text="Active workers")


# --- experiments ------------------------------------------------------------


def commit_id_field(**kwargs: Any) -> StrictCharField:
    """`commit_id` of an experiment (the code revision it tracks), by the same rules on create and on update."""
    return StrictCharField(max_length=64, required=False, allow_blank=True, **kwargs)


def _no_outer_whitespace(value: str) -> None:
    # Names are unique per owner and compared as typed: "sweep " beside "sweep" is a mistake.
    if value != value.strip():
        raise serializers.ValidationError("Must not begin or end with whitespace.")


def experiment_name_field(**kwargs: Any) -> StrictCharField:
    """`name` of an experiment, by the same rules on create and on rename."""
    return StrictCharField(max_length=128, validators=[_no_outer_whitespace], **kwargs)


class CreateExperimentSerializer(StrictSerializer):
    name = experiment_name_field()
    description = StrictCharField(max_length=10_000, required=False, allow_blank=True, default="")
    commit_id = commit_id_field(default="")


class ExperimentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    description = serializers.CharField()
    commit_id = serializers.CharField()
    created_at = serializers.DateTimeField()
    status = serializers.ChoiceField(choices=Experiment.Status.choices)
    user_id = serializers.CharField(source="owner.username")


class ExperimentListQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=[Experiment.Status.ACTIVE, Experiment.Status.ARCHIVED], required=False, help_text="active or archived"
    )
    limit = PageLimitField(required=False, help_text="Defaults to FETCHML_MAX_PAGE_SIZE")
    offset = offset_field()
