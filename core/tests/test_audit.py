"""The audit log (core.audit): what people change in the admin is recorded with
who, when, and the values before and after; processing's own writes are not."""

import datetime
import io

import pytest
from auditlog.models import LogEntry
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from core.adms import command_shown
from core.audit import AuditEntry, audit_changes, audit_record
from core.crm import crm_resend
from core.models import Device, DeviceCommand, ProcessedAttendance, RawAttendance
from core.processing import attendance_edit, attendance_process
from core.tests.factories import DeviceFactory, EmployeeFactory, RawAttendanceFactory
from core.zk.emulator import DeviceState

pytestmark = pytest.mark.django_db

UTC = datetime.UTC


@pytest.fixture
def login(client, django_user_model):
    """`login("core.view_device", ...)`: a staff user with exactly these permissions."""

    def make(*perms: str, username: str = "hr"):
        user = django_user_model.objects.create_user(username, is_staff=True)
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        client.force_login(user)
        return user

    return make


@pytest.fixture
def worked_day():
    """A day processed from two punches, 08:00 to 17:00 UTC."""
    device = DeviceFactory(name="Front door")
    for hour in (8, 17):
        RawAttendanceFactory(
            device=device,
            user_id="1001",
            timestamp=datetime.datetime(2026, 11, 2, hour, tzinfo=UTC),
        )
    attendance_process(full=True)
    clear_log()
    return ProcessedAttendance.objects.get()


def clear_log():
    """Forgets the entries the test's setup wrote (factories create devices)."""
    LogEntry.objects.all().delete()


def entries(operation: str | None = None):
    found = LogEntry.objects.order_by("id")
    if operation is not None:
        found = found.filter(additional_data__action=operation)
    return list(found)


def post_action(client, model: str, action: str, ids, **extra):
    return client.post(
        reverse(f"admin:core_{model}_changelist"),
        {"action": action, "index": 0, "_selected_action": list(ids), **extra},
        follow=True,
    )


# --- HR corrections and reviews in the admin ---------------------------------------------


def test_an_hr_correction_in_the_admin_is_recorded_with_who_and_the_times_before_and_after(
    client, login, worked_day
):
    hr = login("core.view_processedattendance", "core.change_processedattendance")
    response = client.post(
        reverse("admin:core_processedattendance_change", args=[worked_day.pk]),
        {
            "clock_in_0": "2026-11-02",
            "clock_in_1": "07:30:00",
            "clock_out_0": "2026-11-02",
            "clock_out_1": "17:00:00",
        },
        REMOTE_ADDR="127.0.0.7",
    )
    assert response.status_code == 302

    [entry] = entries("attendance_edit")
    assert entry.actor == hr
    assert entry.remote_addr == "127.0.0.7"
    assert entry.content_type.model == "processedattendance"
    assert entry.object_pk == str(worked_day.pk)
    assert entry.object_repr == "1001 on 2026-11-02"
    assert entry.changes["clock_in"] == ["2026-11-02T08:00:00+00:00", "2026-11-02T07:30:00+00:00"]
    assert entry.changes["worked"] == ["9:00:00", "9:30:00"]
    assert entry.changes["is_manual"] == [False, True]
    assert entry.changes["edited_by"] == [None, hr.pk]
    assert entry.changes["version"] == [1, 2]
    assert "clock_out" not in entry.changes  # unchanged


def test_marking_days_reviewed_and_discarding_edits_are_recorded(client, login, worked_day):
    hr = login("core.view_processedattendance", "core.change_processedattendance")
    attendance_edit(
        record_id=worked_day.pk,
        clock_in=worked_day.clock_in - datetime.timedelta(hours=1),
        clock_out=worked_day.clock_out,
        user=hr,
    )
    post_action(client, "processedattendance", "mark_reviewed", [worked_day.pk])
    post_action(client, "processedattendance", "discard_edits", [worked_day.pk])

    [reviewed] = entries("attendance_mark_reviewed")
    assert reviewed.actor == hr
    assert reviewed.changes["reviewed_by"] == [None, hr.pk]
    [discarded] = entries("attendance_discard_edits")
    assert discarded.actor == hr
    assert discarded.changes["is_manual"] == [True, False]
    assert discarded.changes["clock_in"] == [
        "2026-11-02T07:00:00+00:00",
        "2026-11-02T08:00:00+00:00",
    ]


