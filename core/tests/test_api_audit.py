"""The audit log records every change a person makes through the REST API, with
the token's or JWT's user as the actor, and shows it at /api/audit-log/.

Requests carry a real token or JWT (not a forced login), so they pass every
middleware as a client's would: DRF authenticates them inside the view, after
the audit log's middleware ran (core.audit.AuditActorMiddleware). Clocks are
the project's emulator on a loopback port.
"""

import datetime
import json

import pytest
from auditlog.models import LogEntry
from django.contrib.auth.models import Group, Permission
from django.utils import timezone
from rest_framework.test import APIClient

from core import tasks
from core.adms import command_shown
from core.models import Device, DeviceCommand, ProcessedAttendance
from core.processing import attendance_process
from core.tests.factories import DeviceFactory, EmployeeFactory, RawAttendanceFactory
from core.tests.test_api_device_users import Source
from core.zk.emulator import DeviceState, UserRecord

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
PASSWORD = "s3cret-pass"


def person(django_user_model, username: str, group: str):
    user = django_user_model.objects.create_user(username, password=PASSWORD)
    user.groups.add(Group.objects.get(name=group))
    return user


def with_token(user) -> APIClient:
    client = APIClient()
    answer = client.post(
        "/api/auth/token/", {"username": user.username, "password": PASSWORD}, format="json"
    )
    client.credentials(HTTP_AUTHORIZATION=f"Token {answer.json()['token']}")
    return client


def with_jwt(user) -> APIClient:
    client = APIClient()
    answer = client.post(
        "/api/auth/jwt/", {"username": user.username, "password": PASSWORD}, format="json"
    )
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {answer.json()['access']}")
    return client


@pytest.fixture
def hr(django_user_model):
    return person(django_user_model, "hanna", "HR")


@pytest.fixture
def operator(django_user_model):
    return person(django_user_model, "otto", "Operators")


def audit_log(client, **params) -> list[dict]:
    answer = client.get("/api/audit-log/", params)
    assert answer.status_code == 200, answer.content
    return answer.json()["results"]


@pytest.fixture
def worked_day():
    device = DeviceFactory(name="Front door")
    for hour in (8, 17):
        RawAttendanceFactory(
            device=device,
            user_id="1001",
            timestamp=datetime.datetime(2026, 11, 2, hour, tzinfo=UTC),
        )
    attendance_process(full=True)
    LogEntry.objects.all().delete()
    return ProcessedAttendance.objects.get()


# --- Daily records ------------------------------------------------------------------------


def test_an_hr_correction_with_a_token_is_in_the_audit_log_with_hr_and_the_times_before_and_after(
    hr, worked_day
):
    client = with_token(hr)
    answer = client.patch(
        f"/api/processed-attendance/{worked_day.pk}/",
        {"clock_in": "2026-11-02T08:00:00Z", "clock_out": "2026-11-02T18:15:00Z"},
        format="json",
    )
    assert answer.status_code == 200, answer.content

    [entry] = audit_log(client, operation="attendance_edit")
    assert (entry["actor"], entry["actor_id"]) == ("hanna", hr.pk)
    assert entry["model"] == "core.processedattendance"
    assert entry["object_pk"] == str(worked_day.pk)
    assert entry["object_repr"] == "1001 on 2026-11-02"
    assert entry["changes"]["clock_out"] == [
        "2026-11-02T17:00:00+00:00",
        "2026-11-02T18:15:00+00:00",
    ]
    assert entry["changes"]["is_manual"] == [False, True]
    assert entry["changes"]["edited_by"] == [None, hr.pk]


def test_a_refused_correction_records_nothing(hr, worked_day):
    client = with_jwt(hr)
    answer = client.patch(
        f"/api/processed-attendance/{worked_day.pk}/",
        {"clock_in": "2026-11-02T18:00:00Z", "clock_out": "2026-11-02T08:00:00Z"},
        format="json",
    )
    assert answer.status_code == 400
    assert LogEntry.objects.count() == 0


def test_a_resend_through_the_api_records_each_day_made_due_again_by_the_operator(
    operator, worked_day, celery_sent
):
    ProcessedAttendance.objects.filter(pk=worked_day.pk).update(sync_state="synced")
    client = with_jwt(operator)
    answer = client.post("/api/processed-attendance/sync/", {"ids": [worked_day.pk]}, format="json")
    assert answer.status_code == 202
    assert [name for name, *_ in celery_sent] == ["core.tasks.sync_to_crm"]

    [entry] = audit_log(client, operation="crm_resend")
    assert entry["actor"] == "otto"
    assert entry["object_pk"] == str(worked_day.pk)
    assert entry["changes"]["sync_state"] == ["synced", "pending"]
    assert entry["changes"]["resend_count"] == [0, 1]


