"""The admin pages HR uses for devices, employees and raw punches."""

import datetime
import socket
from zoneinfo import ZoneInfo

import pytest
import time_machine
from auditlog.models import LogEntry
from django.contrib.auth.models import Permission
from django.urls import reverse

from core.ingest import punches_judge
from core.models import Device, Employee, ProcessedAttendance, PunchDelivery, RawAttendance
from core.processing import attendance_edit, attendance_process
from core.tests.factories import DeviceFactory, EmployeeFactory, RawAttendanceFactory
from core.zk.emulator import DeviceState

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, django_user_model):
    user = django_user_model.objects.create_superuser("hr", "hr@example.com", "pw")
    client.force_login(user)
    return client


@pytest.fixture
def staff_client(client, django_user_model):
    """`staff_client("core.view_device", ...)`: logged in as staff with exactly these permissions.

    Each call logs in a new user: alice, then bob, then carol.
    """
    names = iter(["alice", "bob", "carol"])

    def login(*perms: str):
        user = django_user_model.objects.create_user(next(names), is_staff=True)
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        client.force_login(user)
        return client

    return login


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


def test_device_list_alerts_a_clock_that_is_far_off_and_not_one_that_is_close(admin_client):
    DeviceFactory(name="Reset by a power cut", clock_drift_seconds=-9467 * 86400)
    DeviceFactory(name="Close enough", clock_drift_seconds=42)
    page = admin_client.get(reverse("admin:core_device_changelist")).content.decode()
    assert "clock 9467 days behind" in page
    assert "+42 s" in page
    assert page.count('title="Sync clock sets it"') == 1


# --- The comm key is write-only ----------------------------------------------------------


def device_form(device: Device, **changes) -> dict:
    """The device change form as a browser posts it, the comm key field left blank."""
    data = {
        "name": device.name,
        "ip_address": device.ip_address,
        "port": device.port,
        "protocol": device.protocol,
        "comm_key": "",
        "timeout_seconds": device.timeout_seconds,
        "timezone": device.timezone,
        "encoding": device.encoding,
        "enabled": "on" if device.enabled else "",
        "work_start_time": "",
        "work_end_time": "",
    }
    data.update(changes)
    return {name: value for name, value in data.items() if value != "" or name == "comm_key"}


def test_device_page_never_carries_the_comm_key_and_says_one_is_set(admin_client):
    device = DeviceFactory(comm_key=918273)
    page = admin_client.get(reverse("admin:core_device_change", args=[device.pk])).content.decode()
    assert "918273" not in page
    assert 'type="password" name="comm_key"' in page
    assert "A comm key is set; leave blank to keep it" in page


def test_device_page_says_when_no_comm_key_is_set(admin_client):
    device = DeviceFactory(comm_key=0)
    page = admin_client.get(reverse("admin:core_device_change", args=[device.pk])).content.decode()
    assert "No comm key set" in page


def test_read_only_device_page_shows_only_whether_a_comm_key_is_set(staff_client):
    device = DeviceFactory(comm_key=918273)
    client = staff_client("core.view_device")
    response = client.get(reverse("admin:core_device_change", args=[device.pk]))
    page = response.content.decode()
    assert response.status_code == 200
    assert "918273" not in page
    assert '<div class="readonly">set</div>' in page


def test_saving_the_device_with_a_blank_comm_key_keeps_the_stored_one(admin_client):
    device = DeviceFactory(comm_key=918273, timeout_seconds=5)
    response = admin_client.post(
        reverse("admin:core_device_change", args=[device.pk]),
        device_form(device, timeout_seconds=9),
    )
    assert response.status_code == 302
    device.refresh_from_db()
    assert (device.comm_key, device.timeout_seconds) == (918273, 9)


@pytest.mark.parametrize("entered, stored", [("4321", 4321), ("0", 0)])
def test_entering_a_comm_key_replaces_the_stored_one_and_zero_removes_it(
    admin_client, entered, stored
):
    device = DeviceFactory(comm_key=918273)
    response = admin_client.post(
        reverse("admin:core_device_change", args=[device.pk]), device_form(device, comm_key=entered)
    )
    assert response.status_code == 302
    device.refresh_from_db()
    assert device.comm_key == stored


