"""The push receiver (/iclock/, core.adms) through Django's test client: the
request sequence a clock sends, and every bad input."""

import datetime
import email.utils
import re

import pytest
import time_machine
from django.db import DatabaseError
from django.test import Client

from core import adms
from core.ingest import device_poll, devices_poll
from core.models import Device, DeviceCommand, Employee, PushRejectedLine, RawAttendance
from core.tests.factories import DeviceFactory
from core.zk.emulator import DeviceState

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
SN = "SIM0001"
# 08:00 in Asia/Kolkata (UTC+5:30) on 23 November 2026.
NOW = datetime.datetime(2026, 11, 23, 2, 30, tzinfo=UTC)
BATCH = (
    b"1001\t2026-11-23 08:00:05\t0\t1\t0\t0\t0\n"  # 7 fields
    b"1002\t2026-11-23 08:01:00\t0\t1\t0\n"  # 5 fields
    b"1003\t2026-11-23 08:02:00\t0\t15\t0\t0\t0\t0\t36.5\t97.7\n"  # 10 fields (thermal)
    b"1004\t2026-11-23 08:03:00\t255\t1\t\t0\t0\t2"  # status 255, empty work code, no LF
)


@pytest.fixture(autouse=True)
def frozen():
    with time_machine.travel(NOW, tick=True):
        yield


@pytest.fixture
def clock():
    return Client(REMOTE_ADDR="10.0.0.50")


@pytest.fixture
def device():
    return DeviceFactory(
        name="Gate",
        ip_address=None,
        serial_number=SN,
        timezone="Asia/Kolkata",
        first_seen_at=NOW,
        last_seen_at=NOW,
    )


def handshake(clock, serial=SN, **params):
    return clock.get(
        "/iclock/cdata", {"SN": serial, "options": "all", "pushver": "2.4.1", **params}
    )


def upload(clock, table, body, serial=SN, stamp="864374580", path="/iclock/cdata", **extra):
    query = f"?SN={serial}&table={table}&Stamp={stamp}"
    extra.setdefault("content_type", "text/plain")
    return clock.post(path + query, data=body, **extra)


def results(clock, body, serial=SN):
    return clock.post(f"/iclock/devicecmd?SN={serial}", data=body, content_type="text/plain")


def options(response) -> dict[str, str]:
    lines = response.content.decode().split("\n")
    return dict(line.split("=", 1) for line in lines[1:] if "=" in line)


def assert_firmware_reply(response):
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain"
    assert int(response["Content-Length"]) == len(response.content)
    sent = email.utils.parsedate_to_datetime(response["Date"])
    assert response["Date"].endswith("GMT")
    assert abs((sent - datetime.datetime.now(UTC)).total_seconds()) < 5


def assert_refused(response, status):
    assert response.status_code == status
    assert b"ok" not in response.content.lower()


# --- Handshake -----------------------------------------------------------------------------


def test_handshake_sends_the_options_with_an_integer_timezone_and_newline_ended_lines(
    clock, device
):
    Device.objects.filter(pk=device.pk).update(attlog_stamp="864374405", operlog_stamp="864374460")
    response = handshake(clock)
    assert_firmware_reply(response)
    text = response.content.decode()
    assert text.startswith(f"GET OPTION FROM: {SN}\n")
    assert text.endswith("\n")
    sent = options(response)
    assert sent["ATTLOGStamp"] == "864374405"
    assert sent["OPERLOGStamp"] == "864374460"
    assert sent["TimeZone"] == "330"
    assert sent["Realtime"] == "1"
    assert sent["Encrypt"] == "0"
    assert sent["TransFlag"] == "TransData AttLog\tOpLog\tEnrollUser\tChgUser"
    assert sent["Delay"] == "10" and sent["ErrorDelay"] == "30" and sent["TransInterval"] == "1"


def test_handshake_delay_options_come_from_settings(clock, device, settings):
    settings.ADMS_DELAY_SECONDS = 20
    settings.ADMS_ERROR_DELAY_SECONDS = 120
    settings.ADMS_TRANS_INTERVAL_MINUTES = 5
    sent = options(handshake(clock))
    assert (sent["Delay"], sent["ErrorDelay"], sent["TransInterval"]) == ("20", "120", "5")


