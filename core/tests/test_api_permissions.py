"""Who may call what on the REST API: each group, a view-only user and an anonymous
client against every endpoint and method (docs/permissions.md)."""

import datetime

import pytest
from auditlog.models import LogEntry
from django.contrib.auth.models import Group, Permission

from core.models import Device, DeviceCommand, Employee, ProcessedAttendance, RawAttendance
from core.tests.factories import DeviceFactory, EmployeeFactory, RawAttendanceFactory
from core.zk.emulator import DeviceState, UserRecord

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
TIMESHEET = "/api/reports/timesheet/"
ROLES = ("HR", "Operators", "CRM", "viewer", "anonymous")
READERS = {"HR", "Operators", "viewer"}
ATTENDANCE_READERS = {"HR", "Operators", "CRM", "viewer"}
EVERYONE = {"HR", "Operators", "CRM", "viewer"}
# core.view_timesheet is one of the view permissions the viewer holds.
TIMESHEET_READERS = {"HR", "viewer"}
AUDIT_LOG_READERS = {"HR", "Operators"}
# core.view_devicecommand, which HR does not hold.
COMMAND_READERS = {"Operators", "viewer"}
# A method the endpoint does not offer: 405 for anyone logged in, 401 for anonymous.
NOT_OFFERED = None


@pytest.fixture
def world(zk_emulator):
    state = DeviceState(users=[UserRecord(uid=1, user_id="1001", name="Ana")])
    emulator = zk_emulator(state)
    device = DeviceFactory(name="Front door", port=emulator.port)
    spare = DeviceFactory(name="Spare", ip_address="127.0.0.1", port=9)
    employee = EmployeeFactory(user_id="1001", name="Ana")
    punch = RawAttendanceFactory(device=device, user_id="1001")
    day = ProcessedAttendance.objects.create(
        user_id="1001",
        employee=employee,
        work_date=datetime.date(2026, 11, 2),
        clock_in=datetime.datetime(2026, 11, 2, 8, tzinfo=UTC),
        clock_out=datetime.datetime(2026, 11, 2, 17, tzinfo=UTC),
        clock_in_device=device,
        clock_out_device=device,
        punch_count=2,
        worked=datetime.timedelta(hours=9),
    )
    command = DeviceCommand.objects.create(device=device, command="INFO")
    return {
        "device": device,
        "spare": spare,
        "employee": employee,
        "punch": punch,
        "day": day,
        "command": command,
    }