def test_a_sync_without_ids_changes_no_day_and_records_nothing(operator, worked_day, celery_sent):
    answer = with_token(operator).post("/api/processed-attendance/sync/", {}, format="json")
    assert answer.status_code == 202
    assert LogEntry.objects.count() == 0


# --- Devices and employees: auditlog's signals -----------------------------------------------


def test_devices_created_changed_and_deleted_with_a_token_or_jwt_are_recorded_as_their_user(
    operator, django_user_model
):
    other = person(django_user_model, "olga", "Operators")
    created = with_token(operator).post(
        "/api/devices/",
        {"name": "Dock", "ip_address": "127.0.0.1", "port": 4370, "comm_key": 1234},
        format="json",
    )
    assert created.status_code == 201, created.content
    pk = created.json()["id"]
    changed = with_jwt(other).patch(f"/api/devices/{pk}/", {"name": "Dock 2"}, format="json")
    assert changed.status_code == 200
    assert with_token(operator).delete(f"/api/devices/{pk}/").status_code == 204

    entries = audit_log(with_token(operator), model="core.device", object_pk=pk)
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("delete", "otto"),
        ("update", "olga"),
        ("create", "otto"),
    ]
    assert entries[1]["changes"]["name"] == ["Dock", "Dock 2"]
    # The comm key shows only as set, never its digits.
    assert entries[2]["changes"]["comm_key"][1] == "set"
    assert "1234" not in json.dumps(entries)


def test_an_employee_renamed_by_hr_through_the_api_is_recorded(hr):
    employee = EmployeeFactory(user_id="1001", name="Ana")
    client = with_jwt(hr)
    answer = client.patch(f"/api/employees/{employee.pk}/", {"name": "Ana Maria"}, format="json")
    assert answer.status_code == 200
    [entry] = audit_log(client, model="core.employee", action="update")
    assert (entry["action"], entry["actor"]) == ("update", "hanna")
    assert entry["changes"]["name"] == ["Ana", "Ana Maria"]


# --- Commands sent to a clock ---------------------------------------------------------------


@pytest.fixture
def clock(zk_emulator):
    """(emulator, device): a clock holding user 1001 (uid 1, Ana, with a password)."""
    state = DeviceState(users=[UserRecord(uid=1, user_id="1001", name="Ana", password="123")])
    emulator = zk_emulator(state)
    return emulator, DeviceFactory(name="Front door", port=emulator.port)


def test_a_user_added_updated_and_removed_on_a_clock_is_recorded_each_time(operator, clock):
    emulator, device = clock
    client = with_token(operator)
    url = f"/api/devices/{device.pk}/users/"
    assert client.post(url, {"user_id": "2001", "name": "Bo"}, format="json").status_code == 201
    # Saved again as it is: nothing is written to the clock, nothing recorded.
    assert client.post(url, {"user_id": "2001", "name": "Bo"}, format="json").status_code == 200
    renamed = client.post(
        url, {"user_id": "2001", "name": "Bo Li", "password": "42"}, format="json"
    )
    assert renamed.status_code == 200
    assert client.delete(f"{url}2001/").status_code == 204

    entries = [e for e in audit_log(client, model="core.device") if e["operation"]]
    removed, updated, added = entries
    assert {e["actor"] for e in (removed, updated, added)} == {"otto"}
    assert {e["object_repr"] for e in (removed, updated, added)} == {"Front door"}
    assert added["operation"] == "device_user_add"
    assert added["changes"]["user_id"] == [None, "2001"]
    assert added["changes"]["name"] == [None, "Bo"]
    assert added["changes"]["uid"] == [None, 2]
    assert updated["operation"] == "device_user_add"
    assert updated["changes"] == {"name": ["Bo", "Bo Li"], "password": ["not set", "set"]}
    assert removed["operation"] == "device_user_remove"
    assert removed["changes"]["user_id"] == ["2001", None]
    assert removed["changes"]["name"] == ["Bo Li", None]
    assert removed["changes"]["password"] == ["set", None]


def test_a_delete_of_a_user_not_on_the_clock_records_nothing(operator, clock):
    _, device = clock
    assert with_token(operator).delete(f"/api/devices/{device.pk}/users/9999/").status_code == 404
    assert LogEntry.objects.filter(additional_data__action="device_user_remove").count() == 0


def test_an_import_records_each_user_it_wrote_and_not_those_it_left_as_they_were(operator, clock):
    _, device = clock
    client = with_jwt(operator)
    users = [
        {"user_id": "1001", "name": "Ana", "password": "123"},  # as on the clock
        {"user_id": "3001", "name": "Cy"},
        {"user_id": "3002", "name": "Di"},
    ]
    answer = client.post(f"/api/devices/{device.pk}/users/import/", {"users": users}, format="json")
    assert answer.json() == {"added": 2, "updated": 0, "unchanged": 1}
    entries = audit_log(client, operation="device_user_add")
    assert sorted(e["changes"]["user_id"][1] for e in entries) == ["3001", "3002"]
    assert {e["actor"] for e in entries} == {"otto"}