def test_handshakes_either_side_of_a_dst_change_send_the_offset_of_their_moment(clock):
    DeviceFactory(
        name="Lisbon",
        ip_address=None,
        serial_number="LIS1",
        timezone="Europe/Lisbon",
        first_seen_at=NOW,
    )
    # Lisbon leaves summer time (UTC+1) at 01:00 UTC on 25 October 2026.
    with time_machine.travel(datetime.datetime(2026, 10, 25, 0, 59, tzinfo=UTC)):
        assert options(handshake(clock, serial="LIS1"))["TimeZone"] == "1"
    with time_machine.travel(datetime.datetime(2026, 10, 25, 1, 1, tzinfo=UTC)):
        assert options(handshake(clock, serial="LIS1"))["TimeZone"] == "0"


def test_new_device_gets_stamps_of_zero_and_legacy_firmware_gets_legacy_names(clock, device):
    sent = options(clock.get("/iclock/cdata", {"SN": SN, "options": "all"}))
    assert sent["Stamp"] == "0" and sent["OpStamp"] == "0"
    assert "ATTLOGStamp" not in sent


@pytest.mark.parametrize(
    ("zone", "moment", "expected"),
    [
        ("UTC", NOW, 0),
        ("Asia/Shanghai", NOW, 8),
        ("Asia/Kolkata", NOW, 330),
        ("Asia/Kathmandu", NOW, 345),
        ("America/Sao_Paulo", NOW, -3),
        ("America/St_Johns", NOW, -210),
        # Summer and winter in Lisbon: the offset at that moment.
        ("Europe/Lisbon", datetime.datetime(2026, 7, 1, tzinfo=UTC), 1),
        ("Europe/Lisbon", datetime.datetime(2026, 12, 1, tzinfo=UTC), 0),
    ],
)
def test_timezone_option_is_hours_when_whole_else_minutes(zone, moment, expected):
    assert adms.timezone_option(zone, now=moment) == expected


def test_handshake_of_an_unknown_serial_creates_a_disabled_device_and_answers_unknown(clock):
    response = handshake(clock, serial="NEW42")
    assert response.status_code == 200
    assert response.content.startswith(b"UNKNOWN DEVICE")
    assert b"OK" not in response.content
    device = Device.objects.get(serial_number="NEW42")
    assert not device.enabled
    assert device.ip_address is None
    assert device.push_address == "10.0.0.50"
    assert device.first_seen_at is not None and device.last_seen_at is not None
    handshake(clock, serial="NEW42")
    assert Device.objects.filter(serial_number="NEW42").count() == 1


def test_auto_approve_enables_a_new_serial_at_once(clock, settings):
    settings.ADMS_AUTO_APPROVE = True
    response = handshake(clock, serial="NEW43")
    assert response.content.startswith(b"GET OPTION FROM: NEW43\n")
    assert Device.objects.get(serial_number="NEW43").enabled


def test_address_outside_the_allowed_networks_is_refused_and_creates_nothing(clock, settings):
    import ipaddress

    settings.ADMS_ALLOWED_NETWORKS = [ipaddress.ip_network("192.168.0.0/16")]
    assert_refused(handshake(clock, serial="NEW44"), 403)
    assert not Device.objects.filter(serial_number="NEW44").exists()
    inside = Client(REMOTE_ADDR="192.168.1.9")
    assert handshake(inside, serial="NEW44").status_code == 200


def test_pushes_go_to_the_polled_device_that_has_the_serial(clock):
    polled = DeviceFactory(name="Polled", ip_address="10.0.0.9", serial_number=SN, timezone="UTC")
    handshake(clock)
    assert Device.objects.count() == 1
    polled.refresh_from_db()
    assert polled.first_seen_at is not None
    upload(clock, "ATTLOG", b"1001\t2026-11-23 02:00:00\t0\t1\t0\n")
    assert RawAttendance.objects.get().device_id == polled.pk


# --- Uploads -------------------------------------------------------------------------------


def test_attlog_upload_stores_every_line_once_at_the_right_utc_instant(clock, device):
    response = upload(clock, "ATTLOG", BATCH)
    assert_firmware_reply(response)
    assert re.fullmatch(rb"OK:? ?\d*", response.content)
    assert response.content == b"OK: 4"
    stored = {p.user_id: p for p in RawAttendance.objects.all()}
    assert set(stored) == {"1001", "1002", "1003", "1004"}
    # 08:00:05 in Kolkata is 02:30:05 UTC.
    assert stored["1001"].timestamp == datetime.datetime(2026, 11, 23, 2, 30, 5, tzinfo=UTC)
    assert stored["1003"].verify_type == 15
    assert stored["1004"].punch_state == 255
    device.refresh_from_db()
    assert device.attlog_stamp == "864374580"