def endpoints(w) -> list[tuple[str, str, dict | None, set[str]]]:
    """(method, url, body, the roles allowed)."""
    d, e, p, day = w["device"].pk, w["employee"].pk, w["punch"].pk, w["day"].pk
    commands = f"/api/devices/{d}/commands/"
    new_device = {"name": "New", "ip_address": "127.0.0.2", "timezone": "UTC"}
    correction = {"clock_in": "2026-11-02T07:30:00Z", "clock_out": "2026-11-02T16:00:00Z"}
    return [
        ("get", "/api/devices/", None, READERS),
        ("post", "/api/devices/", new_device, {"Operators"}),
        ("get", f"/api/devices/{d}/", None, READERS),
        ("patch", f"/api/devices/{d}/", {"name": "Front door B"}, {"Operators"}),
        (
            "put",
            f"/api/devices/{d}/",
            {"name": "Front door", "ip_address": "127.0.0.1", "port": w["device"].port},
            {"Operators"},
        ),
        ("delete", f"/api/devices/{w['spare'].pk}/", None, {"Operators"}),
        ("post", f"/api/devices/{d}/poll/", None, {"Operators"}),
        ("post", f"/api/devices/{d}/test/", None, {"Operators"}),
        ("post", f"/api/devices/{d}/sync_time/", None, {"Operators"}),
        ("post", "/api/devices/poll_all/", None, {"Operators"}),
        ("get", f"/api/devices/{d}/users/", None, {"Operators"}),
        ("post", f"/api/devices/{d}/users/", {"user_id": "1002", "name": "Bo"}, {"Operators"}),
        ("delete", f"/api/devices/{d}/users/1001/", None, {"Operators"}),
        (
            "post",
            f"/api/devices/{d}/users/import/",
            {"users": [{"user_id": "1003"}]},
            {"Operators"},
        ),
        ("get", commands, None, COMMAND_READERS),
        ("get", f"{commands}?state=queued", None, COMMAND_READERS),
        ("get", f"{commands}{w['command'].pk}/", None, COMMAND_READERS),
        ("options", commands, None, COMMAND_READERS),
        ("post", commands, {"command": "REBOOT"}, NOT_OFFERED),
        ("delete", f"{commands}{w['command'].pk}/", None, NOT_OFFERED),
        ("patch", f"{commands}{w['command'].pk}/", {"state": "done"}, NOT_OFFERED),
        ("get", "/api/employees/", None, READERS),
        ("get", f"/api/employees/{e}/", None, READERS),
        ("patch", f"/api/employees/{e}/", {"name": "Ana Maria"}, {"HR"}),
        ("post", "/api/employees/", {"user_id": "9"}, NOT_OFFERED),
        ("delete", f"/api/employees/{e}/", None, NOT_OFFERED),
        ("get", "/api/raw-attendance/", None, ATTENDANCE_READERS),
        ("get", f"/api/raw-attendance/{p}/", None, ATTENDANCE_READERS),
        ("delete", f"/api/raw-attendance/{p}/", None, NOT_OFFERED),
        ("get", "/api/processed-attendance/", None, ATTENDANCE_READERS),
        ("get", f"/api/processed-attendance/{day}/", None, ATTENDANCE_READERS),
        ("get", "/api/processed-attendance/unsynced/", None, ATTENDANCE_READERS),
        ("get", "/api/processed-attendance/outliers/", None, ATTENDANCE_READERS),
        ("get", "/api/processed-attendance/changes/", None, ATTENDANCE_READERS),
        ("patch", f"/api/processed-attendance/{day}/", correction, {"HR"}),
        ("post", "/api/processed-attendance/sync/", {"ids": [day]}, {"Operators"}),
        ("post", "/api/processed-attendance/process/", None, {"Operators"}),
        ("delete", f"/api/processed-attendance/{day}/", None, NOT_OFFERED),
        ("put", f"/api/processed-attendance/{day}/", correction, NOT_OFFERED),
        ("get", f"{TIMESHEET}?start_date=2026-11-01&end_date=2026-11-30", None, TIMESHEET_READERS),
        (
            "get",
            f"{TIMESHEET}?start_date=2026-11-01&end_date=2026-11-30&format=csv",
            None,
            TIMESHEET_READERS,
        ),
        ("options", TIMESHEET, None, TIMESHEET_READERS),
        ("post", TIMESHEET, {}, NOT_OFFERED),
        ("get", "/api/audit-log/", None, AUDIT_LOG_READERS),
        ("get", "/api/audit-log/?format=json&operation=attendance_edit", None, AUDIT_LOG_READERS),
        ("options", "/api/audit-log/", None, AUDIT_LOG_READERS),
        ("post", "/api/audit-log/", {}, NOT_OFFERED),
        ("delete", "/api/audit-log/", None, NOT_OFFERED),
        ("get", "/api/", None, EVERYONE),
        ("get", "/api/schema/", None, EVERYONE),
        ("get", "/api/docs/", None, EVERYONE),
        ("get", "/api/redoc/", None, EVERYONE),
    ]


def client_for(role, api_as):
    if role == "anonymous":
        return api_as(anonymous=True)
    if role == "viewer":
        views = Permission.objects.filter(
            content_type__app_label="core", codename__startswith="view_"
        )
        return api_as(perms=[f"core.{p.codename}" for p in views])
    return api_as(groups=[role])


