"""The push receiver over a real socket: the bridge's WSGI application serving
on a loopback port (pytest-django's live server), spoken to with http.client
the way a clock's firmware speaks: raw bodies, its headers, its request order."""

import datetime
import email.utils
import http.client
import re
import socket
import time
from urllib.parse import urlsplit

import pytest

from core import adms
from core.models import Device, DeviceCommand, Employee, RawAttendance

pytestmark = pytest.mark.django_db(transaction=True)

UTC = datetime.UTC
SN = "SIM0001"
HEADERS = {"User-Agent": "iClock Proxy/1.09", "Accept": "*/*", "Connection": "close"}
BATCH = (
    b"1001\t2026-11-23 08:00:05\t0\t1\t0\t0\t0\n"
    b"1002\t2026-11-23 08:01:00\t0\t1\t0\n"
    b"1003\t2026-11-23 08:02:00\t0\t15\t0\t0\t0\t0\t36.5\t97.7\n"
    b"1004\t2026-11-23 08:03:00\t255\t1\t\t0\t0\t2"
)
# ZK-encoded time of the batch's last record (2026-11-23 08:03:00).
BATCH_STAMP = "864374580"


class Clock:
    """Speaks to the live server as firmware does: one connection per request."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def request(self, method, path, body=None, content_type="text/plain"):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
        headers = dict(HEADERS)
        if body is not None and content_type:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            content = response.read()
            return response, content
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body, content_type="text/plain"):
        return self.request("POST", path, body=body, content_type=content_type)

    def send_and_hang_up(self, path, body):
        """Sends a whole upload and closes before reading the answer: a lost ack."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"User-Agent: iClock Proxy/1.09\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            sock.sendall(head + body)


def assert_firmware_reply(response, content):
    assert response.status == 200 and response.reason == "OK"
    assert response.getheader("Content-Type") == "text/plain"
    assert int(response.getheader("Content-Length")) == len(content)
    dates = response.msg.get_all("Date")
    assert len(dates) == 1 and dates[0].endswith("GMT")
    sent = email.utils.parsedate_to_datetime(dates[0])
    assert abs((sent - datetime.datetime.now(UTC)).total_seconds()) < 5


@pytest.fixture
def clock(live_server):
    return Clock(live_server.url)


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_firmware_request_sequence_from_unknown_clock_to_answered_commands(clock):
    # An unknown clock: UNKNOWN DEVICE, its upload refused, nothing stored.
    handshake = f"/iclock/cdata?SN={SN}&options=all&pushver=2.4.1&language=69"
    response, content = clock.get(handshake)
    assert_firmware_reply(response, content)
    assert content.startswith(b"UNKNOWN DEVICE") and b"OK" not in content
    upload_path = f"/iclock/cdata?SN={SN}&table=ATTLOG&Stamp={BATCH_STAMP}"
    response, content = clock.post(upload_path, BATCH)
    assert response.status == 403 and b"OK" not in content
    assert not RawAttendance.objects.exists()

    # The operator approves it, after setting its zone.
    Device.objects.filter(serial_number=SN).update(enabled=True, timezone="Asia/Kolkata")

    # 1. Handshake.
    response, content = clock.get(handshake)
    assert_firmware_reply(response, content)
    text = content.decode()
    assert text.startswith(f"GET OPTION FROM: {SN}\n") and text.endswith("\n")
    options = dict(line.split("=", 1) for line in text.splitlines()[1:])
    assert re.fullmatch(r"-?\d+", options["TimeZone"]) and options["TimeZone"] == "330"
    assert options["Encrypt"] == "0" and "AttLog" in options["TransFlag"]
    assert options["ATTLOGStamp"] == "0"

    # 2. Its options.
    response, content = clock.post(
        f"/iclock/cdata?SN={SN}&table=options",
        b"~DeviceName=SIM,FWVersion=Ver 8.0.4-SIM,UserCount=2,IPAddress=10.0.0.50",
    )
    assert response.status == 200 and content.startswith(b"OK")

    # 3. First poll, with its counts.
    response, content = clock.get(
        f"/iclock/getrequest?SN={SN}&INFO=Ver%208.0.4-SIM,2,0,3,10.0.0.50,10,7,0,0,100"
    )
    assert_firmware_reply(response, content)
    assert content == b"OK"

    # 4. The held batch arrives; 5. the same batch again (a lost ack).
    for _ in range(2):
        response, content = clock.post(upload_path, BATCH, content_type="application/push")
        assert_firmware_reply(response, content)
        assert re.fullmatch(rb"OK:? ?\d*", content)
        assert RawAttendance.objects.count() == 4
    first = RawAttendance.objects.get(user_id="1001")
    assert first.timestamp == datetime.datetime(2026, 11, 23, 2, 30, 5, tzinfo=UTC)

    # 6. The operation log, with a user.
    response, content = clock.post(
        f"/iclock/cdata?SN={SN}&table=OPERLOG&Stamp=864374460",
        b"OPLOG 4\t0\t2026-11-23 08:01:00\t0\t0\t0\t0\n"
        b"USER PIN=1001\tName=Ana\tPri=0\tPasswd=\tCard=\tGrp=1\tTZ=0000000000000000\n",
    )
    assert response.status == 200 and content.startswith(b"OK")
    assert Employee.objects.get(user_id="1001").name == "Ana"

    # 7. Commands queued, handed over, answered (twice).
    device = Device.objects.get(serial_number=SN)
    info, check, query = (
        adms.device_command_queue(device=device, command=adms.command_text(kind, **values))
        for kind, values in (
            ("info", {}),
            ("check", {}),
            (
                "reupload",
                {
                    "start": datetime.datetime(2026, 11, 1),
                    "end": datetime.datetime(2026, 11, 23, 23, 59, 59),
                },
            ),
        )
    )
    response, content = clock.get(f"/iclock/getrequest?SN={SN}")
    assert_firmware_reply(response, content)
    lines = content.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 4
    assert lines[0] == f"C:{info.pk}:INFO"
    assert lines[2].startswith(f"C:{query.pk}:DATA QUERY ATTLOG StartTime=2026-11-01 00:00:00\t")
    two = f"ID={check.pk}&Return=0&CMD=CHECK\nID={query.pk}&Return=-1&CMD=DATA".encode()
    alone = f"ID={info.pk}&Return=0&CMD=INFO\n~DeviceName=SIM\nFWVersion=Ver 8.0.4-SIM\n".encode()
    for _ in range(2):
        for body in (two, alone):
            response, content = clock.post(f"/iclock/devicecmd?SN={SN}", body)
            assert_firmware_reply(response, content)
            assert content == b"OK"
    states = dict(DeviceCommand.objects.values_list("pk", "state"))
    assert states == {info.pk: "done", check.pk: "done", query.pk: "failed"}

    # 8. Handshake again: the stamps come back.
    response, content = clock.get(handshake)
    assert f"ATTLOGStamp={BATCH_STAMP}\n".encode() in content
    assert b"OPERLOGStamp=864374460\n" in content

    # 9. Ping.
    response, content = clock.get(f"/iclock/ping?SN={SN}")
    assert_firmware_reply(response, content)
    assert content == b"OK"