def test_a_batch_sent_again_stores_nothing_twice(clock, device):
    upload(clock, "ATTLOG", BATCH)
    again = upload(clock, "ATTLOG", BATCH)
    assert again.content.startswith(b"OK")
    assert RawAttendance.objects.count() == 4


def test_a_batch_cut_differently_when_sent_again_still_stores_each_punch_once(clock, device):
    lines = BATCH.split(b"\n")
    upload(clock, "ATTLOG", b"\n".join(lines[:3]))
    upload(clock, "ATTLOG", b"\n".join(lines[1:]))
    assert RawAttendance.objects.count() == 4


def test_crlf_and_spaces_are_read_like_lf_and_tabs(clock, device):
    body = b"1001\t2026-11-23 08:00:05\t0\t1\t0\r\n1002 2026-11-23 08:01:00 1 1 0\r\n"
    assert upload(clock, "ATTLOG", body).content == b"OK: 2"
    assert RawAttendance.objects.get(user_id="1002").punch_state == 1


def test_bad_lines_are_kept_for_the_operator_and_the_rest_is_stored(clock, device):
    body = (
        b"1001\t2026-11-23 08:00:05\t0\t1\t0\n"
        b"1002\tyesterday\t0\t1\n"
        b"\xff\xfe\t2026-11-23 08:00:00\n"
        b"garbage\n"
        b"\t2026-11-23 08:06:00\t0\t1\t0\n"
        b"1004\t0001-01-01 00:00:00\t0\t1\t0\n"
        b"1003\t2026-11-23 08:05:00\t0\t1\t0\n"
    )
    response = upload(clock, "ATTLOG", body)
    assert response.content == b"OK: 7"
    assert set(RawAttendance.objects.values_list("user_id", flat=True)) == {"1001", "1003"}
    rejected = {line.line: line.reason for line in PushRejectedLine.objects.all()}
    assert len(rejected) == 5
    assert rejected["1004\t0001-01-01 00:00:00\t0\t1\t0"] == "year 1 is out of range"
    assert rejected["\t2026-11-23 08:06:00\t0\t1\t0"] == "no user ID (PIN)"
    assert "is not YYYY-MM-DD HH:MM:SS" in rejected["1002\tyesterday\t0\t1"]
    assert rejected["garbage"] == "no time"
    device.refresh_from_db()
    assert device.last_error.startswith("5 ATTLOG line(s) of the last upload could not be read")
    upload(clock, "ATTLOG", body)
    assert PushRejectedLine.objects.count() == 5
    upload(clock, "ATTLOG", b"1001\t2026-11-23 08:00:05\t0\t1\t0\n")
    device.refresh_from_db()
    assert device.last_error == ""


def test_punches_are_judged_by_the_same_suspect_rules_as_a_poll(clock, device):
    body = b"1001\t2000-01-01 00:10:00\t0\t1\t0\n1002\t2027-06-01 08:00:00\t0\t1\t0\n"
    upload(clock, "ATTLOG", body)
    old, future = RawAttendance.objects.order_by("timestamp")
    assert old.is_suspect and "before 2001" in old.suspect_reason
    assert future.is_suspect and "ahead of the server's time" in future.suspect_reason


def test_a_dst_day_converts_each_local_time_with_the_offset_of_its_moment(clock):
    DeviceFactory(
        name="Lisbon",
        ip_address=None,
        serial_number="LIS1",
        timezone="Europe/Lisbon",
        first_seen_at=NOW,
    )
    # 25 October 2026: Lisbon goes from UTC+1 back to UTC at 02:00 local.
    body = b"7\t2026-10-25 00:30:00\t0\t1\t0\n7\t2026-10-25 12:00:00\t1\t1\t0\n"
    upload(clock, "ATTLOG", body, serial="LIS1")
    times = list(RawAttendance.objects.order_by("timestamp").values_list("timestamp", flat=True))
    assert times == [
        datetime.datetime(2026, 10, 24, 23, 30, tzinfo=UTC),
        datetime.datetime(2026, 10, 25, 12, 0, tzinfo=UTC),
    ]


