"""Streaming routes: plain async views, kept apart from the DRF routes in urls.py."""

from django.urls import path

from tasks.api import streams

urlpatterns = [
    path("tasks/<id:task_id>/logs", streams.task_logs, name="task-logs"),
]
