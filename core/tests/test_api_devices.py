"""/api/devices/: CRUD with a write-only comm key, and the actions that talk to a
clock, queued or run inline, against the emulator over loopback."""

import datetime
import socket

import pytest
from django.utils import timezone

from core import ingest
from core.models import Device, Employee, RawAttendance
from core.tests.factories import DeviceFactory, RawAttendanceFactory
from core.zk.emulator import AttendanceRecord, DeviceState, UserRecord

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(api_as):
    return api_as(groups=["Operators"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def small_state() -> DeviceState:
    now = datetime.datetime.now().replace(microsecond=0)
    return DeviceState(
        users=[UserRecord(uid=1, user_id="1001", name="Ana")],
        attendance=[
            AttendanceRecord(user_id="1001", timestamp=now - datetime.timedelta(hours=h))
            for h in (1, 2, 3)
        ],
    )


# --- CRUD ----------------------------------------------------------------------------------


def test_the_comm_key_is_write_only_and_kept_when_omitted(operator):
    created = operator.post(
        "/api/devices/",
        {"name": "Door", "ip_address": "10.0.0.5", "comm_key": 1234, "timezone": "Europe/Lisbon"},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert "comm_key" not in body and body["comm_key_set"] is True
    url = f"/api/devices/{body['id']}/"
    assert "1234" not in operator.get(url).content.decode()
    assert operator.patch(url, {"port": 4371}, format="json").status_code == 200
    assert Device.objects.get().comm_key == 1234
    assert operator.patch(url, {"comm_key": 0}, format="json").json()["comm_key_set"] is False
    assert Device.objects.get().comm_key == 0
    assert "1234" not in operator.get("/api/schema/").content.decode()


@pytest.mark.parametrize(
    "body, named",
    [
        ({"name": "Door", "ip_address": "door.local"}, "ip_address"),
        ({"name": "Door", "ip_address": "10.0.0.5", "timezone": "Lisbon"}, "timezone"),
        ({"name": "Door", "ip_address": "10.0.0.5", "comm_key": 1_000_000}, "comm_key"),
        ({"name": "Door", "ip_address": "10.0.0.5", "port": 70000}, "port"),
        ({"ip_address": "10.0.0.5"}, "name"),
    ],
)
def test_a_bad_device_is_a_400_naming_the_field(operator, body, named):
    answer = operator.post("/api/devices/", body, format="json")
    assert answer.status_code == 400 and named in answer.json()
    assert not Device.objects.exists()


def test_a_device_with_punches_is_not_deleted_and_the_answer_says_why(operator):
    punch = RawAttendanceFactory()
    answer = operator.delete(f"/api/devices/{punch.device_id}/")
    assert answer.status_code == 400 and "disable it instead" in answer.json()["detail"]
    assert Device.objects.filter(pk=punch.device_id).exists()


def test_devices_filter_by_enabled_and_a_bad_value_is_a_400(operator):
    on, _off = DeviceFactory(enabled=True), DeviceFactory(enabled=False)
    listed = operator.get("/api/devices/", {"enabled": "true"}).json()["results"]
    assert [d["id"] for d in listed] == [on.pk]
    assert list(operator.get("/api/devices/", {"enabled": "sometimes"}).json()) == ["enabled"]


# --- Actions: queued -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, task, kwargs",
    [
        ("poll", "core.tasks.poll_device", {}),
        ("test", "core.tasks.test_device", {}),
        # A clock set is recorded in the audit log by the task, as this user's.
        ("sync_time", "core.tasks.sync_device_time", {"actor_id": "operator"}),
    ],
)
def test_an_action_queues_its_task_and_answers_202_with_the_task_id(
    operator, celery_sent, action, task, kwargs
):
    device = DeviceFactory()
    answer = operator.post(f"/api/devices/{device.pk}/{action}/")
    assert answer.status_code == 202
    kwargs = {name: operator.user.pk for name in kwargs}
    assert celery_sent == [(task, (device.pk,), kwargs, answer.json()["task_id"])]


def test_poll_all_queues_one_task(operator, celery_sent):
    answer = operator.post("/api/devices/poll_all/")
    assert answer.status_code == 202
    assert [name for name, *_ in celery_sent] == ["core.tasks.poll_all_devices"]


def test_a_bad_wait_value_is_a_400_and_queues_nothing(operator, celery_sent):
    device = DeviceFactory()
    answer = operator.post(f"/api/devices/{device.pk}/poll/?wait=perhaps")
    assert answer.status_code == 400 and list(answer.json()) == ["wait"]
    assert celery_sent == []


def test_an_action_on_an_unknown_device_is_a_404(operator, celery_sent):
    assert operator.post("/api/devices/999999/poll/").status_code == 404
    assert celery_sent == []


# --- Actions: run inline with ?wait=true --------------------------------------------------


def test_poll_with_wait_downloads_the_punches_and_answers_the_result(operator, zk_emulator):
    emulator = zk_emulator(small_state())
    device = DeviceFactory(port=emulator.port)
    answer = operator.post(f"/api/devices/{device.pk}/poll/?wait=true")
    assert answer.status_code == 200, answer.content
    assert answer.json()["ok"] and answer.json()["new"] == 3
    assert RawAttendance.objects.filter(device=device).count() == 3


def test_test_and_sync_time_with_wait_read_and_set_the_clock(operator, zk_emulator):
    emulator = zk_emulator(small_state(), clock_offset=-3600)
    device = DeviceFactory(port=emulator.port)
    report = operator.post(f"/api/devices/{device.pk}/test/?wait=true")
    assert report.status_code == 200
    assert report.json()["identity"]["serial_number"] == "EMU0001"
    assert report.json()["clock_drift_seconds"] < -3000
    synced = operator.post(f"/api/devices/{device.pk}/sync_time/?wait=true")
    assert synced.status_code == 200, synced.content
    drift = emulator.device_now() - timezone.now().replace(tzinfo=None)
    assert abs(drift.total_seconds()) < 5


def test_a_device_that_refuses_the_connection_gives_502_with_its_error(operator):
    device = DeviceFactory(port=free_port(), timeout_seconds=2)
    for action in ("poll", "test", "sync_time"):
        answer = operator.post(f"/api/devices/{device.pk}/{action}/?wait=true")
        assert answer.status_code == 502, action
        body = answer.json()
        assert "refused the connection" in (body.get("error") or body.get("detail"))


def test_a_device_that_does_not_answer_gives_504(operator, zk_emulator):
    emulator = zk_emulator(small_state(), silent=True)
    device = DeviceFactory(port=emulator.port, timeout_seconds=1)
    answer = operator.post(f"/api/devices/{device.pk}/test/?wait=true")
    assert answer.status_code == 504 and "did not answer within 1 s" in answer.json()["error"]
    answer = operator.post(f"/api/devices/{device.pk}/users/", {"user_id": "7"}, format="json")
    assert answer.status_code == 504
    answer = operator.get(f"/api/devices/{device.pk}/users/")
    assert answer.status_code == 504 and "did not answer" in answer.json()["detail"]


def test_actions_on_a_device_being_polled_answer_409_without_connecting(operator, zk_emulator):
    emulator = zk_emulator(small_state(), clock_offset=-3600)
    device = DeviceFactory(port=emulator.port)
    until = ingest.device_lease_claim(device_id=device.pk, lease=datetime.timedelta(minutes=5))
    busy = (
        "device busy: a poll is in progress (or another session with the device), try again in 30 s"
    )

    for action in ("poll", "test", "sync_time"):
        answer = operator.post(f"/api/devices/{device.pk}/{action}/?wait=true")
        assert answer.status_code == 409, action
        body = answer.json()
        assert (body.get("error") or body.get("detail")) == busy, action
        assert body.get("busy", True) is True
    answer = operator.get(f"/api/devices/{device.pk}/users/")
    assert answer.status_code == 409 and answer.json()["detail"] == busy
    answer = operator.post(f"/api/devices/{device.pk}/users/", {"user_id": "7"}, format="json")
    assert answer.status_code == 409 and answer.json()["detail"] == busy

    assert emulator.connects == 0
    assert not RawAttendance.objects.filter(device=device).exists()
    assert emulator.device_now() < datetime.datetime.now() - datetime.timedelta(minutes=59)
    ingest.device_lease_release(device_id=device.pk, until=until)
    answer = operator.post(f"/api/devices/{device.pk}/sync_time/?wait=true")
    assert answer.status_code == 200, answer.content
    assert emulator.connects == 1
    assert Device.objects.get(pk=device.pk).poll_lease_until is None


def test_poll_all_with_wait_answers_each_enabled_devices_result(operator, zk_emulator):
    # One enabled device: several are polled on threads, whose own database
    # connections cannot see a test's uncommitted rows.
    emulator = zk_emulator(small_state())
    good = DeviceFactory(port=emulator.port)
    DeviceFactory(enabled=False, port=free_port())
    answer = operator.post("/api/devices/poll_all/?wait=true")
    assert answer.status_code == 200
    (result,) = answer.json()
    assert result["device_id"] == good.pk and result["ok"] and result["new"] == 3
    assert Employee.objects.filter(user_id="1001").exists()


def test_the_browsable_api_never_shows_the_comm_key(operator):
    device = DeviceFactory(comm_key=987654)
    page = operator.get(f"/api/devices/{device.pk}/", HTTP_ACCEPT="text/html")
    assert page.status_code == 200 and "comm_key" in page.content.decode()
    assert "987654" not in page.content.decode()
