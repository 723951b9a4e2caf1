"""The API's routes, included under /api/ by attendance_bridge/urls.py."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework import routers

from core.api.views.attendance import ProcessedAttendanceViewSet, RawAttendanceViewSet
from core.api.views.audit import AuditLogViewSet
from core.api.views.auth import JWTRefreshView, JWTView, TokenView
from core.api.views.device_commands import DeviceCommandViewSet
from core.api.views.device_users import DeviceUserViewSet
from core.api.views.devices import DeviceViewSet
from core.api.views.employees import EmployeeViewSet
from core.api.views.reports import TimesheetViewSet


class APIRoot(routers.APIRootView):
    """The browsable API's front page: links to the lists; any login may read it."""

    action_permissions = {"GET": [], "HEAD": [], "OPTIONS": []}


class Router(routers.DefaultRouter):
    APIRootView = APIRoot


router = Router()
router.register("devices", DeviceViewSet, basename="device")
router.register("employees", EmployeeViewSet, basename="employee")
router.register("raw-attendance", RawAttendanceViewSet, basename="raw-attendance")
router.register("processed-attendance", ProcessedAttendanceViewSet, basename="processed-attendance")
router.register("reports/timesheet", TimesheetViewSet, basename="timesheet")
router.register("audit-log", AuditLogViewSet, basename="audit-log")

device_users = DeviceUserViewSet.as_view({"get": "list", "post": "create"})
device_user = DeviceUserViewSet.as_view({"delete": "destroy"})
device_users_import = DeviceUserViewSet.as_view({"post": "import_users"})
device_commands = DeviceCommandViewSet.as_view({"get": "list"})
device_command = DeviceCommandViewSet.as_view({"get": "retrieve"})

urlpatterns = [
    path("auth/token/", TokenView.as_view(), name="api-token"),
    path("auth/jwt/", JWTView.as_view(), name="api-jwt"),
    path("auth/jwt/refresh/", JWTRefreshView.as_view(), name="api-jwt-refresh"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="schema"), name="api-redoc"),
    path("devices/<int:device_pk>/users/", device_users, name="device-users"),
    path("devices/<int:device_pk>/users/import/", device_users_import, name="device-users-import"),
    path("devices/<int:device_pk>/users/<str:user_id>/", device_user, name="device-user"),
    path("devices/<int:device_pk>/commands/", device_commands, name="device-commands"),
    path("devices/<int:device_pk>/commands/<int:pk>/", device_command, name="device-command"),
    *router.urls,
]
