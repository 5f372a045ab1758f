"""Role checks for API views. Object-level ownership lives in the selectors."""

from rest_framework.permissions import BasePermission

from fetchml.auth import actor_from_request


class IsHumanUser(BasePermission):
    """A user or admin key (or a logged-in session); worker keys are for agents."""

    message = "Insufficient permissions"

    def has_permission(self, request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return not actor_from_request(request).is_worker


class IsAdmin(BasePermission):
    message = "Admin role required"

    def has_permission(self, request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return actor_from_request(request).is_admin


class IsHumanOrWorker(BasePermission):
    """For the few endpoints agents also call (downloads of task inputs)."""

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_authenticated)
