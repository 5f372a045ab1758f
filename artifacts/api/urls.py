from django.urls import path, register_converter
from django.urls.converters import PathConverter

from artifacts.api import views


class AnyPathConverter(PathConverter):
    """`path` that matches newlines too (`path`'s `.+` stops at one): every artifact name reaches
    the view, so a bad one gets its 422 in the standard error format, not a bare 404."""

    regex = r"[\s\S]+"


register_converter(AnyPathConverter, "anypath")

urlpatterns = [
    path("snapshots", views.SnapshotListUploadView.as_view(), name="snapshot-upload"),
    path("snapshots/<str:snapshot_id>", views.SnapshotDownloadView.as_view(), name="snapshot-download"),
    path("snapshots/<str:snapshot_id>/meta", views.SnapshotMetaView.as_view(), name="snapshot-meta"),
    path("datasets", views.DatasetListCreateView.as_view(), name="dataset-list"),
    path("datasets/<str:name>", views.DatasetDetailView.as_view(), name="dataset-detail"),
    path("datasets/<str:name>/content", views.DatasetContentView.as_view(), name="dataset-content"),
    path("tasks/<id:taskId>/artifacts", views.ArtifactListView.as_view(), name="artifact-list"),
    # Before the catch-all file route; a file named "commit" is still served by GET/PUT here.
    path(
        "tasks/<id:taskId>/artifacts/commit",
        views.ArtifactCommitView.as_view(),
        {"path": "commit"},
        name="artifact-commit",
    ),
    path("tasks/<id:taskId>/artifacts/<anypath:path>", views.ArtifactFileView.as_view(), name="artifact-file"),
]
