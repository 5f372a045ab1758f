from django.urls import path

from jupyter.api import views

urlpatterns = [
    path("jupyter/services", views.JupyterServiceListView.as_view(), name="jupyter-services"),
    path("jupyter/services/<id:serviceId>", views.JupyterServiceDetailView.as_view(), name="jupyter-service"),
]
