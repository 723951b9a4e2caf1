"""What the API reads and writes. Serializers parse and render; writes go
through the stage functions the views call."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.adms import command_shown
from core.device_users import MAX_CARD, MAX_UID, PRIVILEGES, UserInput
from core.models import Device, DeviceCommand, Employee, ProcessedAttendance, RawAttendance

# --- Shared answers -------------------------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="What was wrong.")


class DeviceErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="The device's error: what to check.")


class TaskQueuedSerializer(serializers.Serializer):
    task_id = serializers.CharField(help_text="The Celery task's id.")


# --- Devices --------------------------------------------------------------------------


class DeviceSerializer(serializers.ModelSerializer):
    """A device. The comm key is write-only: answers say only whether one is set."""

    comm_key = serializers.IntegerField(
        write_only=True,
        required=False,
        min_value=0,
        max_value=999999,
        help_text="The device's Comm Key, 0 for none; never returned. Omit it to keep the "
        "stored one.",
    )
    comm_key_set = serializers.SerializerMethodField()

    class Meta:
        model = Device
        fields = [
            "id",
            "name",
            "ip_address",
            "port",
            "protocol",
            "comm_key",
            "comm_key_set",
            "timeout_seconds",
            "timezone",
            "encoding",
            "enabled",
            "work_start_time",
            "work_end_time",
            *Device.OBSERVED_FIELDS,
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            *Device.OBSERVED_FIELDS,
            "created_at",
            "updated_at",
        ]

    @extend_schema_field(serializers.BooleanField(help_text="Whether a comm key is stored."))
    def get_comm_key_set(self, device: Device) -> bool:
        return bool(device.comm_key)


class DeviceSizesSerializer(serializers.Serializer):
    users = serializers.IntegerField()
    users_capacity = serializers.IntegerField()
    records = serializers.IntegerField()
    records_capacity = serializers.IntegerField()
    fingers = serializers.IntegerField()
    fingers_capacity = serializers.IntegerField()


class PollResultSerializer(serializers.Serializer):
    device_id = serializers.IntegerField()
    device_name = serializers.CharField()
    ok = serializers.BooleanField()
    quick = serializers.BooleanField(help_text="Unchanged since the last download: none made.")
    downloaded = serializers.IntegerField()
    new = serializers.IntegerField()
    duplicates = serializers.IntegerField()
    revised = serializers.IntegerField()
    suspect = serializers.IntegerField()
    users = serializers.IntegerField()
    seconds = serializers.FloatField()
    error = serializers.CharField()
    timed_out = serializers.BooleanField()
    warnings = serializers.ListField(child=serializers.CharField())
    busy = serializers.BooleanField(
        help_text="Another worker held the device (a poll in progress): not contacted; "
        "`error` says when to try again."
    )


class DeviceReportSerializer(serializers.Serializer):
    device_name = serializers.CharField()
    ok = serializers.BooleanField()
    error = serializers.CharField()
    timed_out = serializers.BooleanField()
    busy = serializers.BooleanField(
        help_text="Another worker held the device (a poll in progress): not contacted; "
        "`error` says when to try again."
    )
    identity = serializers.DictField(child=serializers.CharField())
    sizes = DeviceSizesSerializer(allow_null=True)
    clock_drift_seconds = serializers.FloatField(allow_null=True)


class ClockSetSerializer(serializers.Serializer):
    device_id = serializers.IntegerField()
    set_to = serializers.DateTimeField(help_text="The local time the clock was set to.")


# --- Users on a device ----------------------------------------------------------------


class DeviceUserSerializer(serializers.Serializer):
    """A user as the device holds it; its password is never shown. From the
    bridge's copy of a pushing clock (context live False) uid, has_password
    and group_id are not known: null."""

    uid = serializers.SerializerMethodField(help_text="The device's internal slot number.")
    user_id = serializers.CharField(help_text="The user id (PIN) shown on the clock.")
    name = serializers.CharField()
    privilege = serializers.IntegerField(help_text="0 user, 14 admin.")
    has_password = serializers.SerializerMethodField()
    card = serializers.IntegerField()
    group_id = serializers.SerializerMethodField()

    def _live(self) -> bool:
        return self.context.get("live", True)

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_uid(self, user) -> int | None:
        return user.uid if self._live() else None

    @extend_schema_field(serializers.BooleanField(allow_null=True))
    def get_has_password(self, user) -> bool | None:
        return bool(user.password) if self._live() else None

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_group_id(self, user) -> str | None:
        return user.group_id if self._live() else None


class DeviceUserPageSerializer(serializers.Serializer):
    """A page of a device's users, saying where they were read."""

    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    source = serializers.ChoiceField(
        choices=[
            ("device", "read live from the clock"),
            ("bridge", "the bridge's copy of a pushing clock's users, not a live read"),
        ],
        help_text="device: read live from the clock; bridge: a pushing clock's users as "
        "the bridge knows them from its uploads, not a live read.",
    )
    results = DeviceUserSerializer(many=True)


class CommandsQueuedSerializer(serializers.Serializer):
    """Commands queued for a pushing clock, handed over at its next poll."""

    command_ids = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="The queued commands' ids, in the order the clock takes them; each "
        "one's state and the clock's result: GET /api/devices/{id}/commands/{command_id}/.",
    )
    commands = serializers.ListField(
        child=serializers.CharField(),
        help_text="Each command line as the clock receives it (a password shown as ***).",
    )


class DeviceCommandSerializer(serializers.ModelSerializer):
    """A command queued for a pushing clock, and what the clock answered."""

    command = serializers.SerializerMethodField()

    class Meta:
        model = DeviceCommand
        fields = [
            "id",
            "command",
            "state",
            "return_code",
            "result",
            "created_by",
            "created_at",
            "sent_at",
            "answered_at",
        ]
        read_only_fields = fields

    @extend_schema_field(
        serializers.CharField(
            help_text="The command line as the clock receives it (a password shown as ***)."
        )
    )
    def get_command(self, command: DeviceCommand) -> str:
        return command_shown(command.command)


