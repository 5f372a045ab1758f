from django.urls import path

from scheduler.api import streams, views

urlpatterns = [
    path("scheduler/status", views.SchedulerStatusView.as_view(), name="scheduler-status"),
    path("scheduler/status/stream", streams.status_stream, name="scheduler-status-stream"),
    path("scheduler/workers", views.WorkerListView.as_view(), name="scheduler-workers"),
    path("scheduler/workers/<id:workerId>", views.WorkerDetailView.as_view(), name="scheduler-worker"),
    path("scheduler/reservations", views.ReservationListCreateView.as_view(), name="scheduler-reservations"),
    path(
        "scheduler/reservations/<id:reservationId>",
        views.ReservationDetailView.as_view(),
        name="scheduler-reservation",
    ),
    path("scheduler/jobs/<id:jobId>/priority", views.JobPriorityView.as_view(), name="scheduler-job-priority"),
    path("scheduler/jobs/<id:jobId>/stream", streams.job_stream, name="scheduler-job-stream"),
]