def test_a_database_error_answers_503_and_moves_no_stamp(clock, device, monkeypatch):
    def broken(**kwargs):
        raise DatabaseError("disk full")

    monkeypatch.setattr(adms, "punches_store", broken)
    response = upload(clock, "ATTLOG", BATCH)
    assert_refused(response, 503)
    device.refresh_from_db()
    assert device.attlog_stamp == ""
    assert not PushRejectedLine.objects.exists()


def test_uploads_of_a_device_not_approved_are_refused_and_stored_after_approval(clock):
    handshake(clock, serial="NEW45")
    response = upload(clock, "ATTLOG", BATCH, serial="NEW45")
    assert_refused(response, 403)
    assert response.content.startswith(b"UNKNOWN DEVICE")
    assert not RawAttendance.objects.exists()
    Device.objects.filter(serial_number="NEW45").update(enabled=True)
    assert handshake(clock, serial="NEW45").content.startswith(b"GET OPTION FROM")
    assert upload(clock, "ATTLOG", BATCH, serial="NEW45").content == b"OK: 4"
    assert RawAttendance.objects.count() == 4


def test_a_rejected_user_line_is_kept_without_the_users_password(clock, device):
    body = b"USER PIN=\tName=Ana\tPri=0\tPasswd=secret123\tCard=\tGrp=1\n"
    assert upload(clock, "OPERLOG", body).content == b"OK: 1"
    line = PushRejectedLine.objects.get()
    assert line.line == "USER PIN=\tName=Ana\tPri=0\tPasswd=***\tCard=\tGrp=1"
    # Kept by the bytes received: the batch sent again stores nothing twice.
    upload(clock, "OPERLOG", body)
    assert PushRejectedLine.objects.count() == 1


def test_a_secret_a_clock_reports_is_stored_masked(clock, device):
    command = queue(device, "info")
    clock.get("/iclock/getrequest", {"SN": SN})
    body = f"ID={command.pk}&Return=0&CMD=INFO\n~DeviceName=SIM\nComKey=654321\n"
    assert results(clock, body.encode()).content == b"OK"
    upload(clock, "options", b"PushCommKey=abcdef,UserCount=3")
    command.refresh_from_db()
    device.refresh_from_db()
    assert "654321" not in command.result and "ComKey=***" in command.result
    assert device.push_options["ComKey"] == "***"
    assert device.push_options["PushCommKey"] == "***"
    assert (device.device_name, device.user_count) == ("SIM", 3)


def test_the_migration_masks_the_secrets_stored_before(device):
    import importlib

    from django.apps import apps

    migration = importlib.import_module("core.migrations.0018_mask_push_secrets")
    line = PushRejectedLine.objects.create(
        device=device, table="OPERLOG", line="USER PIN=\tPasswd=secret123", reason="r", digest="x"
    )
    other = PushRejectedLine.objects.create(
        device=device, table="ATTLOG", line="garbage", reason="no time", digest="y"
    )
    command = DeviceCommand.objects.create(device=device, command="INFO", result="ComKey=654321")
    migration.mask(apps, None)
    line.refresh_from_db()
    other.refresh_from_db()
    command.refresh_from_db()
    assert (line.line, other.line, command.result) == (
        "USER PIN=\tPasswd=***",
        "garbage",
        "ComKey=***",
    )


def test_command_shown_masks_every_secret_field_and_nothing_else():
    shown = adms.command_shown
    assert shown("DATA UPDATE USERINFO PIN=1\tName=Pwd Lee\tPasswd=42\tCard=") == (
        "DATA UPDATE USERINFO PIN=1\tName=Pwd Lee\tPasswd=***\tCard="
    )
    assert (
        shown("DATA UPDATE USERINFO Passwd=42\tPIN=1") == "DATA UPDATE USERINFO Passwd=***\tPIN=1"
    )
    assert shown("ID=1&Return=0&CMD=INFO\n~ComKey=1,CommKey=2,MaxPwdLen=8") == (
        "ID=1&Return=0&CMD=INFO\n~ComKey=***,CommKey=***,MaxPwdLen=8"
    )
    # No password set stays visible as none.
    assert shown("USER PIN=1\tPasswd=\tCard=") == "USER PIN=1\tPasswd=\tCard="