class DeviceUserInputSerializer(serializers.Serializer):
    """A user to add or update; matched on the device by user_id. The device's
    own limits (PIN width, name bytes in its encoding) are checked against it."""

    user_id = serializers.CharField(
        max_length=24, help_text="Letters and digits, up to the device's PIN width."
    )
    name = serializers.CharField(
        required=False, allow_blank=True, default="", help_text="At most 24 bytes."
    )
    privilege = serializers.ChoiceField(choices=list(PRIVILEGES.items()), required=False, default=0)
    password = serializers.CharField(
        required=False, allow_blank=True, default="", write_only=True, max_length=8
    )
    card = serializers.IntegerField(required=False, default=0, min_value=0, max_value=MAX_CARD)
    group_id = serializers.CharField(required=False, allow_blank=True, default="", max_length=7)
    uid = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_UID,
        help_text="The device slot; omitted, the user's own slot or the next free one.",
    )

    def to_input(self) -> UserInput:
        return UserInput(**self.validated_data)


class DeviceUserImportSerializer(serializers.Serializer):
    """Either `users` (a list) or `url` (where to fetch a JSON list of users)."""

    users = DeviceUserInputSerializer(many=True, required=False, allow_empty=False)
    url = serializers.URLField(
        required=False,
        help_text="http(s) URL of a JSON list of users; its host must be in "
        "USER_IMPORT_ALLOWED_HOSTS.",
    )

    def validate(self, data):
        if ("users" in data) == ("url" in data):
            raise serializers.ValidationError("Give either users or url.")
        return data


class ImportResultSerializer(serializers.Serializer):
    added = serializers.IntegerField()
    updated = serializers.IntegerField()
    unchanged = serializers.IntegerField()


# --- Employees ------------------------------------------------------------------------


class EmployeeSerializer(serializers.ModelSerializer):
    """HR may change the name and the work-time overrides; the rest comes from the clocks."""

    class Meta:
        model = Employee
        fields = [
            "id",
            "user_id",
            "name",
            "card",
            "privilege",
            "devices",
            "work_start_time",
            "work_end_time",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["user_id", "card", "privilege", "devices", "created_at", "updated_at"]


# --- Attendance -----------------------------------------------------------------------

_zones: dict[str, ZoneInfo] = {}


def _zone(name: str) -> ZoneInfo:
    if name not in _zones:
        _zones[name] = ZoneInfo(name)
    return _zones[name]


class RawAttendanceSerializer(serializers.ModelSerializer):
    device_name = serializers.CharField(source="device.name", read_only=True)
    local_time = serializers.SerializerMethodField()

    class Meta:
        model = RawAttendance
        fields = [
            "id",
            "device",
            "device_name",
            "user_id",
            "timestamp",
            "local_time",
            "punch_state",
            "verify_type",
            "status",
            "is_suspect",
            "suspect_reason",
            "received_at",
        ]
        read_only_fields = fields

    @extend_schema_field(
        serializers.DateTimeField(help_text="The punch in its device's zone, with the offset.")
    )
    def get_local_time(self, punch: RawAttendance) -> str:
        return punch.timestamp.astimezone(_zone(punch.device.timezone)).isoformat()


class ProcessedAttendanceSerializer(serializers.ModelSerializer):
    employee_name = serializers.CharField(source="employee.name", read_only=True, default="")
    edited_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    reviewed_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = ProcessedAttendance
        fields = [
            "id",
            "user_id",
            "employee",
            "employee_name",
            "work_date",
            "clock_in",
            "clock_out",
            "clock_in_device",
            "clock_out_device",
            "punch_count",
            "worked",
            "is_outlier",
            "outlier_reasons",
            "ignored_suspect_punches",
            "is_manual",
            "edited_by",
            "edited_at",
            "has_newer_punches",
            "reviewed_by",
            "reviewed_at",
            "version",
            "sync_state",
            "synced_version",
            "sync_attempts",
            "last_sync_attempt",
            "last_sync_error",
        ]
        read_only_fields = fields


def _plausible(moment):
    if moment is not None and not 1900 <= moment.year <= 2999:
        raise serializers.ValidationError("A time between the years 1900 and 2999.")
    return moment


class CorrectionSerializer(serializers.Serializer):
    """HR's correction of a day: times with an offset (without one they are UTC)."""

    clock_in = serializers.DateTimeField(validators=[_plausible])
    clock_out = serializers.DateTimeField(
        allow_null=True, required=False, default=None, validators=[_plausible]
    )


class SyncRequestSerializer(serializers.Serializer):
    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=2**63 - 1),
        required=False,
        max_length=10000,
        help_text="Daily records to send again even if the CRM holds them; omitted, "
        "only what is due is sent.",
    )


class ProcessingResultSerializer(serializers.Serializer):
    mode = serializers.CharField()
    new_punches = serializers.IntegerField()
    groups_recomputed = serializers.IntegerField()
    punches_read = serializers.IntegerField()
    rows_created = serializers.IntegerField()
    rows_changed = serializers.IntegerField()
    rows_deleted = serializers.IntegerField()
    rows_voided = serializers.IntegerField()
    outliers = serializers.IntegerField()
    manual_flagged = serializers.IntegerField()
    seconds = serializers.FloatField()


class ChangesPageSerializer(serializers.Serializer):
    results = serializers.ListField(
        child=serializers.DictField(), help_text="Records in the CRM contract's shape."
    )
    next_cursor = serializers.CharField()
    has_more = serializers.BooleanField()
