"""Root URLs. Each app owns its API routes in `<app>/api/urls.py`."""

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.views import LoginView
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from fetchml.admin import LimitedLoginForm
from fetchml.api_root import ApiIndexView
from fetchml.decorators import safe_methods_only
from fetchml.health import health

urlpatterns = [
    path("health", health, name="health"),
    path("admin/", admin.site.urls),
    path("v1/schema", SpectacularAPIView.as_view(permission_classes=[], authentication_classes=[]), name="schema"),
    path(
        "v1/docs",
        SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[], authentication_classes=[]),
        name="docs",
    ),
    path("v1/", ApiIndexView.as_view(), name="api-index"),
    path("v1/", include("tasks.api.urls")),
    path("v1/", include("tasks.api.stream_urls")),
    path("v1/", include("scheduler.api.urls")),
    path("v1/", include("audit.api.urls")),
    path("v1/", include("plugins.api.urls")),
    path("v1/", include("jupyter.api.urls")),
    path("v1/", include("artifacts.api.urls")),
    path("v1/", include("tasks.api.experiment_urls")),
    # DRF's login page, matched before DRF's own route so that its failures are limited and
    # audited like the admin's (fetchml.admin.LoginLimitMixin).
    path(
        "api-auth/login/",
        LoginView.as_view(template_name="rest_framework/login.html", authentication_form=LimitedLoginForm),
    ),
    path("api-auth/", include("rest_framework.urls")),
    # The admin's and /v1/docs' assets, found in the installed apps: daphne serves
    # them itself (no collectstatic, no other web server, no CDN).
    path(f"{settings.STATIC_URL.lstrip('/')}<path:path>", safe_methods_only(serve_static), {"insecure": True}),
]

handler400 = "fetchml.middleware.bad_request"
handler403 = "fetchml.middleware.permission_denied"
handler404 = "fetchml.middleware.page_not_found"
handler500 = "fetchml.middleware.server_error"
