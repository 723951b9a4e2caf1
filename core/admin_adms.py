"""The admin for clocks that push (core.adms): the device actions that queue
commands, the command queue, and the upload lines that could not be read.

Each action has its own permission (docs/permissions.md): a view-only user is
offered none, and a crafted POST of one queues nothing. Each command queued is
recorded in the audit log with the user (core.audit.audit_commands).
"""

import datetime

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db import transaction
from django.db.models import Q
from django.template.response import TemplateResponse
from django.utils.timesince import timesince

from core import adms
from core.audit import audit_commands
from core.models import DeviceCommand, PushRejectedLine


def push_health(device, *, now: datetime.datetime) -> tuple:
    """format_html arguments for a pushing clock's health: up, down, or waiting."""
    if device.last_seen_at is None:
        return ("{}", "never called")
    silent = now - device.last_seen_at
    seen = (
        f"last seen {int(silent.total_seconds())} s ago"
        if silent < datetime.timedelta(minutes=2)
        else f"last seen {timesince(device.last_seen_at, now)} ago"
    )
    if not device.enabled:
        return ('<span style="color:#ba2121">{}</span>', f"waiting for approval, {seen}")
    if silent > adms.push_down_after():
        return ('<span style="color:#ba2121">{}</span>', f"down, {seen}")
    return ('<span style="color:#2e7d32">{}</span>', f"up, {seen}")


def _report(modeladmin, request, result: adms.QueueResult) -> None:
    if result.queued:
        devices = sorted({command.device.name for command in result.queued})
        modeladmin.message_user(
            request,
            f"{len(result.queued)} command(s) queued for {', '.join(devices)}; each clock "
            "takes them at its next poll (Device commands shows their results).",
            messages.SUCCESS,
        )
    for line in result.refused:
        modeladmin.message_user(request, line, messages.WARNING)


class ConnectionFilter(admin.SimpleListFilter):
    """Polled clocks, clocks that push, and new ones waiting for approval."""

    title = "connection"
    parameter_name = "connection"

    def lookups(self, request, model_admin):
        return [
            ("polled", "Polled (has an IP address)"),
            ("push", "Pushes (Cloud server)"),
            ("waiting", "Pushes, waiting for approval"),
        ]

    def queryset(self, request, queryset):
        if self.value() == "polled":
            return queryset.filter(ip_address__isnull=False)
        if self.value() == "push":
            return queryset.filter(first_seen_at__isnull=False)
        if self.value() == "waiting":
            return queryset.filter(first_seen_at__isnull=False, enabled=False)
        return queryset


class ReuploadForm(forms.Form):
    start = forms.DateField(
        label="From", help_text="The first day, on the clock's calendar (YYYY-MM-DD)."
    )
    end = forms.DateField(label="To", help_text="The last day, included.")

    def clean(self):
        cleaned = super().clean()
        start, end = cleaned.get("start"), cleaned.get("end")
        if start and end and end < start:
            raise forms.ValidationError("The last day must not be before the first.")
        return cleaned


class PushDeviceActions:
    """Mixed into DeviceAdmin: commands for pushing clocks."""

    push_actions = ["refresh_info", "reread_options", "reboot", "reupload"]

    def has_send_info_command_permission(self, request):
        return request.user.has_perm("core.send_info_command")

    def has_send_check_command_permission(self, request):
        return request.user.has_perm("core.send_check_command")

    def has_send_reboot_command_permission(self, request):
        return request.user.has_perm("core.send_reboot_command")

    def has_send_reupload_command_permission(self, request):
        return request.user.has_perm("core.send_reupload_command")

    def _queue(self, request, queryset, kind, **values):
        with transaction.atomic():
            result = adms.devices_command_queue(
                devices=queryset, kind=kind, created_by=request.user.get_username(), **values
            )
            audit_commands(actor=request.user, commands=result.queued)
        _report(self, request, result)

    @admin.action(description="Push: refresh info (INFO)", permissions=["send_info_command"])
    def refresh_info(self, request, queryset):
        self._queue(request, queryset, "info")

    @admin.action(description="Push: re-read options (CHECK)", permissions=["send_check_command"])
    def reread_options(self, request, queryset):
        self._queue(request, queryset, "check")

    @admin.action(description="Push: reboot", permissions=["send_reboot_command"])
    def reboot(self, request, queryset):
        self._queue(request, queryset, "reboot")

    @admin.action(
        description="Push: upload a date range again…", permissions=["send_reupload_command"]
    )
    def reupload(self, request, queryset):
        """Asks for the days on a page of its own, then queues DATA QUERY ATTLOG."""
        form = ReuploadForm(request.POST if "apply" in request.POST else None)
        if form.is_bound and form.is_valid():
            start = datetime.datetime.combine(form.cleaned_data["start"], datetime.time.min)
            end = datetime.datetime.combine(form.cleaned_data["end"], datetime.time(23, 59, 59))
            self._queue(request, queryset, "reupload", start=start, end=end)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Upload a date range again",
            "opts": self.model._meta,
            "form": form,
            "devices": list(queryset[:50]),
            "action": request.POST.get("action", ""),
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/core/device/reupload.html", context)


