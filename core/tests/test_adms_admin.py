"""The admin and the device_command command for clocks that push (core.adms):
who may queue what, and what a pushing device looks like in the device list."""

import datetime

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from core import adms
from core.models import Device, DeviceCommand, PushRejectedLine
from core.tests.factories import DeviceFactory, EmployeeFactory, RawAttendanceFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, django_user_model):
    """`staff_client("core.view_device", ...)`: logged in as staff with exactly these permissions."""
    names = iter(["alice", "bob", "carol", "dave"])

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


@pytest.fixture
def pushing():
    return DeviceFactory(
        name="Gate",
        ip_address=None,
        serial_number="SIM0001",
        first_seen_at=timezone.now(),
        last_seen_at=timezone.now(),
        push_address="10.0.0.50",
    )


DEVICE_ACTIONS = [
    ("refresh_info", "core.send_info_command", "INFO"),
    ("reread_options", "core.send_check_command", "CHECK"),
    ("reboot", "core.send_reboot_command", "REBOOT"),
]
ALL_PUSH_PERMISSIONS = [
    "core.send_info_command",
    "core.send_check_command",
    "core.send_reboot_command",
    "core.send_reupload_command",
    "core.manage_device_users",
    "core.change_device",
]


def offered(client, model):
    response = client.get(reverse(f"admin:core_{model}_changelist"))
    form = response.context["action_form"]
    return set() if form is None else {name for name, _ in form.fields["action"].choices if name}


def post_action(client, model, action, ids, *, follow=False, **extra):
    return client.post(
        reverse(f"admin:core_{model}_changelist"),
        {"action": action, "_selected_action": [str(pk) for pk in ids], **extra},
        follow=follow,
    )


@pytest.mark.parametrize(("action", "perm", "command"), DEVICE_ACTIONS)
def test_a_device_action_queues_its_command_with_its_permission_only(
    staff_client, pushing, action, perm, command
):
    assert action not in offered(staff_client("core.view_device"), "device")
    client = staff_client("core.view_device", perm)
    assert action in offered(client, "device")
    post_action(client, "device", action, [pushing.pk])
    queued = DeviceCommand.objects.get()
    assert (queued.command, queued.state, queued.created_by) == (command, "queued", "bob")


@pytest.mark.parametrize("action", ["refresh_info", "reread_options", "reboot", "reupload"])
@pytest.mark.parametrize("holder", ["view only", "every other push permission"])
def test_a_crafted_device_action_without_its_permission_queues_nothing(
    staff_client, pushing, action, holder
):
    own = {
        "refresh_info": "core.send_info_command",
        "reread_options": "core.send_check_command",
        "reboot": "core.send_reboot_command",
        "reupload": "core.send_reupload_command",
    }[action]
    perms = ["core.view_device"]
    if holder != "view only":
        perms += [p for p in ALL_PUSH_PERMISSIONS if p != own]
    client = staff_client(*perms)
    post_action(
        client, "device", action, [pushing.pk], start="2026-11-01", end="2026-11-02", apply="yes"
    )
    assert not DeviceCommand.objects.exists()


def test_reupload_asks_for_the_days_then_queues_a_data_query(staff_client, pushing):
    client = staff_client("core.view_device", "core.send_reupload_command")
    page = post_action(client, "device", "reupload", [pushing.pk])
    assert page.status_code == 200 and b"Upload a date range again" in page.content
    assert not DeviceCommand.objects.exists()
    refused = post_action(
        client,
        "device",
        "reupload",
        [pushing.pk],
        start="2026-11-05",
        end="2026-11-01",
        apply="yes",
    )
    assert b"must not be before" in refused.content
    post_action(
        client,
        "device",
        "reupload",
        [pushing.pk],
        start="2026-11-01",
        end="2026-11-23",
        apply="yes",
    )
    assert DeviceCommand.objects.get().command == (
        "DATA QUERY ATTLOG StartTime=2026-11-01 00:00:00\tEndTime=2026-11-23 23:59:59"
    )


def test_a_polled_device_gets_no_command_and_the_operator_is_told_why(staff_client):
    polled = DeviceFactory(name="Polled")
    client = staff_client("core.view_device", "core.send_info_command")
    response = post_action(client, "device", "refresh_info", [polled.pk], follow=True)
    assert not DeviceCommand.objects.exists()
    assert "never called this server" in response.content.decode()


def test_employee_actions_send_and_delete_users_on_their_pushing_clocks(staff_client, pushing):
    polled = DeviceFactory(name="Polled")
    ana = EmployeeFactory(user_id="1001", name="Ana", privilege=0, card=77)
    ana.devices.add(pushing, polled)
    client = staff_client("core.view_employee", "core.manage_device_users")
    assert {"send_to_clocks", "delete_from_clocks"} <= offered(client, "employee")
    post_action(client, "employee", "send_to_clocks", [ana.pk])
    post_action(client, "employee", "delete_from_clocks", [ana.pk])
    update, delete = DeviceCommand.objects.order_by("pk")
    assert update.device == pushing and delete.device == pushing
    assert update.command.startswith("DATA UPDATE USERINFO PIN=1001\tName=Ana\tPri=0\t")
    assert "\tCard=77\t" in update.command
    assert delete.command == "DATA DELETE USERINFO PIN=1001"