def test_operlog_users_become_employees_linked_to_the_device(clock, device):
    body = (
        b"OPLOG 4\t0\t2026-11-23 08:01:00\t0\t0\t0\t0\n"
        b"USER PIN=1001\tName=Ana\tPri=14\tPasswd=\tCard=[0A000000]\tGrp=1\tTZ=0000000000000000\n"
        b"USER PIN=1002\tName=Bo\tPri=0\tPasswd=\tCard=12345\tGrp=1\n"
        b"FP PIN=1001\tFID=0\tSize=4\tValid=1\tTMP=AAAA\n"
    )
    response = upload(clock, "OPERLOG", body, stamp="864374460")
    assert response.content == b"OK: 4"
    ana = Employee.objects.get(user_id="1001")
    assert (ana.name, ana.privilege, ana.card) == ("Ana", 14, 10)
    assert Employee.objects.get(user_id="1002").card == 12345
    assert list(ana.devices.all()) == [device]
    device.refresh_from_db()
    assert device.operlog_stamp == "864374460"
    # The next handshake echoes both stamps.
    upload(clock, "ATTLOG", BATCH, stamp="864374580")
    sent = options(handshake(clock))
    assert (sent["ATTLOGStamp"], sent["OPERLOGStamp"]) == ("864374580", "864374460")


def test_garbage_bytes_in_a_user_name_spoil_that_name_only(clock, device):
    body = (
        b"USER PIN=1001\tName=An\xff\xfea\tPri=0\n"
        b"USER PIN=1002\tName=Bo\tPri=0\n"
        b"USER PIN=1003\tName=C\x00y\tPri=0\n"
        b"USER PIN=1004\tName=Di\tPri=99999\tCard=[FFFFFFFFFFFFFFFFFF]\n"
    )
    assert upload(clock, "OPERLOG", body).content == b"OK: 4"
    assert Employee.objects.get(user_id="1001").name == "An\ufffd\ufffda"
    assert Employee.objects.get(user_id="1002").name == "Bo"
    assert Employee.objects.get(user_id="1003").name == "C\ufffdy"
    di = Employee.objects.get(user_id="1004")
    assert (di.privilege, di.card) == (0, 0)


def test_a_name_in_the_devices_legacy_encoding_is_read_in_it(clock, device):
    Device.objects.filter(pk=device.pk).update(encoding="gb18030")
    upload(clock, "OPERLOG", "USER PIN=1001\tName=张伟\tPri=0\n".encode("gb18030"))
    assert Employee.objects.get(user_id="1001").name == "张伟"


@pytest.mark.parametrize("table", ["ATTPHOTO", "ERRORLOG", "BIODATA", "rtlog", "SOMETHING"])
def test_other_tables_are_acknowledged_and_not_stored(clock, device, table):
    response = upload(
        clock, table, b"PIN=1.jpg\nSN=SIM0001\nsize=3\nCMD=uploadphoto\x00\xff\xd8\xff"
    )
    assert response.status_code == 200 and response.content.startswith(b"OK")
    assert not RawAttendance.objects.exists()


def test_options_upload_fills_the_device_facts(clock, device):
    body = b"~DeviceName=SIM,FWVersion=Ver 8.0.4-SIM,UserCount=2,IPAddress=10.0.0.50"
    assert upload(clock, "options", body).content.startswith(b"OK")
    device.refresh_from_db()
    assert (device.device_name, device.firmware, device.user_count) == ("SIM", "Ver 8.0.4-SIM", 2)


# --- Bad input -------------------------------------------------------------------------------


def test_a_request_without_sn_gets_400(clock, device):
    for response in (
        clock.get("/iclock/cdata", {"options": "all"}),
        clock.post("/iclock/cdata?table=ATTLOG", data=BATCH, content_type="text/plain"),
        clock.get("/iclock/getrequest"),
        clock.post("/iclock/devicecmd", data=b"ID=1&Return=0&CMD=INFO", content_type="text/plain"),
        clock.get("/iclock/ping"),
    ):
        assert_refused(response, 400)
        assert b"SN" in response.content
    assert Device.objects.count() == 1


def test_a_body_over_the_limit_gets_413_and_stores_nothing(clock, device, settings):
    settings.ADMS_MAX_BODY_BYTES = 2048
    body = b"1001\t2026-11-23 08:00:05\t0\t1\t0\n" * 100
    assert_refused(upload(clock, "ATTLOG", body), 413)
    assert not RawAttendance.objects.exists()


