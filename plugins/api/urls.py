from django.urls import path

from plugins.api import views

urlpatterns = [
    path("plugins", views.PluginListView.as_view(), name="plugin-list"),
    path("plugins/<str:pluginName>", views.PluginDetailView.as_view(), name="plugin-detail"),
    path("plugins/<str:pluginName>/config", views.PluginConfigView.as_view(), name="plugin-config"),
    path("plugins/<str:pluginName>/health", views.PluginHealthView.as_view(), name="plugin-health"),
]
