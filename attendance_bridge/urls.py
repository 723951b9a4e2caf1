from django.contrib import admin
from django.urls import include, path

from core import ops_views

urlpatterns = [
    # Clocks that push (core.adms): at the web root, as the firmware calls them.
    path("iclock/", include("core.urls_adms")),
    path("admin/", admin.site.urls),
    # The REST API: docs/api.md; schema at /api/schema/, Swagger UI at /api/docs/.
    path("api/", include("core.api.urls")),
    # Operations (docs/operations.md): open health check, token-protected metrics.
    path("health/", ops_views.health, name="health"),
    path("metrics", ops_views.metrics, name="metrics"),
]
