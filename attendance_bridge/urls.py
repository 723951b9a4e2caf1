from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

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
]
