"""View decorators shared by the views that sit outside DRF."""

from collections.abc import Callable
from typing import Any

from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe


def safe_methods_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """GET and HEAD only. Another method is a 405 (in the error format, by the middleware), not a
    CSRF 403: these views are read with an API key or by anyone, never through a session cookie.
    A HEAD gets the GET's status and headers and no body (`middleware.HeadWithoutBodyMiddleware`)."""
    return csrf_exempt(require_safe(view))