def test_a_3_mb_body_over_djangos_default_limit_is_stored(clock, device):
    line = b"1001\t2026-11-23 08:00:05\t0\t1\t0\t0\t0\n"
    body = line * (3 * 1024 * 1024 // len(line))
    assert len(body) > 2_621_440
    response = upload(clock, "ATTLOG", body)
    assert response.status_code == 200 and response.content.startswith(b"OK")
    assert RawAttendance.objects.count() == 1


def test_an_empty_body_is_acknowledged_with_nothing_stored(clock, device):
    assert upload(clock, "ATTLOG", b"").content == b"OK: 0"
    assert upload(clock, "OPERLOG", b"").content == b"OK: 0"
    assert not RawAttendance.objects.exists()


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "application/push;charset=UTF-8", ""]
)
def test_any_content_type_or_none_is_read_as_raw_bytes(clock, device, content_type):
    response = upload(clock, "ATTLOG", BATCH, content_type=content_type)
    assert response.content == b"OK: 4"
    assert RawAttendance.objects.count() == 4


@pytest.mark.parametrize("suffix", [".aspx", "/", ".aspx/"])
def test_aspx_and_trailing_slash_paths_answer_without_a_redirect(clock, device, suffix):
    assert handshake(clock).status_code == 200
    response = upload(clock, "ATTLOG", BATCH, path=f"/iclock/cdata{suffix}")
    assert response.content == b"OK: 4"
    assert clock.get(f"/iclock/getrequest{suffix}?SN={SN}").content == b"OK"
    assert clock.get(f"/iclock/ping{suffix}?SN={SN}").content == b"OK"
    assert results(clock, b"").status_code == 200


def test_no_session_cookie_and_no_csrf_token_needed(device):
    csrf_checking = Client(enforce_csrf_checks=True, REMOTE_ADDR="10.0.0.50")
    response = upload(csrf_checking, "ATTLOG", BATCH)
    assert response.content == b"OK: 4"
    assert not response.cookies


# --- Heartbeat and commands -------------------------------------------------------------------


def test_idle_poll_records_the_info_counts_and_answers_exactly_ok(clock, device):
    response = clock.get(
        "/iclock/getrequest", {"SN": SN, "INFO": "Ver 8.0.4-SIM,2,1,3,10.0.0.50,10,7,0,0,100"}
    )
    assert_firmware_reply(response)
    assert response.content == b"OK"
    device.refresh_from_db()
    assert (device.firmware, device.user_count, device.fingerprint_count) == ("Ver 8.0.4-SIM", 2, 1)
    assert (device.record_count, device.reported_ip) == (3, "10.0.0.50")
    assert device.last_seen_at is not None and device.last_success_at is not None


def test_poll_of_an_unknown_device_answers_unknown_device(clock):
    response = clock.get("/iclock/getrequest", {"SN": "NEW46"})
    assert response.content.startswith(b"UNKNOWN DEVICE")
    assert clock.get("/iclock/ping", {"SN": "NEW46"}).content.startswith(b"UNKNOWN DEVICE")


def queue(device, kind, **values):
    return adms.device_command_queue(device=device, command=adms.command_text(kind, **values))


def test_commands_are_handed_over_once_and_results_booked_once(clock, device):
    info = queue(device, "info")
    check = queue(device, "check")
    reupload = queue(
        device,
        "reupload",
        start=datetime.datetime(2026, 11, 1),
        end=datetime.datetime(2026, 11, 23, 23, 59, 59),
    )
    reboot = queue(device, "reboot")
    response = clock.get("/iclock/getrequest", {"SN": SN})
    assert_firmware_reply(response)
    assert response.content.decode() == (
        f"C:{info.pk}:INFO\n"
        f"C:{check.pk}:CHECK\n"
        f"C:{reupload.pk}:DATA QUERY ATTLOG StartTime=2026-11-01 00:00:00\t"
        "EndTime=2026-11-23 23:59:59\n"
        f"C:{reboot.pk}:REBOOT\n"
    )
    assert set(DeviceCommand.objects.values_list("state", flat=True)) == {"sent"}
    assert clock.get("/iclock/getrequest", {"SN": SN}).content == b"OK"

    two = f"ID={check.pk}&Return=0&CMD=CHECK\nID={reupload.pk}&Return=-1&CMD=DATA\n".encode()
    alone = f"ID={info.pk}&Return=0&CMD=INFO\n~DeviceName=SIM\nFWVersion=Ver 8.0.4-SIM\n".encode()
    for body in (two, alone):
        response = results(clock, body)
        assert_firmware_reply(response)
        assert response.content == b"OK"
    check.refresh_from_db()
    reupload.refresh_from_db()
    info.refresh_from_db()
    assert (check.state, check.return_code) == ("done", 0)
    assert (reupload.state, reupload.return_code) == ("failed", -1)
    assert info.state == "done" and "FWVersion=Ver 8.0.4-SIM" in info.result
    device.refresh_from_db()
    assert device.device_name == "SIM" and device.firmware == "Ver 8.0.4-SIM"

    answered = {c.pk: (c.state, c.answered_at, c.result) for c in DeviceCommand.objects.all()}
    results(clock, two)
    results(clock, alone.replace(b"Return=0", b"Return=-1"))
    assert {
        c.pk: (c.state, c.answered_at, c.result) for c in DeviceCommand.objects.all()
    } == answered