@pytest.mark.parametrize("action", ["send_to_clocks", "delete_from_clocks"])
def test_a_crafted_employee_action_without_manage_device_users_queues_nothing(
    staff_client, pushing, action
):
    ana = EmployeeFactory(user_id="1001", name="Ana")
    ana.devices.add(pushing)
    client = staff_client("core.view_employee", "core.change_employee", *ALL_PUSH_PERMISSIONS[:4])
    assert action not in offered(client, "employee")
    post_action(client, "employee", action, [ana.pk])
    assert not DeviceCommand.objects.exists()


def test_command_and_rejected_line_pages_are_read_only(staff_client, pushing):
    DeviceCommand.objects.create(device=pushing, command="INFO")
    PushRejectedLine.objects.create(
        device=pushing, table="ATTLOG", line="garbage", reason="no time", digest="x"
    )
    client = staff_client("core.view_devicecommand", "core.view_pushrejectedline")
    for model in ("devicecommand", "pushrejectedline"):
        page = client.get(reverse(f"admin:core_{model}_changelist"))
        assert page.status_code == 200
        assert client.get(reverse(f"admin:core_{model}_add")).status_code == 403
    assert b"no time" in client.get(reverse("admin:core_pushrejectedline_changelist")).content
    command = DeviceCommand.objects.get()
    response = client.post(
        reverse("admin:core_devicecommand_change", args=[command.pk]), {"command": "REBOOT"}
    )
    assert response.status_code == 403
    command.refresh_from_db()
    assert command.command == "INFO"


def test_the_command_pages_show_a_command_whose_time_is_up_as_failed_without_a_poll(
    staff_client, pushing, settings
):
    """The clock took the command and went silent: no poll will expire it."""
    sent_at = timezone.now() - settings.ADMS_COMMAND_TIMEOUT - datetime.timedelta(seconds=1)
    late = DeviceCommand.objects.create(
        device=pushing, command="INFO", state=DeviceCommand.State.SENT, sent_at=sent_at
    )
    waiting = DeviceCommand.objects.create(
        device=pushing, command="CHECK", state=DeviceCommand.State.SENT, sent_at=timezone.now()
    )
    client = staff_client("core.view_devicecommand")
    failed = client.get(reverse("admin:core_devicecommand_changelist"), {"state__exact": "failed"})
    assert [c.pk for c in failed.context["cl"].result_list] == [late.pk]
    page = client.get(reverse("admin:core_devicecommand_change", args=[late.pk]))
    assert f"no result within {settings.ADMS_COMMAND_TIMEOUT}" in page.content.decode()
    waiting.refresh_from_db()
    assert waiting.state == DeviceCommand.State.SENT


def a_user_command_with_a_password(device) -> DeviceCommand:
    line = adms.command_text("user_update", user_id="1001", name="Ana", password="secret123")
    return adms.device_command_queue(device=device, command=line, created_by="api")


def test_the_command_pages_show_a_users_password_as_stars(admin_client, pushing):
    command = a_user_command_with_a_password(pushing)
    pages = {
        "list": reverse("admin:core_devicecommand_changelist"),
        "change": reverse("admin:core_devicecommand_change", args=[command.pk]),
        "history": reverse("admin:core_devicecommand_history", args=[command.pk]),
        "delete": reverse("admin:core_devicecommand_delete", args=[command.pk]),
        # The device's deletion lists the commands it takes with it.
        "device delete": reverse("admin:core_device_delete", args=[pushing.pk]),
    }
    for name, url in pages.items():
        text = admin_client.get(url).content.decode()
        assert "secret" not in text, name  # not even the start of it
        assert "Passwd=***" in text, name
    # Read-only as before: the masked line is not a field that could be posted back.
    change = admin_client.get(pages["change"])
    assert "command" not in change.context["adminform"].form.fields
    deleted = admin_client.post(pages["delete"], {"post": "yes"}, follow=True)
    assert "secret123" not in deleted.content.decode()
    assert "secret123" not in LogEntry.objects.get().object_repr


def test_the_command_search_finds_a_user_id_but_never_a_password(admin_client, pushing):
    command = a_user_command_with_a_password(pushing)
    other = adms.device_command_queue(
        device=pushing, command=adms.command_text("user_delete", user_id="1002")
    )
    url = reverse("admin:core_devicecommand_changelist")

    def found(term):
        return {c.pk for c in admin_client.get(url, {"q": term}).context["cl"].result_list}

    for guess in ("secret123", "Passwd=secret", "secret", "Ana\tPri=0\tPasswd=secret123"):
        assert found(guess) == set(), guess
    assert found("1001") == {command.pk}
    assert found("1002") == {other.pk}
    assert found("100") == set()
    assert found("Gate") == found("SIM0001") == {command.pk, other.pk}
    assert found("api") == {command.pk}