@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_call_exactly_the_endpoints_its_permissions_allow(
    role, world, api_as, celery_sent
):
    client = client_for(role, api_as)
    wrong = []
    for method, url, body, allowed in endpoints(world):
        answer = getattr(client, method)(url, body, format="json")
        if role == "anonymous":
            expected_ok, fine = False, answer.status_code == 401
        elif allowed is NOT_OFFERED:
            expected_ok, fine = False, answer.status_code == 405
        elif role in allowed:
            expected_ok, fine = True, answer.status_code < 400
        else:
            expected_ok, fine = False, answer.status_code == 403
        if not fine:
            wrong.append(f"{method.upper()} {url}: {answer.status_code} (allowed: {expected_ok})")
    assert wrong == []
    # No method writes a command.
    assert list(DeviceCommand.objects.values_list("command", "state")) == [("INFO", "queued")]
    if role != "Operators":
        # Denied writes changed nothing and queued nothing.
        assert celery_sent == []
        assert Device.objects.count() == 2
        assert RawAttendance.objects.count() == 1
    if role not in ("Operators", "HR"):
        assert Employee.objects.get().name == "Ana"
        assert not ProcessedAttendance.objects.get().is_manual
    if role == "HR":
        assert Employee.objects.get().name == "Ana Maria"
        assert ProcessedAttendance.objects.get().edited_by == client.user
    # The audit log holds what this role's requests changed, and nothing else.
    recorded = set(
        LogEntry.objects.filter(actor__isnull=False).values_list(
            "additional_data__action", "action"
        )
    )
    assert recorded == RECORDED[role]


UPDATE, CREATE, DELETE = LogEntry.Action.UPDATE, LogEntry.Action.CREATE, LogEntry.Action.DELETE
RECORDED = {
    "HR": {(None, UPDATE), ("attendance_edit", UPDATE)},
    "Operators": {
        (None, CREATE),  # POST /api/devices/
        (None, UPDATE),  # PATCH, PUT
        (None, DELETE),
        ("crm_resend", UPDATE),
        ("device_user_add", UPDATE),
        ("device_user_remove", UPDATE),
        # The queued sync_time records when its task runs: not here.
    },
    "CRM": set(),
    "viewer": set(),
    "anonymous": set(),
}


def test_a_method_no_endpoint_offers_is_a_405_to_a_user_and_a_401_to_anonymous(world, api_as):
    superuser = api_as()
    superuser.user.is_superuser = True
    superuser.user.save()
    for url in ("/api/devices/", "/api/reports/timesheet/", "/api/audit-log/"):
        assert superuser.generic("TRACE", url).status_code == 405
        assert api_as(anonymous=True).generic("TRACE", url).status_code == 401


def test_the_groups_hold_the_permissions_the_docs_list():
    def perms(name):
        return set(Group.objects.get(name=name).permissions.values_list("codename", flat=True))

    assert {
        "change_processedattendance",
        "change_employee",
        "view_timesheet",
        "view_logentry",
    } <= perms("HR")
    assert not {"poll_device", "add_device", "resend_processedattendance"} & perms("HR")
    assert {
        "add_device",
        "poll_device",
        "test_device",
        "sync_device_clock",
        "manage_device_users",
        "process_processedattendance",
        "resend_processedattendance",
        "view_logentry",
        "resend_punchdelivery",
        "reset_failed_punchdelivery",
        "send_info_command",
        "send_reboot_command",
        "send_reupload_command",
        "view_devicecommand",
    } <= perms("Operators")
    assert not {"send_reboot_command", "resend_punchdelivery"} & perms("HR")
    assert "view_timesheet" not in perms("Operators")
    assert "change_processedattendance" not in perms("Operators")
    assert perms("CRM") == {"view_rawattendance", "view_processedattendance"}


def test_a_user_without_the_action_permission_is_told_which_one_is_missing(world, api_as):
    client = api_as(perms=["core.view_device"])
    answer = client.post(f"/api/devices/{world['device'].pk}/poll/")
    assert answer.status_code == 403
    assert "core.poll_device" in answer.json()["detail"]


def test_every_list_and_row_opens_in_the_browsable_api(world, api_as):
    superuser = api_as()
    superuser.user.is_superuser = True
    superuser.user.save()
    broken = []
    for method, url, _body, _allowed in endpoints(world):
        if method != "get" or url.startswith(("/api/schema/", "/api/docs/", "/api/redoc/")):
            continue
        if "format=" in url:  # asks for another format than the page
            continue
        page = superuser.get(url, HTTP_ACCEPT="text/html")
        if page.status_code != 200 or b"<html" not in page.content:
            broken.append(f"{url}: {page.status_code}")
    assert broken == []
