import datetime
from zoneinfo import ZoneInfo

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import Count, OuterRef, Q, Subquery
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

# The Timesheets page and the audit log's admin register themselves there.
from core import admin_reports  # noqa: F401
from core.admin_adms import (
    ConnectionFilter,
    PushDeviceActions,
    PushEmployeeActions,
    push_health,
)
from core.audit import audit_changes, audit_clock_set
from core.crm import crm_punch_resend, crm_punch_reset_failed, crm_resend, crm_reset_failed
from core.ingest import (
    DeviceBusy,
    device_sync_time,
    device_test,
    devices_poll,
    drift_text,
    punches_judge,
)
from core.models import (
    DeliveryLog,
    Device,
    Employee,
    ProcessedAttendance,
    PunchDelivery,
    RawAttendance,
)
from core.processing import (
    attendance_discard_edits,
    attendance_edit,
    attendance_mark_reviewed,
    attendance_recompute,
)
from core.status import company_today, company_zone
from core.zk.client import DeviceError

# --- Devices -------------------------------------------------------------------------


class DeviceForm(forms.ModelForm):
    """The comm key is write-only: the page never carries it, a blank field keeps it."""

    comm_key = forms.IntegerField(
        label="Comm key",
        required=False,
        min_value=0,
        max_value=999999,
        # Never rendered, not even masked: the page would carry the key. And
        # new-password, so that browsers do not fill in a saved login password.
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )

    class Meta:
        model = Device
        # What the operator sets; the admin narrows it to its fieldsets.
        fields = [
            "name",
            "ip_address",
            "port",
            "protocol",
            "comm_key",
            "timeout_seconds",
            "timezone",
            "encoding",
            "enabled",
            "work_start_time",
            "work_end_time",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # No initial value: a blank field then counts as unchanged.
        self.initial.pop("comm_key", None)
        field = self.fields.get("comm_key")
        if field is None:
            return
        if self.instance.pk and self.instance.comm_key:
            field.help_text = (
                "A comm key is set; leave blank to keep it, enter a new one to change it, "
                "or 0 to remove it."
            )
        else:
            field.help_text = (
                "No comm key set. Enter the device's Comm Key (0 to 999999, from its menu) "
                "if it has one."
            )

    def clean_comm_key(self):
        value = self.cleaned_data["comm_key"]
        if value is None:
            return self.instance.comm_key if self.instance.pk else 0
        return value


@admin.register(Device)
class DeviceAdmin(PushDeviceActions, admin.ModelAdmin):
    form = DeviceForm
    list_display = [
        "name",
        "address",
        "enabled",
        "health",
        "last_success_at",
        "consecutive_failures",
        "log_fill",
        "records",
        "clock_drift",
        "short_error",
    ]
    list_filter = ["enabled", "protocol", ConnectionFilter]
    search_fields = ["name", "ip_address", "serial_number"]
    actions = ["poll_now", "test_connection", "sync_clock", *PushDeviceActions.push_actions]
    readonly_fields = [
        *Device.OBSERVED_FIELDS,
        "last_record_count",
        "last_serial_number",
        "created_at",
        "updated_at",
        "comm_key_state",
        # Clocks that push (core.adms)
        "first_seen_at",
        "last_seen_at",
        "push_address",
        "attlog_stamp",
        "operlog_stamp",
        "fingerprint_count",
        "reported_ip",
        "newest_record_at",
        "push_options",
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
                    ("timezone", "encoding"),
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
        (
            "Push (Cloud server): clocks that call this server, found by serial number",
            {
                "fields": [
                    ("first_seen_at", "last_seen_at", "push_address"),
                    ("attlog_stamp", "operlog_stamp", "newest_record_at"),
                    ("fingerprint_count", "reported_ip"),
                    "push_options",
                ]
            },
        ),
    ]

    def get_queryset(self, request):
        stored = (
            RawAttendance.objects.filter(device=OuterRef("pk"))
            .order_by()
            .values("device")
            .annotate(count=Count("pk"))
            .values("count")
        )
        return super().get_queryset(request).annotate(stored_punches=Subquery(stored))

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or self.has_change_permission(request, obj):
            return fieldsets
        # A read-only page would print the field's value: show only whether one is set.
        return [
            (
                name,
                {
                    **options,
                    "fields": [
                        "comm_key_state" if field == "comm_key" else field
                        for field in options["fields"]
                    ],
                },
            )
            for name, options in fieldsets
        ]

    @admin.display(description="comm key")
    def comm_key_state(self, device):
        return "set" if device.comm_key else "not set"

    def has_poll_device_permission(self, request):
        return request.user.has_perm("core.poll_device")

    def has_test_device_permission(self, request):
        return request.user.has_perm("core.test_device")

    def has_sync_device_clock_permission(self, request):
        return request.user.has_perm("core.sync_device_clock")

    @admin.display(description="address")
    def address(self, device):
        if not device.ip_address:
            where = f" from {device.push_address}" if device.push_address else ""
            return f"pushes{where} (serial {device.serial_number or '?'})"
        return f"{device.ip_address}:{device.port}/{device.protocol}"

    @admin.display(description="records (clock / stored)")
    def records(self, device):
        clock = "—" if device.record_count is None else device.record_count
        return f"{clock} / {device.stored_punches or 0}"

    @admin.display(description="health")
    def health(self, device):
        if not device.ip_address:
            # A pushing clock calls every ADMS_DELAY_SECONDS: silence means down.
            return format_html(*push_health(device, now=timezone.now()))
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
        drift = device.clock_drift_seconds
        if drift is None:
            return "—"
        if abs(drift) > settings.CLOCK_DRIFT_ALERT_SECONDS:
            # Its punches are still judged by the server's time; the clock
            # itself needs setting before people see the wrong time on it.
            return format_html(
                '<span style="color:#ba2121" title="Sync clock sets it">clock {}</span>',
                drift_text(drift),
            )
        return f"{drift:+.0f} s"

    @admin.display(description="last error")
    def short_error(self, device):
        return device.last_error[:80]

    @admin.action(description="Poll now", permissions=["poll_device"])
    def poll_now(self, request, queryset):
        for result in devices_poll(devices=queryset):
            if result.busy:
                level = messages.WARNING
            elif not result.ok:
                level = messages.ERROR
            else:
                level = messages.WARNING if result.warnings else messages.SUCCESS
            self.message_user(request, result.summary(), level)

    @admin.action(description="Test connection", permissions=["test_device"])
    def test_connection(self, request, queryset):
        for device in queryset:
            report = device_test(device=device)
            if not report.ok:
                level = messages.WARNING if report.busy else messages.ERROR
                self.message_user(request, f"{device.name}: {report.error}", level)
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

    @admin.action(description="Sync clock", permissions=["sync_device_clock"])
    def sync_clock(self, request, queryset):
        for device in queryset:
            try:
                local_now = device_sync_time(device=device)
            except DeviceError as exc:
                level = messages.WARNING if isinstance(exc, DeviceBusy) else messages.ERROR
                self.message_user(request, f"{device.name}: {exc}", level)
            else:
                audit_clock_set(actor=request.user, device=device, set_to=local_now)
                self.message_user(
                    request,
                    f"{device.name}: clock set to {local_now:%Y-%m-%d %H:%M:%S} ({device.timezone})",
                    messages.SUCCESS,
                )


# --- Employees -----------------------------------------------------------------------


@admin.register(Employee)
class EmployeeAdmin(PushEmployeeActions, admin.ModelAdmin):
    list_display = ["user_id", "name", "card", "privilege", "work_start_time", "work_end_time"]
    search_fields = ["user_id", "name"]
    list_filter = ["devices"]
    filter_horizontal = ["devices"]
    readonly_fields = ["created_at", "updated_at"]
    actions = ["delete_selected", *PushEmployeeActions.push_actions]


# --- Raw punches ---------------------------------------------------------------------


class CompanyDateFilter(admin.DateFieldListFilter):
    """Django's Today, Past 7 days, This month and This year, from today in COMPANY_TIMEZONE.

    Django counts them in the current zone, which is TIME_ZONE (UTC) here.
    """

    def __init__(self, *args, **kwargs):
        with timezone.override(company_zone()):
            super().__init__(*args, **kwargs)


class VerdictFilter(admin.SimpleListFilter):
    """Whose verdict stands on a punch: the automatic checks', or an operator's."""

    title = "verdict set by"
    parameter_name = "verdict"

    def lookups(self, request, model_admin):
        return [
            ("automatic", "Automatic checks"),
            ("operator", "An operator (either way)"),
            ("operator_suspect", "An operator: suspect"),
            ("operator_cleared", "An operator: not suspect"),
        ]

    def queryset(self, request, queryset):
        filters = {
            "automatic": {"suspect_override__isnull": True},
            "operator": {"suspect_override__isnull": False},
            "operator_suspect": {"suspect_override": True},
            "operator_cleared": {"suspect_override": False},
        }
        chosen = filters.get(self.value())
        return queryset if chosen is None else queryset.filter(**chosen)


class VerdictForm(forms.Form):
    # Not required here: core.ingest.punches_judge refuses a blank reason, with its message.
    reason = forms.CharField(
        required=False,
        widget=forms.TextInput(attrs={"size": 80}),
        help_text="Recorded with the verdict, with your user name.",
    )


@admin.register(RawAttendance)
class RawAttendanceAdmin(admin.ModelAdmin):
    """Read-only: punches are what the devices recorded, never edited here.

    The one thing an operator may set is the verdict (suspect or not), through
    the two actions, with the core.judge_punch permission.
    """

    list_display = [
        "timestamp",
        "local_time",
        "user_id",
        "employee_name",
        "device",
        "punch_state",
        "verify_type",
        "is_suspect",
        "suspect_reason",
        "operator_verdict",
    ]
    list_filter = [
        "device",
        ("timestamp", CompanyDateFilter),
        "punch_state",
        "is_suspect",
        VerdictFilter,
    ]
    date_hierarchy = "timestamp"
    search_fields = ["=user_id"]
    list_select_related = ["device"]
    show_full_result_count = False  # COUNT(*) over millions of punches on every page
    actions = ["mark_suspect", "clear_suspect"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    ("device", "user_id"),
                    ("timestamp", "local_time"),
                    ("status", "punch_state", "verify_type"),
                    "received_at",
                ]
            },
        ),
        (
            "Verdict (processing skips suspect punches)",
            {"fields": ["is_suspect", "suspect_reason", "operator_verdict", "revised_at"]},
        ),
    ]
    readonly_fields = ["local_time", "operator_verdict"]

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

    @admin.display(description="device local time", ordering="timestamp")
    def local_time(self, punch):
        # What the clock showed: the stored UTC time in the device's own zone.
        return punch.timestamp.astimezone(punch.device.zone).strftime("%Y-%m-%d %H:%M:%S %Z")

    @admin.display(description="employee", ordering="employee_name")
    def employee_name(self, punch):
        return punch.employee_name or ""

    @admin.display(description="operator verdict")
    def operator_verdict(self, punch):
        if punch.suspect_override is None:
            return "—"
        verdict = "suspect" if punch.suspect_override else "not suspect"
        return (
            f"{verdict}, by {punch.suspect_override_by or '?'} "
            f"at {punch.suspect_override_at:%Y-%m-%d %H:%M} UTC"
        )

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_judge_punch_permission(self, request):
        return request.user.has_perm("core.judge_punch")

    @admin.action(description="Mark as suspect…", permissions=["judge_punch"])
    def mark_suspect(self, request, queryset):
        return self._judge(request, queryset, suspect=True)

    @admin.action(description="Clear suspect flag…", permissions=["judge_punch"])
    def clear_suspect(self, request, queryset):
        return self._judge(request, queryset, suspect=False)

    def _judge(self, request, queryset, *, suspect: bool):
        """Asks for the reason on a page of its own, then records the verdict."""
        form = VerdictForm(request.POST if "apply" in request.POST else None)
        count = queryset.count()  # before the update: a filter on the verdict would change it
        if form.is_bound and form.is_valid():
            try:
                with audit_changes(
                    actor=request.user,
                    action="punches_judge",
                    ids=queryset.values_list("pk", flat=True),
                ) as ids:
                    written = punches_judge(
                        ids=ids,
                        suspect=suspect,
                        reason=form.cleaned_data["reason"],
                        user=request.user,
                    )
            except ValueError as exc:
                form.add_error("reason", str(exc))
            else:
                verdict = "marked suspect" if suspect else "cleared of the suspect flag"
                unchanged = (
                    f"; {count - written} already had that verdict" if written < count else ""
                )
                self.message_user(
                    request, f"{written} punch(es) {verdict}{unchanged}.", messages.SUCCESS
                )
                return None
        opts = self.model._meta
        context = {
            **self.admin_site.each_context(request),
            "title": "Mark punches as suspect" if suspect else "Clear the suspect flag",
            "suspect": suspect,
            "opts": opts,
            "form": form,
            "count": count,
            "sample": list(queryset.select_related("device")[:20]),
            "action": request.POST.get("action", ""),
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/core/rawattendance/judge.html", context)


# --- Daily attendance (core.processing) ---------------------------------------------


class WorkDateRangeFilter(admin.FieldListFilter):
    """From/to date inputs (`?work_date__gte=…&work_date__lte=…`); either may be left empty."""

    template = "admin/core/date_range_filter.html"

    def __init__(self, field, request, params, model, model_admin, field_path):
        self.lookup_gte = f"{field_path}__gte"
        self.lookup_lte = f"{field_path}__lte"
        self.current = {name: request.GET.get(name, "") for name in self.expected_parameters()}
        self.others = [
            (name, value)
            for name, values in request.GET.lists()
            if name not in self.expected_parameters() and name not in ("p", "e")
            for value in values
        ]
        super().__init__(field, request, params, model, model_admin, field_path)
        self.title = f"{self.title} range"

    def expected_parameters(self):
        return [self.lookup_gte, self.lookup_lte]

    def queryset(self, request, queryset):
        bounds = {}
        for name, value in self.current.items():
            if value:
                try:
                    bounds[name] = datetime.date.fromisoformat(value)
                except ValueError:
                    raise admin.options.IncorrectLookupParameters(
                        f"{value!r} is not a date like 2026-11-02."
                    ) from None
        return queryset.filter(**bounds)

    def choices(self, changelist):
        yield {
            "gte_name": self.lookup_gte,
            "lte_name": self.lookup_lte,
            "gte": self.current[self.lookup_gte],
            "lte": self.current[self.lookup_lte],
            "others": self.others,
            "clear": changelist.get_query_string(remove=self.expected_parameters()),
        }


class PeriodFilter(admin.SimpleListFilter):
    """The periods HR closes: weeks and months, this one and the last.

    Counted from today in COMPANY_TIMEZONE, the date HR sees on its own clock.
    """

    title = "period"
    parameter_name = "range"

    def lookups(self, request, model_admin):
        return [
            ("yesterday", "Yesterday"),
            ("this_week", "This week"),
            ("last_week", "Last week"),
            ("this_month", "This month"),
            ("last_month", "Last month"),
        ]

    def queryset(self, request, queryset):
        today = company_today()
        monday = today - datetime.timedelta(days=today.weekday())
        first = today.replace(day=1)
        previous_first = (first - datetime.timedelta(days=1)).replace(day=1)
        spans = {
            "yesterday": (today - datetime.timedelta(days=1), today - datetime.timedelta(days=1)),
            "this_week": (monday, today),
            "last_week": (monday - datetime.timedelta(days=7), monday - datetime.timedelta(days=1)),
            "this_month": (first, today),
            "last_month": (previous_first, first - datetime.timedelta(days=1)),
        }
        span = spans.get(self.value())
        if span is None:
            return queryset
        return queryset.filter(work_date__gte=span[0], work_date__lte=span[1])


class DeviceFilter(admin.SimpleListFilter):
    """Days clocked in or out on a device."""

    title = "device"
    parameter_name = "device"

    def lookups(self, request, model_admin):
        return [(str(pk), name) for pk, name in Device.objects.values_list("pk", "name")]

    def queryset(self, request, queryset):
        value = self.value()
        if not value or not value.isdigit():
            return queryset
        return queryset.filter(Q(clock_in_device_id=value) | Q(clock_out_device_id=value))


class ProcessedAttendanceForm(forms.ModelForm):
    class Meta:
        model = ProcessedAttendance
        fields = ["clock_in", "clock_out"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Absent on the read-only page of a user who may only view days.
        if "clock_in" in self.fields:
            self.fields["clock_in"].required = True

    def clean(self):
        cleaned = super().clean()
        clock_in, clock_out = cleaned.get("clock_in"), cleaned.get("clock_out")
        if clock_in and clock_out and clock_out <= clock_in:
            raise forms.ValidationError("The clock-out must be after the clock-in.")
        return cleaned


def _zone(device: Device | None) -> ZoneInfo:
    return device.zone if device is not None else ZoneInfo(settings.DEVICE_DEFAULT_TIMEZONE)


def _local_clock(moment, device, work_date) -> str:
    if moment is None:
        return "—"
    local = moment.astimezone(_zone(device))
    days = (local.date() - work_date).days
    return f"{local:%H:%M}" + (f" ({days:+d}d)" if days else "")


@admin.register(ProcessedAttendance)
class ProcessedAttendanceAdmin(admin.ModelAdmin):
    """HR's view of the days. Editing clock-in/out makes a day manual (core.processing)."""

    form = ProcessedAttendanceForm
    list_display = [
        "work_date",
        "user_id",
        "employee_name",
        "clock_in_local",
        "clock_out_local",
        "worked",
        "punch_count",
        "is_outlier",
        "reasons",
        "notes",
        "version",
        "sync_state",
        "sync_attempts",
        "delivery_error",
    ]
    list_filter = [
        ("work_date", WorkDateRangeFilter),
        PeriodFilter,
        "is_outlier",
        "sync_state",
        DeviceFilter,
        "is_manual",
        "has_newer_punches",
    ]
    date_hierarchy = "work_date"
    search_fields = ["=user_id", "employee__name"]
    list_select_related = ["employee", "clock_in_device", "clock_out_device"]
    show_full_result_count = False  # COUNT(*) over years of days on every page
    actions = ["recompute", "mark_reviewed", "discard_edits", "resend", "reset_failed"]
    fieldsets = [
        (None, {"fields": ["user_id", "employee", "work_date"]}),
        (
            "Times (in the clock-in device's zone; editing them makes the day manual)",
            {"fields": [("clock_in", "clock_in_device"), ("clock_out", "clock_out_device")]},
        ),
        (
            "Computed",
            {
                "fields": [
                    ("punch_count", "ignored_suspect_punches"),
                    "worked",
                    "is_outlier",
                    "reasons",
                ]
            },
        ),
        (
            "HR",
            {
                "fields": [
                    ("is_manual", "has_newer_punches"),
                    ("edited_by", "edited_at"),
                    ("reviewed_by", "reviewed_at"),
                ]
            },
        ),
        (
            "Delivery to the CRM",
            {
                "fields": [
                    ("version", "synced_version", "sync_state"),
                    ("sync_attempts", "last_sync_attempt", "next_sync_at"),
                    "last_sync_error",
                    ("crm_status", "crm_response"),
                    ("delivery_key", "delivery_version", "delivery_lease_until"),
                    ("created_at", "updated_at"),
                ]
            },
        ),
    ]
    readonly_fields = [
        "user_id",
        "employee",
        "work_date",
        "clock_in_device",
        "clock_out_device",
        "punch_count",
        "ignored_suspect_punches",
        "worked",
        "is_outlier",
        "reasons",
        "is_manual",
        "has_newer_punches",
        "edited_by",
        "edited_at",
        "reviewed_by",
        "reviewed_at",
        "version",
        "synced_version",
        "sync_state",
        "sync_attempts",
        "last_sync_attempt",
        "next_sync_at",
        "last_sync_error",
        "crm_status",
        "crm_response",
        "delivery_key",
        "delivery_version",
        "delivery_lease_until",
        "created_at",
        "updated_at",
    ]

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        # The form shows and reads times on the clock-in device's clock, as HR knows them.
        zone_name = (
            ProcessedAttendance.objects.filter(pk=object_id)
            .values_list("clock_in_device__timezone", flat=True)
            .first()
            if object_id and str(object_id).isdigit()
            else None
        )
        zone = ZoneInfo(zone_name or settings.DEVICE_DEFAULT_TIMEZONE)
        with timezone.override(zone):
            return super().changeform_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        if {"clock_in", "clock_out"} & set(form.changed_data):
            with audit_changes(actor=request.user, action="attendance_edit", ids=[obj.pk]):
                edited = attendance_edit(
                    record_id=obj.pk,
                    clock_in=form.cleaned_data["clock_in"],
                    clock_out=form.cleaned_data["clock_out"],
                    user=request.user,
                )
            obj.__dict__.update(edited.__dict__)

    def has_add_permission(self, request):
        return False  # days come from punches

    def has_delete_permission(self, request, obj=None):
        return False  # the next run would rebuild it; edit it instead

    @admin.display(description="employee", ordering="employee__name")
    def employee_name(self, row):
        return row.employee.name if row.employee else ""

    @admin.display(description="in", ordering="clock_in")
    def clock_in_local(self, row):
        return _local_clock(row.clock_in, row.clock_in_device, row.work_date)

    @admin.display(description="out", ordering="clock_out")
    def clock_out_local(self, row):
        return _local_clock(
            row.clock_out, row.clock_out_device or row.clock_in_device, row.work_date
        )

    @admin.display(description="outlier reasons")
    def reasons(self, row):
        return format_html_join(
            mark_safe("<br>"), "{}", ((r["message"],) for r in row.outlier_reasons)
        )

    @admin.display(description="notes")
    def notes(self, row):
        notes = []
        if row.is_manual:
            notes.append("edited by HR")
        if row.has_newer_punches:
            notes.append("newer punches since the edit")
        if row.ignored_suspect_punches:
            notes.append(f"{row.ignored_suspect_punches} suspect punch(es) ignored")
        if row.reviewed_at:
            notes.append("reviewed")
        if row.clock_in is None:
            notes.append("no punches any more (sent to the CRM as a correction)")
        return "; ".join(notes)

    @admin.action(description="Recompute from punches", permissions=["change"])
    def recompute(self, request, queryset):
        result = attendance_recompute(ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"Recomputed: {result.summary()}", messages.SUCCESS)

    @admin.action(description="Mark reviewed", permissions=["change"])
    def mark_reviewed(self, request, queryset):
        with audit_changes(
            actor=request.user,
            action="attendance_mark_reviewed",
            ids=queryset.values_list("pk", flat=True),
        ) as ids:
            count = attendance_mark_reviewed(ids=ids, user=request.user)
        self.message_user(request, f"{count} day(s) marked reviewed.", messages.SUCCESS)

    @admin.action(description="Discard HR edits and recompute from punches", permissions=["change"])
    def discard_edits(self, request, queryset):
        with audit_changes(
            actor=request.user,
            action="attendance_discard_edits",
            ids=queryset.values_list("pk", flat=True),
        ) as ids:
            result = attendance_discard_edits(ids=ids)
        self.message_user(request, f"Edits discarded: {result.summary()}", messages.SUCCESS)

    @admin.display(description="delivery error")
    def delivery_error(self, row):
        return row.last_sync_error[:80]

    def has_resend_processedattendance_permission(self, request):
        return request.user.has_perm("core.resend_processedattendance")

    def has_reset_failed_processedattendance_permission(self, request):
        return request.user.has_perm("core.reset_failed_processedattendance")

    @admin.action(description="Resend to the CRM", permissions=["resend_processedattendance"])
    def resend(self, request, queryset):
        with audit_changes(
            actor=request.user, action="crm_resend", ids=queryset.values_list("pk", flat=True)
        ) as ids:
            count = crm_resend(ids=ids)
        self.message_user(
            request,
            f"{count} day(s) due for delivery again; the next sync_to_crm run sends them.",
            messages.SUCCESS,
        )

    @admin.action(
        description="Reset failed deliveries (send at the next run)",
        permissions=["reset_failed_processedattendance"],
    )
    def reset_failed(self, request, queryset):
        with audit_changes(
            actor=request.user,
            action="crm_reset_failed",
            ids=queryset.values_list("pk", flat=True),
        ) as ids:
            count = crm_reset_failed(ids=ids)
        self.message_user(
            request,
            f"{count} failed day(s) due for delivery again; the next sync_to_crm run sends "
            "them. Days that had not failed were left as they were.",
            messages.SUCCESS,
        )


@admin.register(DeliveryLog)
class DeliveryLogAdmin(admin.ModelAdmin):
    """Every request to the CRM and its answer: did the CRM get it, and what did it say?"""

    list_display = [
        "created_at",
        "records",
        "status_code",
        "outcome",
        "duration_ms",
        "attempt",
        "short_answer",
    ]
    list_filter = ["outcome", "status_code"]
    search_fields = ["=idempotency_key", "external_ids"]
    date_hierarchy = "created_at"
    show_full_result_count = False

    @admin.display(description="answer")
    def short_answer(self, entry):
        return (entry.error or entry.response_excerpt)[:100]

    def has_add_permission(self, request):
        return False  # written by core.crm only

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # kept DELIVERY_LOG_DAYS, then dropped by the sync run


# --- Raw punch deliveries (CRM_PUNCHES_URL) ------------------------------------------------


@admin.register(PunchDelivery)
class PunchDeliveryAdmin(admin.ModelAdmin):
    """Each registered raw punch on its way to CRM_PUNCHES_URL: its state, attempts
    and the CRM's answer. Written by core.crm only; delivered punches are dropped
    LATE_COMMIT_MARGIN after. Resend and Reset failed each need their own permission."""

    list_display = [
        "punch_time",
        "employee_id",
        "device",
        "sync_state",
        "sync_attempts",
        "last_sync_attempt",
        "crm_status",
        "answer",
    ]
    list_filter = ["sync_state", "raw__device"]
    search_fields = ["=raw__user_id"]
    list_select_related = ["raw__device"]
    show_full_result_count = False
    ordering = ["-pk"]
    actions = ["resend", "reset_failed"]
    fieldsets = [
        (None, {"fields": ["raw", ("employee_id", "device", "punch_time")]}),
        (
            "Delivery to the CRM",
            {
                "fields": [
                    ("sync_state", "sync_attempts", "resend_count"),
                    ("last_sync_attempt", "next_sync_at"),
                    "last_sync_error",
                    ("crm_status", "crm_response"),
                    ("delivery_key", "delivery_lease_until"),
                    "created_at",
                ]
            },
        ),
    ]
    readonly_fields = [
        "raw",
        "employee_id",
        "device",
        "punch_time",
        "sync_state",
        "sync_attempts",
        "resend_count",
        "last_sync_attempt",
        "next_sync_at",
        "last_sync_error",
        "crm_status",
        "crm_response",
        "delivery_key",
        "delivery_lease_until",
        "created_at",
    ]

    @admin.display(description="employee ID", ordering="raw__user_id")
    def employee_id(self, row):
        return row.raw.user_id

    @admin.display(description="device", ordering="raw__device__name")
    def device(self, row):
        return row.raw.device.name

    @admin.display(description="punch (device local time)", ordering="raw__timestamp")
    def punch_time(self, row):
        moment = row.raw.timestamp.astimezone(row.raw.device.zone)
        return moment.strftime("%Y-%m-%d %H:%M:%S %Z")

    @admin.display(description="CRM answer or error")
    def answer(self, row):
        return (row.last_sync_error or row.crm_response)[:100]

    def has_add_permission(self, request):
        return False  # registered by each sync_to_crm run

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_resend_punchdelivery_permission(self, request):
        return request.user.has_perm("core.resend_punchdelivery")

    def has_reset_failed_punchdelivery_permission(self, request):
        return request.user.has_perm("core.reset_failed_punchdelivery")

    @admin.action(description="Resend to the CRM", permissions=["resend_punchdelivery"])
    def resend(self, request, queryset):
        with audit_changes(
            actor=request.user,
            action="crm_punch_resend",
            ids=queryset.values_list("pk", flat=True),
        ) as ids:
            count = crm_punch_resend(ids=ids)
        self.message_user(
            request,
            f"{count} punch(es) due for delivery again; the next sync_to_crm run sends them. "
            "Punches held back as suspect stay held until their verdict is cleared.",
            messages.SUCCESS,
        )

    @admin.action(
        description="Reset failed deliveries (send at the next run)",
        permissions=["reset_failed_punchdelivery"],
    )
    def reset_failed(self, request, queryset):
        with audit_changes(
            actor=request.user,
            action="crm_punch_reset_failed",
            ids=queryset.values_list("pk", flat=True),
        ) as ids:
            count = crm_punch_reset_failed(ids=ids)
        self.message_user(
            request,
            f"{count} failed punch(es) due for delivery again; the next sync_to_crm run sends "
            "them. Punches that had not failed were left as they were.",
            messages.SUCCESS,
        )


# --- HR status page (core.admin_status) ----------------------------------------------
# The filters its figures link to, added here in one place so the lists above
# stay as they are.

from core.admin_status import (  # noqa: E402
    DeviceStatusFilter,
    PresenceFilter,
    PunchDeliveryFilter,
    ReviewFilter,
)

DeviceAdmin.list_filter = [*DeviceAdmin.list_filter, DeviceStatusFilter]
ProcessedAttendanceAdmin.list_filter = [
    *ProcessedAttendanceAdmin.list_filter,
    PresenceFilter,
    ReviewFilter,
]
RawAttendanceAdmin.list_filter = [*RawAttendanceAdmin.list_filter, PunchDeliveryFilter]
