"""The admin's report pages: the timesheet (core.reports) with its CSV
download, and the audit log (core.audit), read-only. Imported by core.admin."""

from auditlog import admin as auditlog_admin
from auditlog.models import LogEntry
from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.template.response import TemplateResponse
from django.urls import path

from core.csv_export import csv_response
from core.models import Timesheet
from core.reports import TIMESHEET_COLUMNS, timesheet_build
from core.status import company_today

# --- Timesheet (core.reports) ----------------------------------------------------------


class TimesheetForm(forms.Form):
    start_date = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))
    end_date = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))
    user_id = forms.CharField(label="User ID", required=False, max_length=24)

    def clean(self):
        cleaned = super().clean()
        start, end = cleaned.get("start_date"), cleaned.get("end_date")
        if start and end and end < start:
            self.add_error("end_date", "The end date must not be before the start date.")
        return cleaned


@admin.register(Timesheet)
class TimesheetAdmin(admin.ModelAdmin):
    """The timesheet page: a period's figures per employee, on screen and as CSV.

    Needs core.view_timesheet (the page lists under Attendance for users who have it).
    """

    page_size = 100

    def get_urls(self):
        # The report page only: no page of a single day through the proxy.
        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(self.changelist_view), name=name)]

    def has_view_permission(self, request, obj=None):
        return request.user.has_perm("core.view_timesheet")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        if not self.has_view_permission(request):
            raise PermissionDenied
        if "start_date" in request.GET or "end_date" in request.GET:
            form = TimesheetForm(request.GET)
        else:
            today = company_today()
            form = TimesheetForm({"start_date": today.replace(day=1), "end_date": today})
        rows = page = None
        if form.is_valid():
            user_id = form.cleaned_data["user_id"]
            rows = timesheet_build(
                start_date=form.cleaned_data["start_date"],
                end_date=form.cleaned_data["end_date"],
                user_ids=[user_id] if user_id else None,
            )
            if request.GET.get("download") == "csv":
                start, end = form.cleaned_data["start_date"], form.cleaned_data["end_date"]
                return csv_response(
                    columns=TIMESHEET_COLUMNS, rows=rows, filename=f"timesheet_{start}_{end}"
                )
            page = Paginator(rows, self.page_size).get_page(request.GET.get("p"))
        query = request.GET.copy()
        query.pop("p", None)
        query.pop("download", None)
        context = {
            **self.admin_site.each_context(request),
            "title": "Timesheet",
            "opts": self.model._meta,
            "form": form,
            "columns": TIMESHEET_COLUMNS,
            "page": page,
            "query": query.urlencode(),
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/core/timesheet/report.html", context)


# --- Audit log (core.audit) ------------------------------------------------------------

admin.site.unregister(LogEntry)


@admin.register(LogEntry)
class AuditLogEntryAdmin(auditlog_admin.LogEntryAdmin):
    """auditlog's read-only log, with the named change (attendance_edit, crm_resend, ...)."""

    list_display = ["created", "resource_url", "action", "operation", "msg_short", "user_url"]

    @admin.display(description="change")
    def operation(self, entry):
        return (entry.additional_data or {}).get("action", "")
