from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # The REST API: docs/api.md; schema at /api/schema/, Swagger UI at /api/docs/.
    path("api/", include("core.api.urls")),
]
