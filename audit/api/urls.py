from django.urls import path

from audit.api.views import AuditEventListView, AuditVerifyView, ChainRootView

urlpatterns = [
    path("audit/events", AuditEventListView.as_view(), name="audit-events"),
    path("audit/verify", AuditVerifyView.as_view(), name="audit-verify"),
    path("audit/chain-root", ChainRootView.as_view(), name="audit-chain-root"),
]