class PushEmployeeActions:
    """Mixed into EmployeeAdmin: send employees to, or remove them from, the
    pushing clocks they are linked to."""

    push_actions = ["send_to_clocks", "delete_from_clocks"]

    def has_manage_device_users_permission(self, request):
        return request.user.has_perm("core.manage_device_users")

    def _queue(self, request, queryset, *, delete):
        with transaction.atomic():
            result = adms.employees_command_queue(
                employees=queryset, delete=delete, created_by=request.user.get_username()
            )
            audit_commands(actor=request.user, commands=result.queued)
        _report(self, request, result)

    @admin.action(
        description="Push: add or update on their pushing clocks",
        permissions=["manage_device_users"],
    )
    def send_to_clocks(self, request, queryset):
        self._queue(request, queryset, delete=False)

    @admin.action(
        description="Push: delete from their pushing clocks", permissions=["manage_device_users"]
    )
    def delete_from_clocks(self, request, queryset):
        self._queue(request, queryset, delete=True)


@admin.register(DeviceCommand)
class DeviceCommandAdmin(admin.ModelAdmin):
    """The commands queued for pushing clocks and what each clock answered.
    Written by core.adms only: queued by the device and employee actions.

    A command line is shown only through adms.command_shown (a user's password
    as ***), and it is not searched as text: a search for `Passwd=12` would
    tell a password by which rows it finds. The search finds a device's name
    or serial number, who queued the command, or a user ID (the PIN field).
    """

    list_display = [
        "id",
        "device",
        "short_command",
        "state",
        "return_code",
        "created_at",
        "sent_at",
        "answered_at",
        "created_by",
    ]
    list_filter = ["state", "device"]
    list_select_related = ["device"]
    search_fields = ["device__name", "device__serial_number", "created_by"]
    search_help_text = "A device's name or serial number, who queued it, or a user ID."
    # Every field, the command line masked in place of the raw one.
    fields = [
        "shown_command" if field.name == "command" else field.name
        for field in DeviceCommand._meta.fields
    ]
    readonly_fields = fields

    def get_queryset(self, request):
        # What is read does not wait for a clock to poll: a command whose
        # time is up reads as failed even when its clock went silent.
        adms.commands_expire()
        return super().get_queryset(request)

    def get_search_results(self, request, queryset, search_term):
        found, duplicates = super().get_search_results(request, queryset, search_term)
        user_id = search_term.strip()
        if user_id and not any(ch.isspace() for ch in user_id):
            # The whole PIN field (USERINFO PIN=…, the first field) only: the
            # term holds no tab, so it cannot reach into the fields after it.
            found |= queryset.filter(
                Q(command__contains=f" PIN={user_id}\t") | Q(command__endswith=f" PIN={user_id}")
            )
        return found, duplicates

    @admin.display(description="command")
    def short_command(self, command):
        return adms.command_shown(command.command).replace("\t", " ")[:100]

    @admin.display(description="command")
    def shown_command(self, command):
        return adms.command_shown(command.command)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(PushRejectedLine)
class PushRejectedLineAdmin(admin.ModelAdmin):
    """Upload lines a clock sent that could not be read; the rest of each batch was stored."""

    list_display = ["received_at", "device", "table", "short_line", "reason"]
    list_filter = ["device", "table"]
    list_select_related = ["device"]
    search_fields = ["line", "reason"]
    readonly_fields = ["device", "table", "line", "reason", "received_at"]
    exclude = ["digest"]

    @admin.display(description="line")
    def short_line(self, line):
        return line.line.replace("\t", " ⇥ ")[:120]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
