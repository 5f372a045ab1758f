from django.urls import path

from tasks.api import views

urlpatterns = [
    path("tasks", views.TaskListCreateView.as_view(), name="task-list"),
    path("tasks/<id:taskId>", views.TaskDetailView.as_view(), name="task-detail"),
    path("queue", views.QueueView.as_view(), name="queue"),
    path("experiments", views.ExperimentListCreateView.as_view(), name="experiment-list"),
]