def test_a_command_not_answered_in_time_is_marked_failed(clock, device, settings):
    command = queue(device, "check")
    clock.get("/iclock/getrequest", {"SN": SN})
    with time_machine.travel(NOW + settings.ADMS_COMMAND_TIMEOUT + datetime.timedelta(minutes=1)):
        assert clock.get("/iclock/getrequest", {"SN": SN}).content == b"OK"
    command.refresh_from_db()
    assert command.state == "failed" and command.answered_at is None


def test_a_result_for_another_devices_command_changes_nothing(clock, device):
    other = DeviceFactory(name="Other", ip_address=None, serial_number="OTHER", first_seen_at=NOW)
    command = queue(other, "info")
    results(clock, f"ID={command.pk}&Return=0&CMD=INFO\n".encode())
    command.refresh_from_db()
    assert command.state == "queued"


def test_user_commands_carry_the_fields_and_refuse_what_would_break_the_line(device):
    text = adms.command_text("user_update", user_id="1001", name="Ana", privilege=0, card=0)
    assert text.startswith("DATA UPDATE USERINFO PIN=1001\tName=Ana\tPri=0\tPasswd=\t")
    assert adms.command_text("user_delete", user_id="1001") == "DATA DELETE USERINFO PIN=1001"
    for name in ("Ana\nC:1:CLEAR DATA", "Ana\tPri=14"):
        with pytest.raises(adms.CommandRefused):
            adms.command_text("user_update", user_id="1001", name=name)
    with pytest.raises(adms.CommandRefused):
        adms.command_text("clear_log")


def test_a_polled_device_cannot_be_given_commands():
    polled = DeviceFactory(name="Polled")
    with pytest.raises(adms.CommandRefused, match="never called this server"):
        queue(polled, "info")


# --- Health and polling ---------------------------------------------------------------------


def test_upload_of_a_live_punch_sets_the_clock_drift(clock, device):
    # The clock is 2 minutes ahead: its live punch says 08:02 at 08:00 local.
    upload(clock, "ATTLOG", b"1001\t2026-11-23 08:02:00\t0\t1\t0\n")
    device.refresh_from_db()
    assert 110 < device.clock_drift_seconds < 125
    assert device.newest_record_at == datetime.datetime(2026, 11, 23, 2, 32, tzinfo=UTC)
    # A backlog of older punches says nothing about the clock.
    upload(clock, "ATTLOG", b"1002\t2026-11-22 17:00:00\t1\t1\n1003\t2026-11-22 17:05:00\t1\t1\n")
    device.refresh_from_db()
    assert 110 < device.clock_drift_seconds < 125
    assert device.newest_record_at == datetime.datetime(2026, 11, 23, 2, 32, tzinfo=UTC)


def test_devices_without_an_ip_address_are_not_polled(device):
    assert devices_poll() == []
    assert devices_poll(devices=[device]) == []
    result = device_poll(device=device)
    assert not result.ok and "no IP address" in result.error


def test_a_pushed_and_a_polled_copy_of_one_punch_are_stored_once(clock, zk_emulator):
    state = DeviceState.from_dict(
        {
            "serial_number": SN,
            "users": [],
            "attendance": [
                {"user_id": "1001", "timestamp": "2026-11-23 08:00:05", "status": 1, "punch": 0}
            ],
        }
    )
    emu = zk_emulator(state)
    device = DeviceFactory(name="Both", ip_address=emu.host, port=emu.port, timezone="Asia/Kolkata")
    assert device_poll(device=device).ok
    assert upload(clock, "ATTLOG", b"1001\t2026-11-23 08:00:05\t0\t1\t0\n").content == b"OK: 1"
    assert RawAttendance.objects.filter(device=device).count() == 1


