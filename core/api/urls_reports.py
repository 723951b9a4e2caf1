"""URLs of the reports and the audit log, included under /api/ by attendance_bridge/urls.py."""

from django.urls import path

from core.api.audit import AuditLogView
from core.api.reports import TimesheetView

urlpatterns = [
    path("reports/timesheet/", TimesheetView.as_view(), name="api-timesheet"),
    path("audit-log/", AuditLogView.as_view(), name="api-audit-log"),
]
