"""Snapshots, datasets and artifacts endpoints: parse, call one service or selector, render or stream."""

import uuid
from typing import Any

from django.http import HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from artifacts import selectors, services, validation
from artifacts.api.responses import RawStreamParser, body_stream, declared_length, stored_file_response
from artifacts.api.serializers import (
    ArtifactCommitSerializer,
    ArtifactSerializer,
    DatasetReadQuerySerializer,
    DatasetSerializer,
    DatasetUploadQuerySerializer,
    SnapshotListQuerySerializer,
    SnapshotSerializer,
)
from fetchml.auth import actor_from_request
from fetchml.permissions import IsHumanOrWorker, IsHumanUser
from fetchml.query import KnownQueryParameters, refuse_unknown_or_repeated, validated_query
from fetchml.schema import error_response

TOKEN_HEADER = "X-Fetchml-Token"
SHA256_HEADER = "X-Content-SHA256"
RAW_BODY = {"application/octet-stream": OpenApiTypes.BINARY}
RANGE = OpenApiParameter("Range", str, OpenApiParameter.HEADER, description="A single range: bytes=first-last")
TOKEN = OpenApiParameter(TOKEN_HEADER, str, OpenApiParameter.HEADER, required=True, description="Fencing token")
# Declared, or the schema would show the route converter's match-anything regex as a pattern.
ARTIFACT_PATH = OpenApiParameter(
    "path", str, OpenApiParameter.PATH, description="The file's path in the output directory, each segment URL-encoded"
)
# Django answers HEAD with the GET handler, so a view choosing permissions by method treats both as the read.
READS = ("GET", "HEAD")


# A dataset's reads name it in the URL and by query parameters (`owner`, a worker's `task_id`): a bad one
# is a 422. A name, snapshot id or artifact path in a URL is checked as its upload checks it (artifacts.validation)
# before anything is looked up, so a read never queries with one that could not be stored.
BAD_DATASET_QUERY = error_response("Invalid name, `owner` or `task_id`, or a worker key without `task_id`")
BAD_SNAPSHOT_ID = error_response("The id is not a sha256 digest (64 hexadecimal characters)")
BAD_PAGE = error_response("Invalid `limit` or `offset` (`details` names it)")


def _download_responses(what: str) -> dict[Any, Any]:
    return {
        (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description=f"The {what}"),
        (206, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="The requested range"),
        404: error_response(f"No such {what} readable by the caller"),
        416: error_response("Range not satisfiable (Content-Range: bytes */size)"),
    }


def _query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    """The file API's query parameters: one it does not take, or one given twice, is a 400 as on
    every read (`?onwer=alice` must not act on the caller's own dataset); a bad value, a 422."""
    serializer = serializer_class(data=request.query_params)
    refuse_unknown_or_repeated(request.query_params, serializer.fields)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class IsWorkerKey(BasePermission):
    message = "Worker key required"

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_authenticated) and actor_from_request(request).is_worker


# --- snapshots ---------------------------------------------------------------


class SnapshotListUploadView(KnownQueryParameters, APIView):
    methods_checking_their_own = ("GET", "HEAD")
    permission_classes = [IsHumanUser]
    parser_classes = [RawStreamParser]

    @extend_schema(
        summary="List code snapshots",
        description=(
            "The snapshots the caller uploaded (every snapshot for an admin), newest first, as a JSON array; "
            "`limit` (default 100, at most FETCHML_MAX_PAGE_SIZE) and `offset` page it, `X-Total-Count` "
            "carries the total."
        ),
        parameters=[SnapshotListQuerySerializer],
        responses={200: SnapshotSerializer(many=True), 400: BAD_PAGE},
    )
    def get(self, request: Request) -> Response:
        query = validated_query(SnapshotListQuerySerializer, request)
        page, total = selectors.snapshot_list(
            actor=actor_from_request(request), limit=query["limit"], offset=query["offset"]
        )
        return Response(SnapshotSerializer(page, many=True).data, headers={"X-Total-Count": str(total)})

    @extend_schema(
        summary="Upload code snapshot",
        description=(
            "The raw body is a .tar.gz of the code (Content-Type: application/octet-stream, at most "
            "FETCHML_MAX_SNAPSHOT_BYTES). The id is the sha256 of the bytes: 201 when the snapshot is new "
            "to the caller, 200 when the caller had already uploaded the same bytes."
        ),
        request=RAW_BODY,
        responses={
            201: SnapshotSerializer,
            200: SnapshotSerializer,
            413: error_response("Over FETCHML_MAX_SNAPSHOT_BYTES"),
            422: error_response("Not a .tar.gz"),
        },
    )
    def post(self, request: Request) -> Response:
        snapshot, new_to_caller = services.snapshot_create(
            actor=actor_from_request(request), stream=body_stream(request), declared_length=declared_length(request)
        )
        code = status.HTTP_201_CREATED if new_to_caller else status.HTTP_200_OK
        return Response(SnapshotSerializer(snapshot).data, status=code)