@pytest.fixture
def approved():
    return Device.objects.create(
        name="Gate",
        serial_number=SN,
        timezone="UTC",
        first_seen_at=datetime.datetime.now(UTC),
    )


def test_a_clock_whose_acknowledgements_are_lost_sends_again_and_nothing_doubles(clock, approved):
    from django.db import connection

    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        # The hung-up uploads are still being stored while the next arrives, and
        # Django gives all the live server's threads one in-memory connection.
        pytest.skip("needs PostgreSQL or a SQLite file, not the in-memory test database")
    path = f"/iclock/cdata?SN={SN}&table=ATTLOG&Stamp={BATCH_STAMP}"
    clock.send_and_hang_up(path, BATCH)
    clock.send_and_hang_up(path, BATCH)
    response, content = clock.post(path, BATCH)
    assert content == b"OK: 4"
    assert wait_for(lambda: RawAttendance.objects.count() == 4)
    time.sleep(0.3)  # any upload still in flight on the server has finished by now
    assert RawAttendance.objects.count() == 4


def test_bodies_up_to_the_limit_are_stored_and_larger_ones_get_413(clock, approved):
    line = b"1001\t2026-11-23 08:00:05\t0\t1\t0\t0\t0\n"
    three_mb = line * (3 * 1024 * 1024 // len(line))
    path = f"/iclock/cdata?SN={SN}&table=ATTLOG&Stamp=1"
    response, content = clock.post(path, three_mb)
    assert response.status == 200 and content.startswith(b"OK")
    response, content = clock.post(path, three_mb + three_mb)
    assert response.status == 413 and b"ok" not in content.lower()
    assert RawAttendance.objects.count() == 1


def test_bad_requests_over_the_wire_are_answered_without_ok(clock, approved):
    for method, path, body in (
        ("GET", "/iclock/cdata?options=all", None),
        ("POST", "/iclock/cdata?table=ATTLOG", BATCH),
        ("POST", f"/iclock/cdata.aspx/?SN={SN}&table=ATTLOG", b"\xff\xfe\x00garbage\r\n"),
        ("POST", f"/iclock/cdata?SN={SN}&table=NOSUCHTABLE", b"whatever\r\n"),
    ):
        response, content = clock.request(method, path, body=body, content_type=None)
        if "SN=" not in path:
            assert response.status == 400 and b"ok" not in content.lower()
        else:
            assert response.status == 200 and content.startswith(b"OK")
    assert not RawAttendance.objects.exists()