def test_resend_records_each_day_and_reset_failed_only_the_days_it_changed(
    client, login, worked_day
):
    hr = login(
        "core.view_processedattendance",
        "core.resend_processedattendance",
        "core.reset_failed_processedattendance",
    )
    ProcessedAttendance.objects.filter(pk=worked_day.pk).update(sync_state="synced")

    post_action(client, "processedattendance", "resend", [worked_day.pk])
    post_action(client, "processedattendance", "reset_failed", [worked_day.pk])

    [resent] = entries("crm_resend")
    assert resent.actor == hr
    assert resent.changes["sync_state"] == ["synced", "pending"]
    assert resent.changes["resend_count"] == [0, 1]
    # The day had not failed: reset_failed left it alone, and so records nothing.
    assert entries("crm_reset_failed") == []


# --- Operators: verdicts, devices, clocks ------------------------------------------------


def test_a_verdict_on_punches_is_recorded_once_and_judging_again_the_same_way_adds_nothing(
    client, login
):
    operator = login("core.view_rawattendance", "core.judge_punch", username="op")
    punch = RawAttendanceFactory(user_id="1001")
    clear_log()
    for _ in range(2):
        post_action(
            client, "rawattendance", "mark_suspect", [punch.pk], apply="yes", reason="badge lent"
        )

    [entry] = entries("punches_judge")
    assert entry.actor == operator
    assert entry.content_type.model == "rawattendance"
    assert entry.changes["is_suspect"] == [False, True]
    assert entry.changes["suspect_override"] == [None, True]
    assert entry.changes["suspect_reason"] == ["", "marked suspect by op: badge lent"]
    assert RawAttendance.objects.get().is_suspect


def test_devices_created_changed_and_deleted_in_the_admin_are_recorded_without_the_comm_key(
    client, login
):
    operator = login(
        "core.view_device", "core.add_device", "core.change_device", "core.delete_device"
    )
    form = {
        "name": "Dock",
        "ip_address": "127.0.0.1",
        "port": "4370",
        "protocol": "tcp",
        "comm_key": "482913",
        "timeout_seconds": "5",
        "timezone": "UTC",
        "encoding": "utf-8",
        "enabled": "on",
    }
    assert client.post(reverse("admin:core_device_add"), form).status_code == 302
    device = Device.objects.get()
    changed = {**form, "port": "4371", "comm_key": "771100"}
    assert (
        client.post(reverse("admin:core_device_change", args=[device.pk]), changed).status_code
        == 302
    )
    assert (
        client.post(
            reverse("admin:core_device_delete", args=[device.pk]), {"post": "yes"}
        ).status_code
        == 302
    )

    created, updated, deleted = entries()
    assert [e.action for e in (created, updated, deleted)] == [
        LogEntry.Action.CREATE,
        LogEntry.Action.UPDATE,
        LogEntry.Action.DELETE,
    ]
    assert {e.actor for e in (created, updated, deleted)} == {operator}
    assert updated.changes["port"] == [4370, 4371]
    assert updated.changes["comm_key"] == ["set", "set"]
    for entry in (created, updated, deleted):
        text = str(entry.changes) + str(entry.serialized_data)
        assert "482913" not in text and "771100" not in text


def test_a_clock_set_from_the_admin_is_recorded(client, login, zk_emulator):
    operator = login("core.view_device", "core.sync_device_clock")
    emu = zk_emulator(DeviceState.generate(users=1, punches=1, days=7, seed=2), clock_offset=-7200)
    device = DeviceFactory(
        name="Dock", ip_address=emu.host, port=emu.port, clock_drift_seconds=-7200.0
    )
    clear_log()
    post_action(client, "device", "sync_clock", [device.pk])

    [entry] = entries("device_sync_time")
    assert entry.actor == operator
    assert entry.object_pk == str(device.pk)
    before, after = entry.changes["clock_drift_seconds"]
    assert before == -7200.0 and abs(after) < 5
    assert entry.changes["clock"][0] is None
    assert entry.additional_data["timezone"] == "UTC"


# --- Commands queued for pushing clocks (core.adms) ------------------------------------------


def pushing_clock(name: str, serial: str) -> Device:
    return DeviceFactory(
        name=name,
        ip_address=None,
        serial_number=serial,
        first_seen_at=timezone.now(),
        last_seen_at=timezone.now(),
    )


def inserts_into_the_log(queries) -> int:
    return sum(q["sql"].startswith('INSERT INTO "auditlog_logentry"') for q in queries)


