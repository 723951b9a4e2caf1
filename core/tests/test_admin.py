"""The admin pages HR uses for devices, employees and raw punches."""

import datetime

import pytest
from django.urls import reverse

from core.models import RawAttendance
from core.tests.factories import DeviceFactory, EmployeeFactory, RawAttendanceFactory
from core.zk.emulator import DeviceState

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, django_user_model):
    user = django_user_model.objects.create_superuser("hr", "hr@example.com", "pw")
    client.force_login(user)
    return client


def test_device_list_shows_health_log_fill_and_last_error(admin_client):
    DeviceFactory(
        name="Front door",
        last_poll_at=datetime.datetime(2026, 11, 2, 8, 0, tzinfo=datetime.UTC),
        consecutive_failures=3,
        last_error="10.0.0.5:4370 (TCP) did not answer within 30 s",
        record_count=45_000,
        record_capacity=100_000,
    )
    page = admin_client.get(reverse("admin:core_device_changelist")).content.decode()
    assert "Front door" in page
    assert "failing (3)" in page
    assert "45.0%" in page
    assert "did not answer within 30 s" in page


def test_device_form_masks_the_comm_key(admin_client):
    device = DeviceFactory(comm_key=123456)
    page = admin_client.get(reverse("admin:core_device_change", args=[device.pk])).content
    assert b'type="password" name="comm_key"' in page


def test_poll_now_action_polls_the_device_and_reports(admin_client, zk_emulator):
    emu = zk_emulator(DeviceState.generate(users=3, punches=40, days=5, seed=2))
    device = DeviceFactory(name="Lobby", ip_address=emu.host, port=emu.port)
    response = admin_client.post(
        reverse("admin:core_device_changelist"),
        {"action": "poll_now", "_selected_action": [device.pk]},
        follow=True,
    )
    assert "Lobby: 40 new, 0 duplicate" in response.content.decode()
    assert RawAttendance.objects.filter(device=device).count() == 40


def test_poll_now_action_shows_a_names_warning_as_a_warning(admin_client, zk_emulator):
    state = DeviceState.generate(users=2, punches=4, days=5, seed=2)
    state.users[0].name = "Иван"
    emu = zk_emulator(state, encoding="cp1251")
    device = DeviceFactory(name="Kyiv", ip_address=emu.host, port=emu.port, encoding="utf-8")
    response = admin_client.post(
        reverse("admin:core_device_changelist"),
        {"action": "poll_now", "_selected_action": [device.pk]},
        follow=True,
    )
    (message,) = list(response.context["messages"])
    assert message.level_tag == "warning"
    assert "1 user name(s) are not valid utf-8" in message.message


def test_test_connection_action_reports_an_unreachable_device(admin_client):
    device = DeviceFactory(name="Gone", port=1, timeout_seconds=1)
    response = admin_client.post(
        reverse("admin:core_device_changelist"),
        {"action": "test_connection", "_selected_action": [device.pk]},
        follow=True,
    )
    assert "Gone: 127.0.0.1:1 (TCP) refused the connection" in response.content.decode()


def test_sync_clock_action_sets_the_device_clock(admin_client, zk_emulator):
    emu = zk_emulator(DeviceState.generate(users=1, punches=1, days=1, seed=2), clock_offset=-7200)
    device = DeviceFactory(name="Dock", ip_address=emu.host, port=emu.port)
    response = admin_client.post(
        reverse("admin:core_device_changelist"),
        {"action": "sync_clock", "_selected_action": [device.pk]},
        follow=True,
    )
    assert "Dock: clock set to" in response.content.decode()
    drift = emu.device_now() - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs(drift.total_seconds()) < 5


def test_raw_punches_are_searchable_by_employee_name_and_read_only(admin_client):
    device = DeviceFactory()
    EmployeeFactory(user_id="1001", name="Ana Silva")
    EmployeeFactory(user_id="1002", name="Rui Costa")
    RawAttendanceFactory(device=device, user_id="1001")
    RawAttendanceFactory(device=device, user_id="1002")
    url = reverse("admin:core_rawattendance_changelist")

    page = admin_client.get(url, {"q": "silva"}).content.decode()
    assert "Ana Silva" in page and "Rui Costa" not in page
    page = admin_client.get(url, {"q": "1002"}).content.decode()
    assert "Rui Costa" in page and "Ana Silva" not in page

    assert admin_client.get(reverse("admin:core_rawattendance_add")).status_code == 403


def test_raw_punch_list_filters_suspect_punches(admin_client):
    device = DeviceFactory()
    RawAttendanceFactory(
        device=device, user_id="1001", is_suspect=True, suspect_reason="before 2001"
    )
    RawAttendanceFactory(device=device, user_id="1002")
    url = reverse("admin:core_rawattendance_changelist")
    page = admin_client.get(url, {"is_suspect__exact": "1"}).content.decode()
    assert "before 2001" in page and "1002" not in page


def test_employee_list_filters_by_device(admin_client):
    front, back = DeviceFactory(name="Front"), DeviceFactory(name="Back")
    EmployeeFactory(user_id="1001", name="Ana Silva").devices.add(front)
    EmployeeFactory(user_id="1002", name="Rui Costa").devices.add(back)
    url = reverse("admin:core_employee_changelist")
    page = admin_client.get(url, {"devices__id__exact": back.pk}).content.decode()
    assert "Rui Costa" in page and "Ana Silva" not in page


def test_raw_punch_list_shows_the_time_the_device_showed(admin_client):
    device = DeviceFactory(timezone="Europe/Lisbon")
    RawAttendanceFactory(
        device=device,
        user_id="1001",
        timestamp=datetime.datetime(2026, 7, 1, 7, 0, tzinfo=datetime.UTC),
    )
    page = admin_client.get(reverse("admin:core_rawattendance_changelist")).content.decode()
    assert "2026-07-01 08:00:00 WEST" in page