class SnapshotMetaView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanOrWorker]

    @extend_schema(summary="Code snapshot metadata", responses={200: SnapshotSerializer, 422: BAD_SNAPSHOT_ID})
    def get(self, request: Request, snapshot_id: str) -> Response:
        snapshot_id = validation.sha256_hex(snapshot_id, field="snapshot_id")
        snapshot = selectors.snapshot_for_download(actor=actor_from_request(request), snapshot_id=snapshot_id)
        return Response(SnapshotSerializer(snapshot).data)


class SnapshotDownloadView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanOrWorker]

    @extend_schema(
        summary="Download code snapshot",
        description=(
            "For the users who uploaded it, admins, and worker keys whose worker holds a live assignment "
            "of a task using it (submitted by one of its uploaders). Audited as file_access."
        ),
        parameters=[RANGE],
        responses={**_download_responses("snapshot"), 422: BAD_SNAPSHOT_ID},
    )
    def get(self, request: Request, snapshot_id: str) -> HttpResponseBase:
        snapshot_id = validation.sha256_hex(snapshot_id, field="snapshot_id")
        actor = actor_from_request(request)
        snapshot = selectors.snapshot_for_download(actor=actor, snapshot_id=snapshot_id)
        response = stored_file_response(
            request,
            storage_key=snapshot.storage_key,
            size=snapshot.size,
            sha256=snapshot.sha256,
            filename=f"{snapshot.sha256}.tar.gz",
            content_type="application/gzip",
        )
        if response.status_code < 400:
            services.file_access_record(
                actor=actor, resource=f"snapshot:{snapshot.sha256}", metadata=_range_meta(response)
            )
        return response


def _range_meta(response: HttpResponseBase) -> dict[str, str]:
    return {"range": response["Content-Range"]} if response.has_header("Content-Range") else {}


# --- datasets ----------------------------------------------------------------


class DatasetListCreateView(KnownQueryParameters, APIView):
    methods_checking_their_own = ("POST",)
    permission_classes = [IsHumanUser]
    parser_classes = [RawStreamParser]

    @extend_schema(summary="List datasets", responses={200: DatasetSerializer(many=True)})
    def get(self, request: Request) -> Response:
        datasets = selectors.dataset_list(actor=actor_from_request(request))
        return Response(DatasetSerializer(datasets, many=True).data)

    @extend_schema(
        summary="Upload dataset",
        description=(
            "`name` (and optional `description`) in the query string, the bytes as the raw body "
            "(application/octet-stream, at most FETCHML_MAX_DATASET_BYTES). Datasets are immutable: "
            "a name you already use is a 409."
        ),
        parameters=[DatasetUploadQuerySerializer],
        request=RAW_BODY,
        responses={
            201: DatasetSerializer,
            409: error_response("You already have a dataset with this name"),
            413: error_response("Over FETCHML_MAX_DATASET_BYTES"),
        },
    )
    def post(self, request: Request) -> Response:
        query = _query(DatasetUploadQuerySerializer, request)
        dataset = services.dataset_create(
            actor=actor_from_request(request),
            name=query["name"],
            description=query["description"],
            stream=body_stream(request),
            declared_length=declared_length(request),
        )
        return Response(DatasetSerializer(dataset).data, status=status.HTTP_201_CREATED)


class DatasetDetailView(APIView):
    def get_permissions(self) -> list[BasePermission]:
        return [IsHumanOrWorker()] if self.request.method in READS else [IsHumanUser()]

    @extend_schema(
        summary="Dataset metadata",
        parameters=[DatasetReadQuerySerializer],
        responses={200: DatasetSerializer, 422: BAD_DATASET_QUERY},
    )
    def get(self, request: Request, name: str) -> Response:
        name = validation.dataset_name(name)
        query = _query(DatasetReadQuerySerializer, request)
        dataset = selectors.dataset_for_reader(
            actor=actor_from_request(request),
            name=name,
            owner_username=query.get("owner"),
            task_id=query.get("task_id"),
        )
        return Response(DatasetSerializer(dataset).data)

    @extend_schema(
        summary="Delete dataset", parameters=[DatasetReadQuerySerializer], responses={204: None, 422: BAD_DATASET_QUERY}
    )
    def delete(self, request: Request, name: str) -> Response:
        name = validation.dataset_name(name)
        query = _query(DatasetReadQuerySerializer, request)
        actor = actor_from_request(request)
        dataset = selectors.dataset_for_reader(actor=actor, name=name, owner_username=query.get("owner"))
        services.dataset_delete(actor=actor, dataset=dataset)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DatasetContentView(APIView):
    permission_classes = [IsHumanOrWorker]

    @extend_schema(
        summary="Download dataset",
        description=(
            "For its owner, admins (`owner` picks whose), and worker keys naming (`task_id`) a task live on "
            "their worker that references fetchml://datasets/<name>. Audited as file_access."
        ),
        parameters=[DatasetReadQuerySerializer, RANGE],
        responses={**_download_responses("dataset"), 422: BAD_DATASET_QUERY},
    )
    def get(self, request: Request, name: str) -> HttpResponseBase:
        name = validation.dataset_name(name)
        query = _query(DatasetReadQuerySerializer, request)
        actor = actor_from_request(request)
        dataset = selectors.dataset_for_reader(
            actor=actor, name=name, owner_username=query.get("owner"), task_id=query.get("task_id")
        )
        response = stored_file_response(
            request, storage_key=dataset.storage_key, size=dataset.size, sha256=dataset.sha256, filename=dataset.name
        )
        if response.status_code < 400:
            metadata = {"owner": dataset.owner.get_username(), **_range_meta(response)}
            services.file_access_record(actor=actor, resource=f"dataset:{dataset.name}", metadata=metadata)
        return response


