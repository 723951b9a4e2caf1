from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from core import ops_views
from core.views import ProcessedAttendanceChanges

urlpatterns = [
    # Clocks that push (core.adms): at the web root, as the firmware calls them.
    path("iclock/", include("core.urls_adms")),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path(
        "api/processed-attendance/changes/",
        ProcessedAttendanceChanges.as_view(),
        name="processed-attendance-changes",
    ),
    # Reports and the audit log (core/api/urls_reports.py).
    path("api/", include("core.api.urls_reports")),
    # Operations (docs/operations.md): open health check, token-protected metrics.
    path("health/", ops_views.health, name="health"),
    path("metrics", ops_views.metrics, name="metrics"),
]