def test_an_upload_costs_the_same_few_queries_whatever_its_size(clock, device):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def batch(count, day):
        return b"".join(
            f"{1000 + n}\t2026-11-{day:02d} 08:{n // 60 % 60:02d}:{n % 60:02d}\t0\t1\t0\n".encode()
            for n in range(count)
        )

    handshake(clock)  # the first contact's writes are not the upload's
    counts = []
    # A firmware-sized upload goes in one statement (ingest.ARRAY_BATCH), a
    # larger one through a temporary table: constant on each side.
    for day, size in ((20, 5), (21, 900), (22, 3000), (23, 3600)):
        with CaptureQueriesContext(connection) as queries:
            assert upload(clock, "ATTLOG", batch(size, day)).content == f"OK: {size}".encode()
        counts.append(len(queries))
    assert counts[0] == counts[1] and counts[2] == counts[3] and max(counts) <= 15
    assert RawAttendance.objects.count() == 5 + 900 + 3000 + 3600


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ADMS_ALLOWED_NETWORKS", "10.0.0.0/8,office", "must be CIDR networks such as"),
        ("ADMS_AUTO_APPROVE", "sometimes", "ADMS_AUTO_APPROVE must be true or false"),
        ("ADMS_DELAY_SECONDS", "0", "ADMS_DELAY_SECONDS must be at least 1, got 0"),
        ("ADMS_COMMAND_TIMEOUT", "ten minutes", "ADMS_COMMAND_TIMEOUT must be a duration"),
        ("ADMS_MAX_BODY_BYTES", "4MB", "ADMS_MAX_BODY_BYTES must be a whole number"),
    ],
)
def test_bad_push_settings_stop_start_up_naming_the_variable(variable, value, message):
    from core.tests.test_settings import load_settings

    result = load_settings(**{variable: value})
    assert result.returncode != 0
    assert message in result.stderr


def test_a_refusal_never_says_ok_even_for_a_serial_that_contains_it(clock):
    handshake(clock, serial="BOOK-OK-1")
    response = upload(clock, "ATTLOG", BATCH, serial="BOOK-OK-1")
    assert_refused(response, 403)
    assert adms.refusal_text("Serial BOOK1 refused") == "The request was refused."


def test_poll_devices_and_test_device_skip_clocks_that_push(device, capsys):
    from django.core.management import call_command

    Device.objects.filter(pk=device.pk).update(enabled=True)
    call_command("poll_devices")
    assert "No enabled devices to poll" in capsys.readouterr().out
    call_command("poll_devices", "--device", "Gate")
    assert "has no IP address, it pushes its punches; skipped" in capsys.readouterr().out
    call_command("test_device", "--all")
    assert "Gate" not in capsys.readouterr().out


def test_an_info_result_with_absurd_values_is_booked_and_kept_bounded(clock, device):
    command = queue(device, "info")
    clock.get("/iclock/getrequest", {"SN": SN})
    lines = [f"ID={command.pk}&Return=0&CMD=INFO", "UserCount=99999999999999999999"]
    lines += [f"Key{n}=value" for n in range(1000)]
    response = results(clock, "\n".join(lines).encode())
    assert response.content == b"OK"
    device.refresh_from_db()
    assert device.user_count is None
    assert len(device.push_options) == adms.MAX_OPTIONS
    command.refresh_from_db()
    assert command.state == "done"


def test_pushed_punches_become_a_day_like_polled_ones(clock, device):
    from core.models import ProcessedAttendance
    from core.processing import attendance_process

    upload(clock, "OPERLOG", b"USER PIN=1001\tName=Ana\tPri=0\n")
    upload(
        clock,
        "ATTLOG",
        b"1001\t2026-11-22 08:02:00\t0\t1\t0\n1001\t2026-11-22 17:05:00\t1\t1\t0\n",
    )
    assert attendance_process().rows_created == 1
    day = ProcessedAttendance.objects.get(user_id="1001")
    assert (day.work_date, day.clock_in, day.clock_out, day.employee.name) == (
        datetime.date(2026, 11, 22),
        datetime.datetime(2026, 11, 22, 2, 32, tzinfo=UTC),
        datetime.datetime(2026, 11, 22, 11, 35, tzinfo=UTC),
        "Ana",
    )
    assert day.clock_in_device == device