def assert_commands_recorded(actor) -> list:
    """Each queued command has one device_command entry by `actor`, naming
    its device, the line and the command's id; returns the entries."""
    commands = list(DeviceCommand.objects.order_by("pk"))
    found = entries("device_command")
    assert commands and len(found) == len(commands)
    for command, entry in zip(commands, found, strict=True):
        assert entry.actor == actor
        assert (entry.object_pk, entry.object_repr) == (str(command.device_id), command.device.name)
        assert entry.changes == {"command": [None, command_shown(command.command)]}
        assert entry.additional_data == {"action": "device_command", "command_id": command.pk}
    return found


DEVICE_COMMANDS = [
    ("refresh_info", "core.send_info_command", {}),
    ("reread_options", "core.send_check_command", {}),
    ("reboot", "core.send_reboot_command", {}),
    ("reupload", "core.send_reupload_command", {"start": "2026-11-01", "end": "2026-11-02"}),
]


@pytest.mark.parametrize(("action", "perm", "form"), DEVICE_COMMANDS)
def test_a_push_device_action_records_each_command_it_queued_in_one_statement(
    client, login, action, perm, form
):
    gate, dock = pushing_clock("Gate", "SIM0001"), pushing_clock("Dock", "SIM0002")
    ids = [gate.pk, dock.pk]
    extra = {**form, "apply": "yes"} if form else {}
    login("core.view_device", username="viewer")
    post_action(client, "device", action, ids, **extra)
    assert not DeviceCommand.objects.exists() and entries("device_command") == []

    operator = login("core.view_device", perm, username="ops")
    with CaptureQueriesContext(connection) as queries:
        post_action(client, "device", action, ids, **extra)
    assert DeviceCommand.objects.count() == 2
    assert_commands_recorded(operator)
    assert inserts_into_the_log(queries) == 1


@pytest.mark.parametrize("action", ["send_to_clocks", "delete_from_clocks"])
def test_a_push_employee_action_records_each_user_command_it_queued_in_one_statement(
    client, login, action
):
    gate, dock = pushing_clock("Gate", "SIM0001"), pushing_clock("Dock", "SIM0002")
    employees = [EmployeeFactory(user_id="1001"), EmployeeFactory(user_id="1002")]
    for employee in employees:
        employee.devices.add(gate, dock)
    clear_log()
    ids = [e.pk for e in employees]
    login("core.view_employee", "core.change_employee", username="viewer")
    post_action(client, "employee", action, ids)
    assert not DeviceCommand.objects.exists() and entries("device_command") == []

    operator = login("core.view_employee", "core.manage_device_users", username="ops")
    with CaptureQueriesContext(connection) as queries:
        post_action(client, "employee", action, ids)
    assert DeviceCommand.objects.count() == 4
    found = assert_commands_recorded(operator)
    assert "PIN=1002" in found[-1].changes["command"][1]
    assert inserts_into_the_log(queries) == 1


def test_device_command_records_the_command_it_queued_without_a_user():
    pushing_clock("Gate", "SIM0001")
    DeviceFactory(name="Polled")
    clear_log()
    with pytest.raises(CommandError):
        call_command("device_command", "Polled", "reboot")
    assert entries("device_command") == []

    call_command("device_command", "Gate", "reboot", stdout=io.StringIO())
    call_command(
        "device_command",
        "SIM0001",
        "user-update",
        "--user-id",
        "1001",
        "--name",
        "Ana",
        stdout=io.StringIO(),
    )
    reboot, update = assert_commands_recorded(None)
    assert reboot.changes["command"] == [None, "REBOOT"]
    assert update.changes["command"][1].startswith("DATA UPDATE USERINFO PIN=1001\tName=Ana\t")


def test_an_employee_changed_in_the_admin_is_recorded(client, login):
    hr = login("core.view_employee", "core.change_employee")
    employee = EmployeeFactory(user_id="1001", name="Ann")
    clear_log()
    response = client.post(
        reverse("admin:core_employee_change", args=[employee.pk]),
        {
            "user_id": "1001",
            "name": "Ann Lee",
            "card": "0",
            "privilege": "0",
            "work_start_time": "06:00",
            "work_end_time": "",
        },
    )
    assert response.status_code == 302
    [entry] = entries()
    assert entry.actor == hr
    assert entry.changes["name"] == ["Ann", "Ann Lee"]
    assert entry.changes["work_start_time"] == [None, "06:00:00"]


