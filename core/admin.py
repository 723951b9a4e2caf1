from django import forms
from django.contrib import admin, messages
from django.db.models import OuterRef, Subquery
from django.utils.html import format_html

from core.ingest import device_sync_time, device_test, devices_poll
from core.models import Device, Employee, ProcessedAttendance, RawAttendance
from core.zk.client import DeviceError

# --- Devices -------------------------------------------------------------------------


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "address",
        "enabled",
        "health",
        "last_success_at",
        "consecutive_failures",
        "log_fill",
        "clock_drift",
        "short_error",
    ]
    list_filter = ["enabled", "protocol"]
    search_fields = ["name", "ip_address", "serial_number"]
    actions = ["poll_now", "test_connection", "sync_clock"]
    readonly_fields = [
        "serial_number",
        "firmware",
        "platform",
        "device_name",
        "user_count",
        "user_capacity",
        "record_count",
        "record_capacity",
        "clock_drift_seconds",
        "last_poll_at",
        "last_success_at",
        "last_full_download_at",
        "last_error",
        "consecutive_failures",
        "last_record_count",
        "last_serial_number",
        "created_at",
        "updated_at",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    ("ip_address", "port", "protocol"),
                    "comm_key",
                    "timeout_seconds",
                    "timezone",
                    "enabled",
                ]
            },
        ),
        ("Outlier rule overrides", {"fields": [("work_start_time", "work_end_time")]}),
        (
            "Learned from the device",
            {
                "fields": [
                    "serial_number",
                    "firmware",
                    "platform",
                    "device_name",
                    ("user_count", "user_capacity"),
                    ("record_count", "record_capacity"),
                    "clock_drift_seconds",
                ]
            },
        ),
        (
            "Polling",
            {
                "fields": [
                    ("last_poll_at", "last_success_at", "last_full_download_at"),
                    "consecutive_failures",
                    "last_error",
                    ("last_record_count", "last_serial_number"),
                    ("created_at", "updated_at"),
                ]
            },
        ),
    ]

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "comm_key":
            # A password: masked on screen, still editable.
            kwargs["widget"] = forms.PasswordInput(render_value=True)
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    @admin.display(description="address")
    def address(self, device):
        return f"{device.ip_address}:{device.port}/{device.protocol}"

    @admin.display(description="health")
    def health(self, device):
        if device.last_poll_at is None:
            return "never polled"
        if device.consecutive_failures:
            return format_html(
                '<span style="color:#ba2121">failing ({})</span>', device.consecutive_failures
            )
        return format_html('<span style="color:#2e7d32">{}</span>', "ok")

    @admin.display(description="log fill")
    def log_fill(self, device):
        fill = device.log_fill_percent
        return "—" if fill is None else f"{fill:.1f}%"

    @admin.display(description="clock drift")
    def clock_drift(self, device):
        if device.clock_drift_seconds is None:
            return "—"
        return f"{device.clock_drift_seconds:+.0f} s"

    @admin.display(description="last error")
    def short_error(self, device):
        return device.last_error[:80]

    @admin.action(description="Poll now")
    def poll_now(self, request, queryset):
        for result in devices_poll(devices=queryset):
            level = messages.SUCCESS if result.ok else messages.ERROR
            self.message_user(request, result.summary(), level)

    @admin.action(description="Test connection")
    def test_connection(self, request, queryset):
        for device in queryset:
            report = device_test(device=device)
            if not report.ok:
                self.message_user(request, f"{device.name}: {report.error}", messages.ERROR)
                continue
            sizes = report.sizes
            self.message_user(
                request,
                f"{device.name}: OK, serial {report.identity['serial_number']}, "
                f"firmware {report.identity['firmware']}, users {sizes.users}/"
                f"{sizes.users_capacity}, records {sizes.records}/{sizes.records_capacity}, "
                f"clock drift {report.clock_drift_seconds:+.0f} s",
                messages.SUCCESS,
            )

    @admin.action(description="Sync clock")
    def sync_clock(self, request, queryset):
        for device in queryset:
            try:
                local_now = device_sync_time(device=device)
            except DeviceError as exc:
                self.message_user(request, f"{device.name}: {exc}", messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"{device.name}: clock set to {local_now:%Y-%m-%d %H:%M:%S} ({device.timezone})",
                    messages.SUCCESS,
                )


# --- Employees -----------------------------------------------------------------------


@admin.register(Employee)
class EmployeeAdmin(admin.ModelAdmin):
    list_display = ["user_id", "name", "card", "privilege", "work_start_time", "work_end_time"]
    search_fields = ["user_id", "name"]
    list_filter = ["devices"]
    filter_horizontal = ["devices"]
    readonly_fields = ["created_at", "updated_at"]


# --- Raw punches ---------------------------------------------------------------------


@admin.register(RawAttendance)
class RawAttendanceAdmin(admin.ModelAdmin):
    """Read-only: punches are what the devices recorded, never edited here."""

    list_display = [
        "timestamp",
        "user_id",
        "employee_name",
        "device",
        "punch_state",
        "verify_type",
        "is_suspect",
        "suspect_reason",
    ]
    list_filter = ["device", ("timestamp", admin.DateFieldListFilter), "punch_state", "is_suspect"]
    date_hierarchy = "timestamp"
    search_fields = ["=user_id"]
    list_select_related = ["device"]
    show_full_result_count = False  # COUNT(*) over millions of punches on every page

    def get_queryset(self, request):
        names = Employee.objects.filter(user_id=OuterRef("user_id")).values("name")[:1]
        return super().get_queryset(request).annotate(employee_name=Subquery(names))

    def get_search_results(self, request, queryset, search_term):
        # Exact user_id (indexed) or part of the employee's name.
        queryset, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term:
            by_name = Employee.objects.filter(name__icontains=term).values("user_id")
            queryset = queryset | self.get_queryset(request).filter(user_id__in=by_name)
        return queryset, may_have_duplicates

    @admin.display(description="employee", ordering="employee_name")
    def employee_name(self, punch):
        return punch.employee_name or ""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# --- Daily attendance (core.processing) ---------------------------------------------


@admin.register(ProcessedAttendance)
class ProcessedAttendanceAdmin(admin.ModelAdmin):
    list_display = ["work_date", "user_id", "clock_in", "clock_out", "is_outlier", "sync_state"]
    list_filter = ["is_outlier", "sync_state"]
    search_fields = ["user_id"]
    date_hierarchy = "work_date"
