from django.urls import path

from tasks.api import experiment_detail

urlpatterns = [
    path("experiments/<id:experimentId>", experiment_detail.ExperimentDetailView.as_view(), name="experiment-detail"),
]