# --- artifacts ---------------------------------------------------------------


class ArtifactListView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        summary="List task artifacts",
        description="The committed artifacts of the task's latest committed attempt, by path.",
        responses={200: ArtifactSerializer(many=True)},
    )
    def get(self, request: Request, taskId: uuid.UUID) -> Response:
        task = selectors.task_for_reader(actor=actor_from_request(request), task_id=taskId)
        return Response(ArtifactSerializer(selectors.artifact_list(task=task), many=True).data)


class ArtifactFileView(KnownQueryParameters, APIView):
    parser_classes = [RawStreamParser]

    def get_permissions(self) -> list[BasePermission]:
        return [IsHumanUser()] if self.request.method in READS else [IsWorkerKey()]

    @extend_schema(
        summary="Download task artifact",
        description="Owner and admins only. Audited as file_access.",
        parameters=[ARTIFACT_PATH, RANGE],
        responses={**_download_responses("artifact"), 422: error_response("Bad path (as for uploads)")},
    )
    def get(self, request: Request, taskId: uuid.UUID, path: str) -> HttpResponseBase:
        path = validation.artifact_path(path)
        actor = actor_from_request(request)
        task = selectors.task_for_reader(actor=actor, task_id=taskId)
        artifact = selectors.artifact_for_download(task=task, path=path)
        response = stored_file_response(
            request, storage_key=artifact.storage_key, size=artifact.size, sha256=artifact.sha256, filename=path
        )
        if response.status_code < 400:
            metadata = {"attempt": artifact.attempt, **_range_meta(response)}
            services.file_access_record(actor=actor, resource=f"artifact:{task.pk}/{path}", metadata=metadata)
        return response

    @extend_schema(
        summary="Upload task artifact (worker)",
        description=(
            "Worker keys only, with the run's fencing token. Stored uncommitted (not listed) until the "
            "attempt's commit; the same path again replaces the upload. The body's sha256 must equal "
            "X-Content-SHA256. The attempt's files may total FETCHML_MAX_ARTIFACT_BYTES_PER_TASK."
        ),
        parameters=[
            ARTIFACT_PATH,
            TOKEN,
            OpenApiParameter(SHA256_HEADER, str, OpenApiParameter.HEADER, required=True, description="sha256 (hex)"),
        ],
        request=RAW_BODY,
        responses={
            201: ArtifactSerializer,
            409: error_response("Stale fencing token, or this path is already committed"),
            413: error_response("Over the task's artifact budget"),
            422: error_response("Bad path, or the body does not match X-Content-SHA256"),
        },
    )
    def put(self, request: Request, taskId: uuid.UUID, path: str) -> Response:
        artifact = services.artifact_upload(
            actor=actor_from_request(request),
            task_id=taskId,
            token=validation.fencing_token(request.headers.get(TOKEN_HEADER)),
            path=validation.artifact_path(path),
            expected_sha256=validation.sha256_hex(request.headers.get(SHA256_HEADER), field=SHA256_HEADER),
            stream=body_stream(request),
            declared_length=declared_length(request),
        )
        return Response(ArtifactSerializer(artifact).data, status=status.HTTP_201_CREATED)


class ArtifactCommitView(ArtifactFileView):
    """POST commits; GET/PUT still reach a file named `commit` at the top of the output directory."""

    parser_classes = [RawStreamParser, *APIView.parser_classes]

    @extend_schema(exclude=True)
    def get(self, request: Request, taskId: uuid.UUID, path: str) -> HttpResponseBase:
        return super().get(request, taskId, path)

    @extend_schema(exclude=True)
    def put(self, request: Request, taskId: uuid.UUID, path: str) -> Response:
        return super().put(request, taskId, path)

    @extend_schema(
        summary="Commit the attempt's artifacts (worker)",
        description=(
            "Marks exactly the manifest's uploads complete, in one transaction, and drops every other "
            "stored file of the task (other uploads of this attempt, earlier attempts)."
        ),
        parameters=[TOKEN],
        request=ArtifactCommitSerializer,
        responses={
            200: ArtifactSerializer(many=True),
            409: error_response("Stale fencing token"),
            422: error_response("The manifest does not match the uploads"),
        },
    )
    def post(self, request: Request, taskId: uuid.UUID, path: str) -> Response:
        serializer = ArtifactCommitSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        artifacts = services.artifact_commit(
            actor=actor_from_request(request),
            task_id=taskId,
            token=validation.fencing_token(request.headers.get(TOKEN_HEADER)),
            manifest=serializer.validated_data["artifacts"],
        )
        return Response(ArtifactSerializer(artifacts, many=True).data)