@pytest.fixture
def source(settings):
    settings.USER_IMPORT_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.USER_IMPORT_TIMEOUT_SECONDS = 1
    served = Source()
    yield served
    served.stop()


def test_an_import_from_a_url_records_the_url_with_each_user(operator, clock, source):
    _, device = clock
    source.answer = (200, json.dumps([{"user_id": "6001", "name": "Gil"}]).encode(), 0)
    answer = with_token(operator).post(
        f"/api/devices/{device.pk}/users/import/", {"url": source.url}, format="json"
    )
    assert answer.status_code == 200, answer.content
    [entry] = LogEntry.objects.filter(additional_data__action="device_user_add")
    assert entry.actor == operator
    assert entry.additional_data == {"action": "device_user_add", "source": source.url}
    assert entry.changes["name"] == [None, "Gil"]


@pytest.fixture
def pushing():
    """An approved clock that pushes, knowing user 1001 from its uploads."""
    device = DeviceFactory(
        name="Gate",
        ip_address=None,
        serial_number="PUSH0001",
        first_seen_at=timezone.now(),
        last_seen_at=timezone.now(),
    )
    EmployeeFactory(user_id="1001", name="Ana").devices.add(device)
    LogEntry.objects.all().delete()
    return device


PUSH_WRITES = [
    ("post", "", {"user_id": "2001", "name": "Bo", "password": "4321"}, "device_user_add"),
    ("delete", "1001/", None, "device_user_remove"),
    (
        "post",
        "import/",
        {"users": [{"user_id": "2001", "name": "Bo", "password": "4321"}]},
        "device_user_add",
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "operation"), PUSH_WRITES)
def test_a_user_command_queued_for_a_pushing_clock_is_recorded_with_its_line_masked(
    django_user_model, operator, pushing, method, path, body, operation
):
    url = f"/api/devices/{pushing.pk}/users/{path}"
    viewer = django_user_model.objects.create_user("vera", password=PASSWORD)
    viewer.user_permissions.add(Permission.objects.get(codename="view_device"))
    refused = getattr(with_token(viewer), method)(url, body, format="json")
    assert refused.status_code == 403
    assert not LogEntry.objects.exists()

    client = with_token(operator)
    answer = getattr(client, method)(url, body, format="json")
    assert answer.status_code == 202, answer.content
    [command_id] = answer.json()["command_ids"]
    command = DeviceCommand.objects.get(pk=command_id)
    [entry] = audit_log(client, operation=operation)
    assert (entry["actor"], entry["object_pk"]) == ("otto", str(pushing.pk))
    assert entry["changes"]["command"] == [None, command_shown(command.command)]
    assert entry["command_id"] == command_id
    # The password reached the clock's command, never the log.
    assert "4321" not in json.dumps(entry)
    if body and "4321" in json.dumps(body):
        assert "Passwd=4321" in command.command
        assert "Passwd=***" in entry["changes"]["command"][1]


def test_a_clock_set_with_wait_is_recorded_as_the_operators(operator, clock):
    _, device = clock
    client = with_token(operator)
    answer = client.post(f"/api/devices/{device.pk}/sync_time/?wait=true")
    assert answer.status_code == 200, answer.content
    [entry] = audit_log(client, operation="device_sync_time")
    assert (entry["actor"], entry["object_pk"]) == ("otto", str(device.pk))
    assert entry["changes"]["clock"] == [None, answer.json()["set_to"]]


def test_a_queued_clock_set_is_recorded_by_its_task_as_the_user_who_asked(
    operator, clock, celery_sent
):
    _, device = clock
    client = with_jwt(operator)
    answer = client.post(f"/api/devices/{device.pk}/sync_time/")
    assert answer.status_code == 202
    # Nothing is sent to the clock yet, so nothing is recorded yet.
    assert audit_log(client, operation="device_sync_time") == []
    [(name, args, kwargs, _)] = celery_sent
    assert name == "core.tasks.sync_device_time"

    result = tasks.sync_device_time.apply(args=args, kwargs=kwargs).get()

    [entry] = audit_log(client, operation="device_sync_time")
    assert entry["actor"] == "otto"
    assert entry["changes"]["clock"] == [None, result["set_to"]]


def test_a_clock_set_that_fails_records_nothing(operator):
    device = DeviceFactory(ip_address="127.0.0.1", port=9, timeout_seconds=1)
    answer = with_token(operator).post(f"/api/devices/{device.pk}/sync_time/?wait=true")
    assert answer.status_code in (502, 504)
    assert not LogEntry.objects.filter(additional_data__action="device_sync_time").exists()
    assert Device.objects.filter(pk=device.pk).exists()