# --- What is not recorded, and the service API itself -----------------------------------


def test_processing_runs_record_nothing(worked_day):
    RawAttendanceFactory(
        device=Device.objects.get(),
        user_id="1001",
        timestamp=datetime.datetime(2026, 11, 2, 18, tzinfo=UTC),
    )
    attendance_process(full=True)
    assert ProcessedAttendance.objects.get().version == 2
    assert entries() == []


def observed_facts(device: Device) -> dict:
    """A new value for each of Device.OBSERVED_FIELDS, of the field's type."""
    moment = datetime.datetime(2026, 11, 2, 9, tzinfo=UTC)
    by_type = {
        "CharField": "ZK-2",
        "TextField": "timed out",
        "PositiveIntegerField": 7,
        "FloatField": 1.5,
        "DateTimeField": moment,
    }
    facts = {}
    for name in Device.OBSERVED_FIELDS:
        value = by_type[device._meta.get_field(name).get_internal_type()]
        assert getattr(device, name) != value
        facts[name] = value
    return facts


def test_a_save_of_the_facts_a_poll_observes_records_nothing(worked_day):
    device = Device.objects.get()
    before = {name: getattr(device, name) for name in Device.OBSERVED_FIELDS}
    for name, value in observed_facts(device).items():
        setattr(device, name, value)
    device.save(update_fields=Device.OBSERVED_FIELDS)
    assert entries() == []

    # Back to the facts before, with a field a person sets: recorded, that field only.
    for name, value in before.items():
        setattr(device, name, value)
    device.name = "Back door"
    device.save()
    [entry] = entries()
    assert set(entry.changes) == {"name"}


def test_a_failing_change_records_nothing(worked_day, django_user_model):
    hr = django_user_model.objects.create_user("hr")
    with pytest.raises(ValueError):
        with audit_changes(actor=hr, action="attendance_edit", ids=[worked_day.pk]):
            attendance_edit(
                record_id=worked_day.pk,
                clock_in=worked_day.clock_out,
                clock_out=worked_day.clock_in,
                user=hr,
            )
    assert entries() == []


def test_audit_changes_reads_before_and_after_in_two_queries_per_chunk_and_writes_in_bulk(
    worked_day, django_user_model, django_assert_num_queries
):
    hr = django_user_model.objects.create_user("hr")
    ids = [worked_day.pk]
    # ContentType is cached after its first use.
    audit_record(actor=hr, action="warm", model=ProcessedAttendance, entries=[])
    # A savepoint, before, the UPDATE, after, one INSERT, the savepoint's release.
    with django_assert_num_queries(6):
        with audit_changes(actor=hr, action="crm_resend", ids=ids) as ids:
            crm_resend(ids=ids)
    assert len(entries("crm_resend")) == 1


def test_audit_record_writes_a_command_without_an_actor_outside_a_request(worked_day):
    device = Device.objects.get()
    audit_record(
        actor=None,
        action="device_clear_log",
        model=Device,
        entries=[AuditEntry.of(device, {"record_count": [2, 0]})],
    )
    [entry] = entries("device_clear_log")
    assert entry.actor is None
    assert entry.changes == {"record_count": [2, 0]}
    assert entry.object_repr == "Front door"


# --- The log in the admin: read-only ----------------------------------------------------


def test_the_log_is_read_only_in_the_admin_for_a_user_who_may_view_it(client, login, worked_day):
    audit_record(
        actor=None,
        action="device_clear_log",
        model=Device,
        entries=[AuditEntry.of(Device.objects.get(), {"record_count": [2, 0]})],
    )
    entry = LogEntry.objects.get()
    login("auditlog.view_logentry")

    page = client.get(reverse("admin:auditlog_logentry_changelist"))
    assert page.status_code == 200
    assert "device_clear_log" in page.content.decode()
    detail = client.get(reverse("admin:auditlog_logentry_change", args=[entry.pk]))
    assert detail.status_code == 200
    assert 'name="_save"' not in detail.content.decode()
    assert (
        client.post(reverse("admin:auditlog_logentry_change", args=[entry.pk]), {}).status_code
        == 403
    )
    delete = reverse("admin:auditlog_logentry_delete", args=[entry.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    assert LogEntry.objects.count() == 1


def test_the_log_is_not_shown_to_a_user_without_its_permission(client, login):
    login("core.view_device")
    assert client.get(reverse("admin:auditlog_logentry_changelist")).status_code == 403