def test_rejected_push_lines_show_no_password(admin_client, pushing):
    from django.test import Client

    Client(REMOTE_ADDR="10.0.0.50").post(
        "/iclock/cdata?SN=SIM0001&table=OPERLOG&Stamp=1",
        data=b"USER PIN=\tName=Ana\tPasswd=secret123\n",
        content_type="text/plain",
    )
    line = PushRejectedLine.objects.get()
    url = reverse("admin:core_pushrejectedline_changelist")
    for page in (url, reverse("admin:core_pushrejectedline_change", args=[line.pk])):
        text = admin_client.get(page).content.decode()
        assert "secret123" not in text and "Passwd=***" in text
    assert not admin_client.get(url, {"q": "secret123"}).context["cl"].result_list


def test_the_device_page_shows_no_secret_the_clock_reported(admin_client, pushing):
    from django.test import Client

    Client(REMOTE_ADDR="10.0.0.50").post(
        "/iclock/cdata?SN=SIM0001&table=options&Stamp=1",
        data=b"~DeviceName=Gate clock,ComKey=654321,PushCommKey=abcdef",
        content_type="text/plain",
    )
    Device.objects.filter(pk=pushing.pk).update(comm_key=777777)
    text = admin_client.get(reverse("admin:core_device_change", args=[pushing.pk])).content
    assert b"Gate clock" in text
    for secret in (b"654321", b"abcdef", b"777777"):
        assert secret not in text


def test_a_pushing_device_shows_up_down_records_and_drift_in_the_device_list(
    staff_client, pushing, settings
):
    Device.objects.filter(pk=pushing.pk).update(record_count=3, clock_drift_seconds=-9000)
    RawAttendanceFactory(device=pushing)
    silent = DeviceFactory(
        name="Silent",
        ip_address=None,
        serial_number="SIM0002",
        first_seen_at=timezone.now() - datetime.timedelta(hours=2),
        last_seen_at=timezone.now() - datetime.timedelta(hours=2),
        last_error="the database was unavailable",
    )
    waiting = DeviceFactory(
        name="New",
        ip_address=None,
        serial_number="SIM0003",
        enabled=False,
        first_seen_at=timezone.now(),
        last_seen_at=timezone.now(),
    )
    page = staff_client("core.view_device").get(reverse("admin:core_device_changelist"))
    text = page.content.decode()
    assert "pushes from 10.0.0.50 (serial SIM0001)" in text
    assert "up, last seen" in text
    assert "down, last seen 2" in text and "hours ago" in text
    assert "waiting for approval" in text
    assert "3 / 1" in text
    assert "clock 2 hours behind" in text or "clock 150 minutes behind" in text
    assert "the database was unavailable" in text
    assert silent.name in text and waiting.name in text
    waiting_list = staff_client("core.view_device").get(
        reverse("admin:core_device_changelist") + "?connection=waiting"
    )
    assert [d.name for d in waiting_list.context["cl"].result_list] == ["New"]


def test_a_device_without_an_ip_address_can_be_saved_from_the_admin(staff_client):
    client = staff_client("core.view_device", "core.add_device", "core.change_device")
    response = client.post(
        reverse("admin:core_device_add"),
        {
            "name": "Cloud gate",
            "ip_address": "",
            "port": 4370,
            "protocol": "tcp",
            "comm_key": "",
            "timeout_seconds": 5,
            "timezone": "Asia/Kolkata",
            "encoding": "utf-8",
            "enabled": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Device.objects.get(name="Cloud gate").ip_address is None


# --- device_command ---------------------------------------------------------------------------


def test_device_command_queues_each_kind_by_name_or_serial(pushing, capsys):
    call_command("device_command", "Gate", "info")
    call_command(
        "device_command", "SIM0001", "reupload", "--from", "2026-11-01", "--to", "2026-11-02"
    )
    call_command(
        "device_command", "Gate", "user-update", "--user-id", "1001", "--name", "Ana", "--card", "5"
    )
    call_command("device_command", "Gate", "user-delete", "--user-id", "1001")
    commands = list(DeviceCommand.objects.order_by("pk").values_list("command", flat=True))
    assert commands[0] == "INFO"
    assert (
        commands[1]
        == "DATA QUERY ATTLOG StartTime=2026-11-01 00:00:00\tEndTime=2026-11-02 23:59:59"
    )
    assert commands[2].startswith("DATA UPDATE USERINFO PIN=1001\tName=Ana\t")
    assert commands[3] == "DATA DELETE USERINFO PIN=1001"
    assert "Queued command" in capsys.readouterr().out


def test_device_command_refuses_bad_input_with_a_clear_message(pushing):
    DeviceFactory(name="Polled")
    cases = [
        (["Nowhere", "info"], "No device named"),
        (["Gate", "reupload"], "needs --from and --to"),
        (["Gate", "reupload", "--from", "yesterday", "--to", "2026-11-01"], "not a date"),
        (["Gate", "user-delete"], "user ID"),
        (["Gate", "user-update", "--user-id", "1", "--name", "A\tPri=14"], "one line"),
        (["Polled", "reboot"], "never called this server"),
    ]
    for args, message in cases:
        with pytest.raises(CommandError, match=message):
            call_command("device_command", *args)
    assert not DeviceCommand.objects.exists()