def test_an_out_of_range_comm_key_is_refused_and_not_echoed(admin_client):
    device = DeviceFactory(comm_key=918273)
    response = admin_client.post(
        reverse("admin:core_device_change", args=[device.pk]),
        device_form(device, comm_key="1234567"),
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "less than or equal to 999999" in page
    assert "1234567" not in page and "918273" not in page
    device.refresh_from_db()
    assert device.comm_key == 918273


def test_a_device_added_with_a_blank_comm_key_has_none(admin_client):
    response = admin_client.post(
        reverse("admin:core_device_add"),
        device_form(
            Device(name="New door", ip_address="10.0.0.9", timeout_seconds=5, timezone="UTC")
        ),
    )
    assert response.status_code == 302
    assert Device.objects.get(name="New door").comm_key == 0


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


# Two moments when the date in UTC is not the company's, each on New Year's Eve so
# that every span differs: punches given on the company's clock.
DATE_FILTER_CASES = {
    # 1 January 2027, 01:30 in Kolkata.
    "Asia/Kolkata": (
        datetime.datetime(2026, 12, 31, 20, tzinfo=datetime.UTC),
        ["2026-12-24 12:00", "2026-12-25 03:00", "2026-12-31 12:00", "2027-01-01 01:00"],
        {
            "Today": ["2027-01-01 01:00"],
            "Past 7 days": ["2026-12-25 03:00", "2026-12-31 12:00", "2027-01-01 01:00"],
            "This month": ["2027-01-01 01:00"],
            "This year": ["2027-01-01 01:00"],
        },
    ),
    # 31 December 2026, 19:00 in Los Angeles.
    "America/Los_Angeles": (
        datetime.datetime(2027, 1, 1, 3, tzinfo=datetime.UTC),
        ["2026-12-24 10:00", "2026-12-31 10:00", "2026-12-31 18:00"],
        {
            "Today": ["2026-12-31 10:00", "2026-12-31 18:00"],
            "Past 7 days": ["2026-12-24 10:00", "2026-12-31 10:00", "2026-12-31 18:00"],
            "This month": ["2026-12-24 10:00", "2026-12-31 10:00", "2026-12-31 18:00"],
            "This year": ["2026-12-24 10:00", "2026-12-31 10:00", "2026-12-31 18:00"],
        },
    ),
}


@pytest.mark.parametrize(
    ("zone", "choice"),
    [(zone, choice) for zone, (_, _, spans) in DATE_FILTER_CASES.items() for choice in spans],
)
def test_raw_punch_date_filter_counts_from_today_in_the_company_zone(
    client, django_user_model, settings, zone, choice
):
    now, punches, spans = DATE_FILTER_CASES[zone]
    settings.COMPANY_TIMEZONE = zone
    company = ZoneInfo(zone)
    for local in punches:
        naive = datetime.datetime.fromisoformat(local)
        RawAttendanceFactory(user_id="1001", timestamp=naive.replace(tzinfo=company))
    url = reverse("admin:core_rawattendance_changelist")

    with time_machine.travel(now, tick=False):
        client.force_login(django_user_model.objects.create_superuser("hr"))
        cl = client.get(url).context["cl"]
        (dates,) = [spec for spec in cl.filter_specs if spec.title == "timestamp"]
        (link,) = [c["query_string"] for c in dates.choices(cl) if c["display"] == choice]
        response = client.get(url + link)

    shown = sorted(
        row.timestamp.astimezone(company).strftime("%Y-%m-%d %H:%M")
        for row in response.context["cl"].result_list
    )
    assert shown == spans[choice]


# --- Who may do what --------------------------------------------------------------------

# Every action that writes or talks to a clock, and the one permission that allows it.
ACTIONS = [
    ("device", "poll_now", "core.poll_device"),
    ("device", "test_connection", "core.test_device"),
    ("device", "sync_clock", "core.sync_device_clock"),
    ("device", "delete_selected", "core.delete_device"),
    ("employee", "delete_selected", "core.delete_employee"),
    ("rawattendance", "mark_suspect", "core.judge_punch"),
    ("rawattendance", "clear_suspect", "core.judge_punch"),
    ("processedattendance", "recompute", "core.change_processedattendance"),
    ("processedattendance", "mark_reviewed", "core.change_processedattendance"),
    ("processedattendance", "discard_edits", "core.change_processedattendance"),
    ("processedattendance", "resend", "core.resend_processedattendance"),
    ("processedattendance", "reset_failed", "core.reset_failed_processedattendance"),
    ("punchdelivery", "resend", "core.resend_punchdelivery"),
    ("punchdelivery", "reset_failed", "core.reset_failed_punchdelivery"),
]
DEVICE_PERMISSIONS = [
    "core.change_device",
    "core.poll_device",
    "core.test_device",
    "core.sync_device_clock",
    "core.manage_device_users",
]


def offered_actions(client, model: str) -> set[str]:
    response = client.get(reverse(f"admin:core_{model}_changelist"))
    assert response.status_code == 200
    form = response.context["action_form"]
    if form is None:
        return set()
    return {name for name, _ in form.fields["action"].choices if name}


@pytest.fixture
def one_of_each():
    """A row in every changelist, so that each has something to act on."""
    device = DeviceFactory(name="Lobby")
    EmployeeFactory(user_id="1001", name="Ana Silva")
    PunchDelivery.objects.create(raw=RawAttendanceFactory(device=device, user_id="1001"))
    return device


@pytest.mark.parametrize("model, action, perm", ACTIONS)
def test_an_action_is_offered_only_to_a_user_with_its_permission(
    staff_client, one_of_each, model, action, perm
):
    client = staff_client(f"core.view_{model}")
    assert action not in offered_actions(client, model)
    client = staff_client(f"core.view_{model}", perm)
    assert action in offered_actions(client, model)


@pytest.mark.parametrize(
    "model", ["device", "employee", "rawattendance", "processedattendance", "punchdelivery"]
)
def test_a_view_only_user_is_offered_no_action_at_all(staff_client, one_of_each, model):
    assert offered_actions(staff_client(f"core.view_{model}"), model) == set()


@pytest.fixture
def knocks():
    """A loopback TCP port that only counts who connects to it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    def count() -> int:
        seen = 0
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return seen
            conn.close()
            seen += 1

    count.port = listener.getsockname()[1]
    yield count
    listener.close()


@pytest.mark.parametrize("action, perm", [a[1:] for a in ACTIONS if a[0] == "device"][:3])
@pytest.mark.parametrize("holder", ["view only", "every other device permission"])
def test_a_crafted_device_action_without_its_permission_never_reaches_the_device(
    staff_client, knocks, action, perm, holder
):
    device = DeviceFactory(name="Lobby", port=knocks.port, timeout_seconds=1)
    others = [p for p in DEVICE_PERMISSIONS if p != perm] if holder != "view only" else []
    client = staff_client("core.view_device", *others)
    response = client.post(
        reverse("admin:core_device_changelist"),
        {"action": action, "index": 0, "_selected_action": [device.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert "Lobby:" not in response.content.decode()
    assert knocks() == 0
    device.refresh_from_db()
    assert (device.last_poll_at, device.last_error, device.clock_drift_seconds) == (None, "", None)
    assert not RawAttendance.objects.exists()


def test_poll_now_runs_for_a_user_with_only_the_poll_permission(staff_client, zk_emulator):
    emu = zk_emulator(DeviceState.generate(users=2, punches=12, days=2, seed=3))
    device = DeviceFactory(name="Lobby", ip_address=emu.host, port=emu.port)
    client = staff_client("core.view_device", "core.poll_device")
    response = client.post(
        reverse("admin:core_device_changelist"),
        {"action": "poll_now", "index": 0, "_selected_action": [device.pk]},
        follow=True,
    )
    assert "Lobby: 12 new" in response.content.decode()
    assert RawAttendance.objects.filter(device=device).count() == 12


def test_test_connection_runs_for_a_user_with_only_the_test_permission(staff_client, zk_emulator):
    emu = zk_emulator(DeviceState.generate(users=2, punches=12, days=2, seed=3))
    device = DeviceFactory(name="Lobby", ip_address=emu.host, port=emu.port)
    client = staff_client("core.view_device", "core.test_device")
    response = client.post(
        reverse("admin:core_device_changelist"),
        {"action": "test_connection", "index": 0, "_selected_action": [device.pk]},
        follow=True,
    )
    assert "Lobby: OK, serial" in response.content.decode()


def test_sync_clock_runs_for_a_user_with_only_the_clock_permission(staff_client, zk_emulator):
    emu = zk_emulator(DeviceState.generate(users=1, punches=1, days=1, seed=2), clock_offset=-7200)
    device = DeviceFactory(name="Dock", ip_address=emu.host, port=emu.port)
    client = staff_client("core.view_device", "core.sync_device_clock")
    response = client.post(
        reverse("admin:core_device_changelist"),
        {"action": "sync_clock", "index": 0, "_selected_action": [device.pk]},
        follow=True,
    )
    assert "Dock: clock set to" in response.content.decode()
    drift = emu.device_now() - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs(drift.total_seconds()) < 5


@pytest.mark.parametrize("model", ["device", "employee"])
def test_a_crafted_delete_selected_deletes_only_for_a_user_who_may_delete(
    staff_client, one_of_each, model
):
    row = {"device": DeviceFactory(name="Spare"), "employee": Employee.objects.get()}[model]
    delete = {"action": "delete_selected", "index": 0, "_selected_action": [row.pk], "post": "yes"}
    url = reverse(f"admin:core_{model}_changelist")
    assert staff_client(f"core.view_{model}").post(url, delete).status_code == 200
    assert type(row).objects.filter(pk=row.pk).exists()
    # The same request from a user who may delete does delete.
    staff_client(f"core.view_{model}", f"core.delete_{model}").post(url, delete)
    assert not type(row).objects.filter(pk=row.pk).exists()


@pytest.fixture
def worked_day():
    """A day processed from two punches, 08:00 to 17:00."""
    device = DeviceFactory(name="Front door")
    for hour in (8, 17):
        RawAttendanceFactory(
            device=device,
            user_id="1001",
            timestamp=datetime.datetime(2026, 11, 2, hour, 0, tzinfo=datetime.UTC),
        )
    attendance_process(full=True)
    return ProcessedAttendance.objects.get()


def prepare(action: str, day: ProcessedAttendance, django_user_model) -> None:
    """Leaves the day with something for the action to do."""
    if action == "recompute":
        ProcessedAttendance.objects.filter(pk=day.pk).update(punch_count=99)
    elif action == "discard_edits":
        hr = django_user_model.objects.create_user("hr")
        attendance_edit(
            record_id=day.pk,
            clock_in=day.clock_in - datetime.timedelta(hours=1),
            clock_out=day.clock_out,
            user=hr,
        )


DAY_ACTIONS = ["recompute", "mark_reviewed", "discard_edits"]


@pytest.mark.parametrize("action", DAY_ACTIONS)
def test_a_crafted_day_action_from_a_view_only_user_changes_nothing(
    staff_client, worked_day, django_user_model, action
):
    prepare(action, worked_day, django_user_model)
    before = ProcessedAttendance.objects.values().get(pk=worked_day.pk)
    client = staff_client("core.view_processedattendance")
    response = client.post(
        reverse("admin:core_processedattendance_changelist"),
        {"action": action, "index": 0, "_selected_action": [worked_day.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert ProcessedAttendance.objects.values().get(pk=worked_day.pk) == before


@pytest.mark.parametrize("action", DAY_ACTIONS)
def test_a_day_action_runs_for_a_user_with_the_change_permission(
    staff_client, worked_day, django_user_model, action
):
    prepare(action, worked_day, django_user_model)
    client = staff_client("core.view_processedattendance", "core.change_processedattendance")
    response = client.post(
        reverse("admin:core_processedattendance_changelist"),
        {"action": action, "index": 0, "_selected_action": [worked_day.pk]},
        follow=True,
    )
    assert response.status_code == 200
    day = ProcessedAttendance.objects.get(pk=worked_day.pk)
    if action == "recompute":
        assert day.punch_count == 2
    elif action == "mark_reviewed":
        assert day.reviewed_by.username == "alice"
    else:
        assert day.is_manual is False
        assert day.clock_in == worked_day.clock_in


@pytest.mark.parametrize(
    "model", ["device", "employee", "processedattendance", "rawattendance", "punchdelivery"]
)
def test_a_view_only_user_can_neither_add_change_nor_delete(staff_client, worked_day, model):
    EmployeeFactory(user_id="1001", name="Ana Silva")
    PunchDelivery.objects.create(raw=RawAttendance.objects.first())
    row = {
        "device": Device.objects.first,
        "employee": Employee.objects.first,
        "processedattendance": lambda: worked_day,
        "rawattendance": RawAttendance.objects.first,
        "punchdelivery": PunchDelivery.objects.first,
    }[model]()
    before = type(row).objects.values().get(pk=row.pk)
    counts = (Device.objects.count(), Employee.objects.count(), RawAttendance.objects.count())
    client = staff_client(f"core.view_{model}")

    page = client.get(reverse(f"admin:core_{model}_change", args=[row.pk]))
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    change = {
        "name": "Changed",
        "user_id": "9999",
        "clock_in_0": "2026-11-02",
        "clock_in_1": "06:00",
    }
    assert (
        client.post(reverse(f"admin:core_{model}_change", args=[row.pk]), change).status_code == 403
    )
    assert client.post(reverse(f"admin:core_{model}_add"), change).status_code == 403
    delete = reverse(f"admin:core_{model}_delete", args=[row.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403

    assert type(row).objects.values().get(pk=row.pk) == before
    assert counts == (
        Device.objects.count(),
        Employee.objects.count(),
        RawAttendance.objects.count(),
    )
    assert ProcessedAttendance.objects.count() == 1


# --- An operator's verdict on punches ----------------------------------------------------


@pytest.fixture
def two_punches():
    device = DeviceFactory(name="Lobby")
    plausible = RawAttendanceFactory(device=device, user_id="1001")
    flagged = RawAttendanceFactory(
        device=device, user_id="1002", is_suspect=True, suspect_reason="before 2001"
    )
    return plausible, flagged


def judge(client, action: str, ids, *, reason: str | None = None, **extra):
    """Posts the action from the punch list, then (with a reason) the reason page."""
    data = {"action": action, "_selected_action": [p.pk for p in ids], **extra}
    if reason is None:
        data["index"] = 0
    else:
        data.update(apply="yes", reason=reason)
    return client.post(reverse("admin:core_rawattendance_changelist"), data)


def verdict_of(punch):
    return RawAttendance.objects.values_list(
        "is_suspect", "suspect_override", "suspect_override_by", "revised_at"
    ).get(pk=punch.pk)


def test_marking_punches_suspect_asks_for_a_reason_first(staff_client, two_punches):
    plausible, _ = two_punches
    client = staff_client("core.view_rawattendance", "core.judge_punch")
    response = judge(client, "mark_suspect", [plausible])
    page = response.content.decode()
    assert response.status_code == 200
    assert "1 punch(es) will be marked suspect" in page
    assert 'name="reason"' in page
    assert f'name="_selected_action" value="{plausible.pk}"' in page
    assert verdict_of(plausible) == (False, None, "", None)


def test_the_reason_page_refuses_a_blank_reason_and_changes_nothing(staff_client, two_punches):
    plausible, _ = two_punches
    client = staff_client("core.view_rawattendance", "core.judge_punch")
    response = judge(client, "mark_suspect", [plausible], reason="   ")
    assert response.status_code == 200
    assert "Give a reason" in response.content.decode()
    assert verdict_of(plausible) == (False, None, "", None)


def test_marking_and_clearing_punches_records_the_verdict_and_shows_it(staff_client, two_punches):
    plausible, flagged = two_punches
    client = staff_client("core.view_rawattendance", "core.judge_punch")

    response = judge(client, "mark_suspect", [plausible, flagged], reason="badge lent")
    assert response.status_code == 302
    page = client.get(response.url).content.decode()
    assert "2 punch(es) marked suspect." in page
    assert "marked suspect by alice: badge lent" in page
    assert "suspect, by alice at" in page
    is_suspect, override, by, revised = verdict_of(plausible)
    assert (is_suspect, override, by) == (True, True, "alice")
    assert revised is not None

    response = judge(client, "mark_suspect", [plausible], reason="again")
    page = client.get(response.url).content.decode()
    assert "0 punch(es) marked suspect; 1 already had that verdict." in page

    response = judge(client, "clear_suspect", [flagged], reason="clock was fine")
    assert response.status_code == 302
    assert verdict_of(flagged)[:3] == (False, False, "alice")
    detail = client.get(reverse("admin:core_rawattendance_change", args=[flagged.pk]))
    assert "cleared by alice: clock was fine" in detail.content.decode()
    assert "not suspect, by alice at" in detail.content.decode()


def test_a_verdict_on_all_punches_matching_a_search_touches_only_those(staff_client, two_punches):
    plausible, flagged = two_punches
    other = RawAttendanceFactory(device=plausible.device, user_id="1001")
    client = staff_client("core.view_rawattendance", "core.judge_punch")
    url = reverse("admin:core_rawattendance_changelist") + "?q=1001"
    data = {"action": "mark_suspect", "_selected_action": [plausible.pk], "select_across": "1"}

    page = client.post(url, {**data, "index": 0}).content.decode()
    assert "2 punch(es) will be marked suspect" in page
    assert 'name="select_across" value="1"' in page
    assert client.post(url, {**data, "apply": "yes", "reason": "no shift"}).status_code == 302

    assert verdict_of(plausible)[:2] == verdict_of(other)[:2] == (True, True)
    assert verdict_of(flagged)[:2] == (True, None)


def test_the_punch_list_filters_by_who_set_the_verdict(admin_client, two_punches):
    plausible, _ = two_punches
    hr = admin_client.get(reverse("admin:index")).wsgi_request.user
    punches_judge(ids=[plausible.pk], suspect=True, reason="badge lent", user=hr)
    url = reverse("admin:core_rawattendance_changelist")
    page = admin_client.get(url, {"verdict": "operator"}).content.decode()
    assert "badge lent" in page and "before 2001" not in page
    page = admin_client.get(url, {"verdict": "automatic"}).content.decode()
    assert "before 2001" in page and "badge lent" not in page


@pytest.mark.parametrize("action", ["mark_suspect", "clear_suspect"])
@pytest.mark.parametrize("perms", [[], ["core.change_rawattendance"]], ids=["view only", "change"])
def test_a_crafted_verdict_without_the_judge_permission_changes_nothing(
    staff_client, two_punches, action, perms
):
    before = list(RawAttendance.objects.values().order_by("pk"))
    client = staff_client("core.view_rawattendance", *perms)
    for reason in (None, "crafted"):
        response = judge(client, action, two_punches, reason=reason)
        assert response.status_code == 200
        assert 'name="reason"' not in response.content.decode()
    assert list(RawAttendance.objects.values().order_by("pk")) == before


# --- Delivery to the CRM -------------------------------------------------------------------

CRM_ACTIONS = [
    ("resend", "core.resend_processedattendance", "synced"),
    ("reset_failed", "core.reset_failed_processedattendance", "failed"),
]


@pytest.mark.parametrize("action, perm, state", CRM_ACTIONS)
@pytest.mark.parametrize("holder", ["view only", "change", "the other delivery permission"])
def test_a_crafted_delivery_action_without_its_permission_changes_nothing(
    staff_client, worked_day, action, perm, state, holder
):
    ProcessedAttendance.objects.filter(pk=worked_day.pk).update(
        sync_state=state, synced_version=1, sync_attempts=4, last_sync_error="HTTP 500"
    )
    before = ProcessedAttendance.objects.values().get(pk=worked_day.pk)
    other = {"view only": [], "change": ["core.change_processedattendance"]}.get(
        holder, [p for _, p, _ in CRM_ACTIONS if p != perm]
    )
    client = staff_client("core.view_processedattendance", *other)
    assert action not in offered_actions(client, "processedattendance")
    response = client.post(
        reverse("admin:core_processedattendance_changelist"),
        {"action": action, "index": 0, "_selected_action": [worked_day.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert ProcessedAttendance.objects.values().get(pk=worked_day.pk) == before


@pytest.mark.parametrize("action, perm, state", CRM_ACTIONS)
def test_a_delivery_action_makes_the_day_due_for_a_user_with_its_permission(
    staff_client, worked_day, action, perm, state
):
    ProcessedAttendance.objects.filter(pk=worked_day.pk).update(
        sync_state=state,
        synced_version=1,
        next_sync_at=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
    )
    client = staff_client("core.view_processedattendance", perm)
    response = client.post(
        reverse("admin:core_processedattendance_changelist"),
        {"action": action, "index": 0, "_selected_action": [worked_day.pk]},
        follow=True,
    )
    assert (
        "1 " in response.content.decode() and "due for delivery again" in response.content.decode()
    )
    day = ProcessedAttendance.objects.get(pk=worked_day.pk)
    assert (day.sync_state, day.next_sync_at) == ("pending", None)


def test_reset_failed_leaves_days_that_did_not_fail(staff_client, worked_day):
    ProcessedAttendance.objects.filter(pk=worked_day.pk).update(sync_state="rejected")
    client = staff_client("core.view_processedattendance", "core.reset_failed_processedattendance")
    client.post(
        reverse("admin:core_processedattendance_changelist"),
        {"action": "reset_failed", "index": 0, "_selected_action": [worked_day.pk]},
    )
    assert ProcessedAttendance.objects.get(pk=worked_day.pk).sync_state == "rejected"


def test_a_day_page_shows_the_crm_answer(admin_client, worked_day):
    ProcessedAttendance.objects.filter(pk=worked_day.pk).update(
        sync_state="rejected",
        crm_status=422,
        crm_response='{"errors": [{"error": "user 1001 is not known to this CRM"}]}',
        last_sync_error="The CRM refused this record: HTTP 422",
    )
    page = admin_client.get(
        reverse("admin:core_processedattendance_change", args=[worked_day.pk])
    ).content.decode()
    assert "422" in page and "user 1001 is not known to this CRM" in page
    listing = admin_client.get(
        reverse("admin:core_processedattendance_changelist") + "?sync_state__exact=rejected"
    ).content.decode()
    assert "The CRM refused this record" in listing


def test_the_delivery_log_is_shown_and_cannot_be_changed(staff_client):
    from core.models import DeliveryLog

    entry = DeliveryLog.objects.create(
        destination="http://127.0.0.1/records",
        idempotency_key="k" * 64,
        records=100,
        status_code=503,
        outcome="transient",
        duration_ms=12,
        response_excerpt="Service Unavailable",
    )
    client = staff_client("core.view_deliverylog")
    listing = client.get(reverse("admin:core_deliverylog_changelist")).content.decode()
    assert "Service Unavailable" in listing and "503" in listing
    assert offered_actions(client, "deliverylog") == set()
    response = client.post(
        reverse("admin:core_deliverylog_change", args=[entry.pk]), {"records": 1}
    )
    assert response.status_code == 403
    assert DeliveryLog.objects.get(pk=entry.pk).records == 100


# --- Raw punch deliveries ------------------------------------------------------------------

PUNCH_ACTIONS = [
    ("resend", "core.resend_punchdelivery", "synced"),
    ("reset_failed", "core.reset_failed_punchdelivery", "failed"),
]


@pytest.fixture
def punch_delivery():
    """A punch at 08:00 UTC on a Tokyo clock whose delivery the CRM refused."""
    punch = RawAttendanceFactory(
        device=DeviceFactory(name="Warehouse", timezone="Asia/Tokyo"),
        user_id="1001",
        timestamp=datetime.datetime(2026, 11, 2, 8, 0, tzinfo=datetime.UTC),
    )
    return PunchDelivery.objects.create(
        raw=punch,
        sync_state="rejected",
        sync_attempts=2,
        crm_status=422,
        crm_response='{"errors": [{"error": "user 1001 is not known to this CRM"}]}',
        last_sync_error="The CRM refused this record: HTTP 422",
    )


def test_the_punch_delivery_list_shows_the_crm_answer_and_filters_by_state(
    staff_client, punch_delivery
):
    PunchDelivery.objects.create(
        raw=RawAttendanceFactory(device=punch_delivery.raw.device, user_id="1002")
    )
    client = staff_client("core.view_punchdelivery")
    url = reverse("admin:core_punchdelivery_changelist")
    listing = client.get(url + "?sync_state__exact=rejected").content.decode()
    assert "The CRM refused this record" in listing
    assert "2026-11-02 17:00:00 JST" in listing and "Warehouse" in listing
    assert "1002" not in listing
    assert "1002" in client.get(url + "?sync_state__exact=pending").content.decode()
    page = client.get(
        reverse("admin:core_punchdelivery_change", args=[punch_delivery.pk])
    ).content.decode()
    assert "422" in page and "user 1001 is not known to this CRM" in page
    assert 'name="_save"' not in page


@pytest.mark.parametrize("action, perm, state", PUNCH_ACTIONS)
@pytest.mark.parametrize("holder", ["view only", "the daily records' permission", "the other"])
def test_a_crafted_punch_delivery_action_without_its_permission_changes_nothing(
    staff_client, punch_delivery, action, perm, state, holder
):
    PunchDelivery.objects.filter(pk=punch_delivery.pk).update(
        sync_state=state, sync_attempts=4, last_sync_error="HTTP 500"
    )
    before = PunchDelivery.objects.values().get(pk=punch_delivery.pk)
    other = {
        "view only": [],
        "the daily records' permission": [perm.replace("punchdelivery", "processedattendance")],
    }.get(holder, [p for _, p, _ in PUNCH_ACTIONS if p != perm])
    client = staff_client("core.view_punchdelivery", *other)
    assert action not in offered_actions(client, "punchdelivery")
    response = client.post(
        reverse("admin:core_punchdelivery_changelist"),
        {"action": action, "index": 0, "_selected_action": [punch_delivery.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert PunchDelivery.objects.values().get(pk=punch_delivery.pk) == before


@pytest.mark.parametrize("action, perm, state", PUNCH_ACTIONS)
def test_a_punch_delivery_action_makes_the_punch_due_for_a_user_with_its_permission(
    staff_client, punch_delivery, action, perm, state
):
    PunchDelivery.objects.filter(pk=punch_delivery.pk).update(
        sync_state=state, next_sync_at=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    )
    client = staff_client("core.view_punchdelivery", perm)
    response = client.post(
        reverse("admin:core_punchdelivery_changelist"),
        {"action": action, "index": 0, "_selected_action": [punch_delivery.pk]},
        follow=True,
    )
    assert "1 " in response.content.decode()
    assert "due for delivery again" in response.content.decode()
    delivery = PunchDelivery.objects.get(pk=punch_delivery.pk)
    assert (delivery.sync_state, delivery.next_sync_at) == ("pending", None)
    assert delivery.resend_count == (1 if action == "resend" else 0)
    entry = LogEntry.objects.get(additional_data__action=f"crm_punch_{action}")
    assert entry.object_pk == str(punch_delivery.pk)
    assert entry.changes["sync_state"] == [state, "pending"]
    assert entry.actor.has_perm(perm)


def test_reset_failed_leaves_punches_that_did_not_fail(staff_client, punch_delivery):
    client = staff_client("core.view_punchdelivery", "core.reset_failed_punchdelivery")
    client.post(
        reverse("admin:core_punchdelivery_changelist"),
        {"action": "reset_failed", "index": 0, "_selected_action": [punch_delivery.pk]},
    )
    assert PunchDelivery.objects.get(pk=punch_delivery.pk).sync_state == "rejected"


def test_resend_leaves_a_punch_held_back_as_suspect_held(staff_client, punch_delivery):
    PunchDelivery.objects.filter(pk=punch_delivery.pk).update(sync_state="held")
    client = staff_client("core.view_punchdelivery", "core.resend_punchdelivery")
    client.post(
        reverse("admin:core_punchdelivery_changelist"),
        {"action": "resend", "index": 0, "_selected_action": [punch_delivery.pk]},
    )
    assert PunchDelivery.objects.get(pk=punch_delivery.pk).sync_state == "held"
