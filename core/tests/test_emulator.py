"""The ZK device emulator, driven by pyzk (and by hand where pyzk cannot) over loopback."""

import json
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import pytest
from django.core.management import CommandError, call_command
from zk import ZK
from zk.base import make_commkey as pyzk_make_commkey
from zk.exception import ZKErrorResponse, ZKNetworkError
from zk.finger import Finger
from zk.user import User

from core.zk.client import decode_attendance
from core.zk.emulator import DeviceState, FingerTemplate, ZKEmulator
from core.zk.emulator.wire import (
    CMD_ACK_ERROR,
    CMD_ACK_OK,
    CMD_ACK_UNAUTH,
    CMD_ACK_UNKNOWN,
    CMD_CLEAR_DATA,
    CMD_CLEAR_LCD,
    CMD_CONNECT,
    CMD_DOORSTATE_RRQ,
    CMD_GET_FREE_SIZES,
    CMD_GET_VERSION,
    CMD_OPTIONS_RRQ,
    CMD_REG_EVENT,
    CMD_RESTART,
    CMD_UNLOCK,
    CMD_WRITE_LCD,
    TCP_MAGIC,
    build_packet,
    checksum_ok,
    make_commkey,
)
from core.zk.protocol import decode_time, encode_time

NOW = datetime(2026, 11, 2, 12, 0, 0)
PROJECT_DIR = Path(__file__).resolve().parents[2]
TRANSPORTS = pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
BROKEN_CONNECTION = (ZKNetworkError, ZKErrorResponse, ConnectionError)


def small_state(**overrides) -> DeviceState:
    return DeviceState.generate(
        **{"users": 10, "punches": 300, "days": 20, "seed": 11, "now": NOW, **overrides}
    )


def connect(emu: ZKEmulator, *, udp: bool = False, password: int = 0, timeout: float = 5):
    return ZK(
        emu.host, port=emu.port, timeout=timeout, password=password, force_udp=udp, ommit_ping=True
    ).connect()


def as_tuples(records) -> list[tuple]:
    return [(r.user_id, r.timestamp, r.status, r.punch) for r in records]


def assert_same_log(got: list[tuple], expected: list[tuple]) -> None:
    # Not `got == expected`: pytest's diff of 100 000 tuples takes minutes.
    assert len(got) == len(expected)
    first = next((i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e), None)
    assert first is None, f"record {first}: got {got[first]}, expected {expected[first]}"


def run_bounded(function, seconds: float):
    """Runs `function` in a daemon thread: a client stuck in a loop fails the test."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the client was still busy after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Reply(NamedTuple):
    command: int
    session_id: int
    reply_id: int
    payload: bytes


class RawClient:
    """Speaks the framing by hand, for what pyzk cannot send or check."""

    def __init__(self, emu: ZKEmulator, *, udp: bool = False):
        self.udp = udp
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        self.sock.settimeout(3)
        self.sock.connect((emu.host, emu.port))
        self.session_id = 0
        self.reply_id = 0

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, command: int, payload: bytes = b"", *, reply_id: int | None = None) -> None:
        packet = build_packet(
            command, self.session_id, self.reply_id if reply_id is None else reply_id, payload
        )
        self.send_bytes(packet if self.udp else TCP_MAGIC + struct.pack("<I", len(packet)) + packet)

    def receive(self, timeout: float = 3) -> Reply:
        self.sock.settimeout(timeout)
        if self.udp:
            packet = self.sock.recv(65535)
        else:
            top = self._exactly(8)
            assert top[:4] == TCP_MAGIC
            packet = self._exactly(struct.unpack("<I", top[4:])[0])
        assert checksum_ok(packet)
        command, _checksum, session_id, reply_id = struct.unpack_from("<4H", packet)
        return Reply(command, session_id, reply_id, packet[8:])

    def call(self, command: int, payload: bytes = b"") -> Reply:
        self.reply_id += 1
        self.send(command, payload)
        reply = self.receive()
        assert reply.reply_id == self.reply_id
        return reply

    def connect(self) -> Reply:
        reply = self.call(CMD_CONNECT)
        self.session_id = reply.session_id
        return reply

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the device closed the connection")
            data += chunk
        return data


@pytest.fixture
def raw_client(zk_emulator):
    clients = []

    def open_client(emu: ZKEmulator, *, udp: bool = False) -> RawClient:
        clients.append(RawClient(emu, udp=udp))
        return clients[-1]

    yield open_client
    for client in clients:
        client.close()


# --- Wire helpers --------------------------------------------------------------------


def test_replies_carry_the_checksum_a_real_device_sends():
    # ACK_OK, session 0xfb2f, reply 0: a real device's reply captured in pyzk's test.py.
    assert build_packet(CMD_ACK_OK, 0xFB2F, 0) == bytes.fromhex("d007fffc2ffb0000")
    assert checksum_ok(bytes.fromhex("d5075bb2cf450000"))
    assert not checksum_ok(bytes.fromhex("d5075bb2cf450100"))


def test_comm_key_scrambling_matches_pyzk_and_wraps_instead_of_overflowing():
    assert make_commkey(12, 0x45CF) == bytes.fromhex("614d323c")
    assert make_commkey(45, 0x45CF) == bytes.fromhex("61c9323c")
    rng = random.Random(5)
    for _ in range(500):
        key, session, ticks = rng.randrange(1_000_000), rng.randrange(1, 0x8000), rng.randrange(256)
        assert make_commkey(key, session, ticks) == pyzk_make_commkey(key, session, ticks)
    # bitrev(0xFFFFFFFF) + 1 overflows a u32 (pyzk raises struct.error); modulo 2**32 it is 0.
    assert make_commkey(0xFFFFFFFF, 1) == pyzk_make_commkey(0, 0)


def test_device_time_encoding_round_trips_and_rejects_dates_that_do_not_exist():
    leap = datetime(2024, 2, 29, 23, 59, 58)
    assert decode_time(encode_time(leap)) == leap
    thirty_first_of_february = encode_time(datetime(2024, 2, 28)) + 3 * 86400
    with pytest.raises(ValueError):
        decode_time(thirty_first_of_february)


# --- pyzk against the emulator --------------------------------------------------------


@TRANSPORTS
def test_pyzk_basic_sequence_of_test_machine_reads_everything_back(zk_emulator, udp):
    state = small_state()
    emu = zk_emulator(state)
    conn = connect(emu, udp=udp)
    assert conn.set_sdk_build_1() is True
    assert conn.disable_device() is True
    assert emu.enabled is False
    assert conn.get_extend_fmt() == (0 if udp else 1)
    assert conn.get_user_extend_fmt() == (0 if udp else 1)
    assert conn.get_face_fun_on() == 0
    assert conn.get_compat_old_firmware() == 0
    assert conn.get_network_params() == {
        "ip": "127.0.0.1",
        "mask": "255.255.255.0",
        "gateway": "0.0.0.0",
    }
    assert abs(conn.get_time() - datetime.now()) < timedelta(seconds=3)
    assert conn.get_firmware_version() == "Ver 6.60 Apr 28 2017"
    assert conn.get_platform() == "ZMM220_TFT"
    assert conn.get_device_name() == "K40"
    assert conn.get_pin_width() == 9
    assert conn.get_serialnumber() == "EMU0001"
    assert conn.get_mac() == "00:17:61:c8:ec:17"
    assert conn.get_face_version() == 0
    assert conn.get_fp_version() == 10

    conn.read_sizes()
    assert (conn.users, conn.records, conn.fingers) == (10, 300, len(state.templates))
    assert (conn.users_cap, conn.fingers_cap, conn.rec_cap) == (10_000, 3_000, 100_000)
    assert (conn.users_av, conn.rec_av) == (10_000 - 10, 100_000 - 300)

    users = conn.get_users()
    name_bytes = 8 if udp else 24
    assert [(u.uid, u.user_id, u.name, u.privilege, u.card) for u in users] == [
        (
            u.uid,
            u.user_id,
            u.name.encode()[:name_bytes].decode(errors="ignore"),
            u.privilege,
            u.card,
        )
        for u in state.users
    ]
    templates = conn.get_templates()
    assert [(t.uid, t.fid, t.template) for t in templates] == sorted(
        (t.uid, t.fid, t.template) for t in state.templates
    )
    first = state.templates[0]
    assert conn.get_user_template(uid=first.uid, temp_id=first.fid).template == first.template
    assert_same_log(as_tuples(conn.get_attendance()), as_tuples(state.attendance))
    assert conn.enable_device() is True
    assert emu.enabled is True
    assert conn.disconnect() is True


@TRANSPORTS
def test_connect_needs_the_right_comm_key_when_the_device_has_one(zk_emulator, udp):
    emu = zk_emulator(small_state(), comm_key=123456)
    assert connect(emu, udp=udp, password=123456).get_serialnumber() == "EMU0001"
    with pytest.raises(ZKErrorResponse, match="Unauthenticated"):
        connect(emu, udp=udp, password=654321)
    with pytest.raises(ZKErrorResponse, match="Unauthenticated"):
        connect(emu, udp=udp, password=0)


def test_comm_key_comes_from_the_device_file_unless_given(zk_emulator):
    state = small_state()
    state.comm_key = 77
    emu = zk_emulator(state)
    assert connect(emu, password=77).get_device_name() == "K40"
    with pytest.raises(ZKErrorResponse, match="Unauthenticated"):
        connect(emu, password=0)


@TRANSPORTS
def test_commands_before_authentication_get_unauth(zk_emulator, raw_client, udp):
    raw = raw_client(zk_emulator(small_state(), comm_key=5), udp=udp)
    assert raw.call(CMD_GET_VERSION).command == CMD_ACK_UNAUTH
    connected = raw.connect()
    assert connected.command == CMD_ACK_UNAUTH and connected.session_id != 0
    assert raw.call(CMD_GET_VERSION).command == CMD_ACK_UNAUTH
    assert raw.call(1102, make_commkey(5, raw.session_id)).command == CMD_ACK_OK
    assert raw.call(CMD_GET_VERSION).payload == b"Ver 6.60 Apr 28 2017\0"


@TRANSPORTS
def test_unknown_option_keys_make_pyzk_return_nothing_without_losing_sync(zk_emulator, udp):
    state = small_state()
    state.options.update({"~ExtendFmt": None, "~DeviceName": None, "FaceFunOn": None})
    conn = connect(zk_emulator(state), udp=udp)
    # Each failed read makes pyzk send ACK_ERROR + 3 ACK_UNKNOWN as commands and
    # wait for one reply to each: one reply too many or too few desyncs it.
    assert conn.get_extend_fmt() is None
    assert conn.get_face_fun_on() is None
    assert conn.get_device_name() == ""
    assert conn.get_serialnumber() == "EMU0001"
    assert conn.get_pin_width() == 9


def test_reply_codes_sent_as_commands_get_one_reply_and_ack_ok_gets_none(zk_emulator, raw_client):
    raw = raw_client(zk_emulator())
    raw.connect()
    for code in (CMD_ACK_ERROR, CMD_ACK_UNKNOWN, CMD_ACK_UNKNOWN, CMD_ACK_UNKNOWN):
        assert raw.call(code, b"~ExtendFmt\0").command == CMD_ACK_UNKNOWN
    raw.send(CMD_ACK_OK, reply_id=0)
    assert raw.call(CMD_GET_VERSION).command == CMD_ACK_OK  # the next reply is this one
    assert raw.call(4321).command == CMD_ACK_UNKNOWN
    with pytest.raises(TimeoutError):
        raw.receive(timeout=0.3)


def test_option_keys_are_read_with_or_without_nul_and_written_ones_are_kept(
    zk_emulator, raw_client
):
    emu = zk_emulator()
    raw = raw_client(emu)
    raw.connect()
    assert raw.call(CMD_OPTIONS_RRQ, b"~SerialNumber").payload == b"~SerialNumber=EMU0001\0"
    assert raw.call(CMD_OPTIONS_RRQ, b"~OS\0").payload == b"~OS=1\0"
    assert raw.call(CMD_OPTIONS_RRQ, b"NoSuchKey\0").command == CMD_ACK_ERROR
    assert len(raw.call(CMD_GET_FREE_SIZES).payload) == 92
    conn = connect(emu)
    assert conn.set_sdk_build_1() is True
    assert emu.state.options["SDKBuild"] == "1"
    assert raw.call(CMD_OPTIONS_RRQ, b"SDKBuild\0").payload == b"SDKBuild=1\0"


@TRANSPORTS
def test_set_user_upserts_by_uid_and_delete_user_removes_user_and_fingers(zk_emulator, udp):
    state = small_state()
    emu = zk_emulator(state)
    conn = connect(emu, udp=udp)
    conn.set_user(
        uid=40, name="Rita Lee", privilege=14, password="1234", user_id="2040", card=7654321
    )
    added = {u.uid: u for u in conn.get_users()}[40]
    assert (added.user_id, added.name, added.privilege, added.password, added.card) == (
        "2040",
        "Rita Lee",
        14,
        "1234",
        7654321,
    )
    conn.set_user(uid=40, name="Rita", user_id="2040")
    users = conn.get_users()
    assert len(users) == 11 and {u.uid: u for u in users}[40].name == "Rita"

    emu.state.upsert_template(FingerTemplate(uid=40, fid=0, valid=1, template=b"\x05" * 300))
    conn.delete_user(uid=40)
    assert 40 not in {u.uid for u in conn.get_users()}
    assert emu.state.find_template(40, 0) is None


@pytest.mark.parametrize("udp, record_size", [(False, 28), (True, 72)], ids=["tcp-28", "udp-72"])
def test_user_write_takes_either_record_size_on_either_transport(zk_emulator, udp, record_size):
    emu = zk_emulator(small_state())
    conn = connect(emu, udp=udp)
    conn.user_packet_size = record_size
    conn.set_user(uid=50, name="Zé", user_id="2050", card=42)
    written = next(u for u in emu.state.users if u.uid == 50)
    assert (written.user_id, written.name, written.card) == ("2050", "Zé", 42)


@TRANSPORTS
def test_set_time_moves_the_device_clock(zk_emulator, udp):
    emu = zk_emulator(small_state())
    conn = connect(emu, udp=udp)
    target = datetime(2024, 2, 29, 23, 59, 58)
    assert conn.set_time(target) is True
    assert target <= conn.get_time() <= target + timedelta(seconds=3)
    assert abs(emu.device_now() - target) < timedelta(seconds=5)


def test_clock_offset_shifts_the_device_clock(zk_emulator):
    conn = connect(zk_emulator(small_state(), clock_offset=-3600))
    drift = conn.get_time() - datetime.now()
    assert timedelta(seconds=-3603) <= drift <= timedelta(seconds=-3597)


@TRANSPORTS
def test_clear_attendance_empties_the_log(zk_emulator, udp):
    emu = zk_emulator(small_state())
    conn = connect(emu, udp=udp)
    assert conn.clear_attendance() is True
    conn.read_sizes()
    assert conn.records == 0
    assert conn.get_attendance() == []
    assert len(conn.get_users()) == 10


def test_clear_data_wipes_users_log_and_fingerprints(zk_emulator, raw_client):
    # pyzk 0.9's clear_data() cannot send (str + bytes), so this goes by hand.
    emu = zk_emulator(small_state())
    raw = raw_client(emu)
    raw.connect()
    assert raw.call(CMD_CLEAR_DATA).command == CMD_ACK_OK
    assert (emu.state.users, emu.state.attendance, emu.state.templates) == ([], [], [])


def test_housekeeping_commands_are_acknowledged(zk_emulator):
    conn = connect(zk_emulator())
    assert conn.refresh_data() is True
    assert conn.test_voice(index=0) is True
    assert conn.unlock(time=3) is True
    assert conn.cancel_capture() is True
    assert conn.verify_user() is True
    assert conn.free_data() is True  # even with no buffer open
    assert conn.reg_event(0) is None


def test_door_reads_unlocked_only_after_unlock_and_lcd_commands_are_acknowledged(
    zk_emulator, raw_client
):
    raw = raw_client(zk_emulator())
    raw.connect()
    assert raw.call(CMD_DOORSTATE_RRQ).command == CMD_ACK_ERROR
    assert raw.call(CMD_UNLOCK, struct.pack("<I", 30)).command == CMD_ACK_OK
    assert raw.call(CMD_DOORSTATE_RRQ).command == CMD_ACK_OK
    assert raw.call(CMD_WRITE_LCD, struct.pack("<hb", 1, 0) + b" Hello").command == CMD_ACK_OK
    assert raw.call(CMD_CLEAR_LCD).command == CMD_ACK_OK


def test_restart_closes_the_connection_and_the_device_comes_back_enabled(zk_emulator, raw_client):
    emu = zk_emulator()
    raw = raw_client(emu)
    raw.connect()
    emu.enabled = False
    assert raw.call(CMD_RESTART).command == CMD_ACK_OK
    with pytest.raises(ConnectionError):
        raw.receive()
    assert emu.enabled is True
    assert connect(emu).restart() is True
    assert connect(emu).poweroff() is True
    assert connect(emu).get_serialnumber() == "EMU0001"


@TRANSPORTS
def test_templates_read_back_including_one_too_big_for_a_datagram(zk_emulator, udp):
    state = small_state()
    big = FingerTemplate(uid=2, fid=3, valid=1, template=bytes(range(256)) * 6 + b"\x07")
    state.upsert_template(big)
    conn = connect(zk_emulator(state), udp=udp)
    assert sorted((t.uid, t.fid, t.template) for t in conn.get_templates()) == sorted(
        (t.uid, t.fid, t.template) for t in state.templates
    )
    assert conn.get_user_template(uid=2, temp_id=3).template == big.template
    assert conn.get_user_template(uid=2, temp_id=9) is None
    assert conn.delete_user_template(uid=2, temp_id=3) is True
    assert state.find_template(2, 3) is None
    assert conn.delete_user_template(uid=2, temp_id=3) is False


@TRANSPORTS
def test_save_user_template_uploads_user_and_fingerprint(zk_emulator, udp):
    emu = zk_emulator(small_state())
    conn = connect(emu, udp=udp)
    user = User(uid=60, name="Nova", privilege=0, password="", group_id="", user_id="2060")
    finger = Finger(uid=60, fid=1, valid=1, template=b"\x11" * 1500 + b"\x01")
    conn.save_user_template(user, [finger])
    assert emu.state.user_by_user_id("2060").uid == 60
    assert emu.state.find_template(60, 1).template == finger.template


def test_free_sizes_grow_the_record_capacity_with_a_log_past_it(zk_emulator):
    state = small_state(punches=10)
    state.attendance = state.attendance * 10_010  # 100 100 records
    conn = connect(zk_emulator(state))
    conn.read_sizes()
    assert conn.records == 100_100
    assert conn.rec_cap >= conn.records and conn.rec_av == conn.rec_cap - conn.records


@pytest.fixture(scope="module")
def log_of_100k():
    return DeviceState.generate(users=50, punches=100_000, days=150, seed=7, now=NOW)


@pytest.mark.parametrize(
    "udp, chunked",
    [(False, False), (False, True), (True, False)],
    ids=["tcp-one-frame", "tcp-chunked", "udp"],
)
def test_a_100k_record_log_reads_back_exactly(zk_emulator, log_of_100k, udp, chunked):
    conn = connect(zk_emulator(log_of_100k, chunked=chunked), udp=udp, timeout=10)
    records = run_bounded(conn.get_attendance, 120)
    assert_same_log(as_tuples(records), as_tuples(log_of_100k.attendance))
    conn.disconnect()


def capture_live(conn, *, wanted: int, max_idle: int = 10) -> list:
    """Runs pyzk's live_capture until `wanted` events or `max_idle` silent seconds."""
    events, idle = [], 0
    for event in conn.live_capture(new_timeout=1):
        if event is None:
            idle += 1
        else:
            events.append(event)
        if len(events) >= wanted or idle >= max_idle:
            conn.end_live_capture = True  # lets pyzk unregister (REG_EVENT 0)
    return events


@TRANSPORTS
def test_live_capture_receives_a_pushed_punch(zk_emulator, udp):
    emu = zk_emulator(small_state())
    conn = connect(emu, udp=udp)
    punched_at = datetime(2026, 11, 2, 9, 15, 30)

    def punch_once_listening():
        deadline = time.monotonic() + 10
        while not emu.event_listeners() and time.monotonic() < deadline:
            time.sleep(0.02)
        emu.push_punch("1003", punched_at, status=15, punch=1)

    pusher = threading.Thread(target=punch_once_listening)
    pusher.start()
    events = capture_live(conn, wanted=1)
    pusher.join()
    assert as_tuples(events) == [("1003", punched_at, 15, 1)]
    assert emu.event_listeners() == 0
    assert as_tuples(conn.get_attendance())[-1] == ("1003", punched_at, 15, 1)
    assert conn.disconnect() is True


def test_generating_a_weekend_only_window_gives_the_punches_asked_for():
    sunday = datetime(2026, 12, 6, 12, 0)
    state = DeviceState.generate(users=1, punches=3, days=1, seed=2, now=sunday)
    assert len(state.attendance) == 3
    assert all(record.timestamp <= sunday for record in state.attendance)


def test_live_interval_punches_into_the_log_with_no_client_listening(zk_emulator):
    emu = zk_emulator(small_state(), live_interval=0.1)
    deadline = time.monotonic() + 10
    while len(emu.state.attendance) < 302 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.event_listeners() == 0
    assert len(emu.state.attendance) >= 302
    users = {user.user_id for user in emu.state.users}
    assert {record.user_id for record in emu.state.attendance[300:]} <= users


def test_live_interval_makes_no_punch_while_the_device_is_disabled(zk_emulator):
    emu = zk_emulator(small_state(), live_interval=0.05)
    conn = connect(emu)
    conn.disable_device()
    time.sleep(0.1)  # a punch already past the enabled check lands first
    settled = len(emu.state.attendance)
    time.sleep(0.4)
    assert len(emu.state.attendance) == settled
    conn.enable_device()
    conn.disconnect()
    deadline = time.monotonic() + 10
    while len(emu.state.attendance) == settled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(emu.state.attendance) > settled


@TRANSPORTS
def test_live_interval_punches_are_pushed_to_a_listening_client(zk_emulator, udp):
    emu = zk_emulator(small_state(), live_interval=0.2)
    conn = connect(emu, udp=udp)
    events = capture_live(conn, wanted=2)
    assert len(events) == 2
    log = as_tuples(conn.get_attendance())
    assert set(as_tuples(events)) <= set(log[300:])


@pytest.mark.parametrize("udp, size", [(False, 52), (True, 12)], ids=["tcp", "udp"])
def test_event_frames_have_the_event_layout_and_stop_after_reg_event_0(
    zk_emulator, raw_client, udp, size
):
    emu = zk_emulator()
    raw = raw_client(emu, udp=udp)
    raw.connect()
    assert raw.call(CMD_REG_EVENT, struct.pack("<I", 1)).command == CMD_ACK_OK
    emu.push_punch("1002", datetime(2026, 11, 2, 8, 1, 7), status=15, punch=0)
    event = raw.receive()
    assert (event.command, event.session_id, event.reply_id, len(event.payload)) == (
        CMD_REG_EVENT,
        1,
        0,
        size,
    )
    timehex = event.payload[6:12] if udp else event.payload[26:32]
    assert timehex == bytes((26, 11, 2, 8, 1, 7))
    raw.send(CMD_ACK_OK, reply_id=0)
    assert raw.call(CMD_REG_EVENT, struct.pack("<I", 1)).command == CMD_ACK_OK

    # Two punches at once: the second waits for the client's ACK_OK, which
    # comes together with REG_EVENT 0, so the second must never be sent.
    emu.push_punch("1003")
    emu.push_punch("1004")
    assert raw.receive().command == CMD_REG_EVENT
    raw.send(CMD_ACK_OK, reply_id=0)
    assert raw.call(CMD_REG_EVENT, struct.pack("<I", 0)).command == CMD_ACK_OK
    emu.push_punch("1002")
    with pytest.raises(TimeoutError):
        raw.receive(timeout=0.5)


@TRANSPORTS
def test_chunked_reads_send_prepare_data_then_ack_for_each_1504(zk_emulator, raw_client, udp):
    state = small_state(punches=2000)
    raw = raw_client(zk_emulator(state, chunked=True), udp=udp)
    raw.connect()
    record_size = 16 if udp else 40
    size = 4 + 2000 * record_size
    announced = raw.call(1503, struct.pack("<bhii", 1, 13, 0, 0))
    assert (announced.command, announced.payload) == (
        CMD_ACK_OK,
        struct.pack("<BIII", 0, size, size, 0),
    )
    blob = b""
    for start in range(0, size, 30_000):
        length = min(30_000, size - start)
        prepare = raw.call(1504, struct.pack("<ii", start, length))
        # pyzk skips exactly 8 bytes of PREPARE_DATA payload before the data.
        assert (prepare.command, prepare.payload) == (1500, struct.pack("<II", length, 1008))
        frames = [raw.receive()]
        while frames[-1].command == 1501:
            frames.append(raw.receive())
        assert frames[-1] == Reply(CMD_ACK_OK, raw.session_id, raw.reply_id, b"")
        pieces = [f.payload for f in frames[:-1]]
        # TCP: one DATA frame per chunk (pyzk recv()s once per frame); UDP:
        # datagrams that fit pyzk's recv(1032).
        assert all(len(p) <= 1024 for p in pieces) if udp else len(pieces) == 1
        assert {f.reply_id for f in frames} == {raw.reply_id}
        blob += b"".join(pieces)
    assert struct.unpack_from("<I", blob)[0] == size - 4 and len(blob) == size
    assert raw.call(1502).command == CMD_ACK_OK
    assert raw.call(1504, struct.pack("<ii", 0, 100)).command == CMD_ACK_ERROR


@TRANSPORTS
@pytest.mark.parametrize("size", [8, 16, 40, 49])
def test_record_size_serves_that_attendance_layout_on_either_transport(zk_emulator, udp, size):
    state = small_state(punches=50)
    conn = connect(zk_emulator(state, record_size=size), udp=udp)
    conn.read_sizes()
    buffer, _ = conn.read_with_buffer(13, 0)
    assert struct.unpack_from("<I", buffer)[0] == 50 * size
    uids = {user.uid: user.user_id for user in state.users}
    punches = decode_attendance(buffer, 50, user_ids_by_uid=uids)
    assert [(p.user_id, p.timestamp, p.status, p.punch, p.problem) for p in punches] == [
        (*record, None) for record in as_tuples(state.attendance)
    ]


def test_8_byte_records_of_a_user_id_with_no_user_carry_it_as_their_uid(zk_emulator):
    state = small_state(users=2, punches=0)
    state.add_punch(user_id="17", timestamp=NOW)
    conn = connect(zk_emulator(state, record_size=8))
    conn.read_sizes()
    buffer, _ = conn.read_with_buffer(13, 0)
    assert struct.unpack_from("<H", buffer, 4)[0] == 17


@TRANSPORTS
def test_names_are_stored_in_the_emulator_encoding(zk_emulator, udp):
    state = small_state(users=2, punches=0)
    state.users[0].name = "Иван"
    emu = zk_emulator(state, encoding="cp1251")
    conn = ZK(
        emu.host, port=emu.port, timeout=5, force_udp=udp, ommit_ping=True, encoding="cp1251"
    ).connect()
    assert conn.get_users()[0].name == "Иван"
    conn.set_user(uid=9, name="Олег", user_id="1009")
    assert emu.state.user_by_user_id("1009").name == "Олег"
    as_utf8 = connect(emu, udp=udp)
    buffer, _ = as_utf8.read_with_buffer(9, 5)
    assert "Иван".encode("cp1251") in buffer and "Иван".encode() not in buffer


@TRANSPORTS
def test_punch_during_read_waits_for_the_enable_on_a_disabled_clock(zk_emulator, udp):
    emu = zk_emulator(small_state(punches=20), punch_during_read=True)
    conn = connect(emu, udp=udp)
    conn.read_sizes()  # enabled: the punch is made at once
    assert len(emu.state.attendance) == 21
    conn.disable_device()
    conn.read_sizes()
    assert conn.records == 21
    assert (len(emu.state.attendance), emu.waiting_punches()) == (21, 1)
    conn.enable_device()
    assert (len(emu.state.attendance), emu.waiting_punches()) == (22, 0)
    assert emu.punches_during_read == 2
    assert emu.enable_log == ["disable", "enable"]


@TRANSPORTS
def test_punch_during_read_with_ignore_disable_records_between_chunks(zk_emulator, udp):
    # 2000 records: two 1504 chunks over TCP (40-byte records) and UDP (16-byte).
    state = small_state(punches=2000)
    emu = zk_emulator(state, punch_during_read=True, ignore_disable=True, chunked=True)
    conn = connect(emu, udp=udp)
    conn.disable_device()
    conn.read_sizes()
    assert conn.records == 2000 and len(emu.state.attendance) == 2001
    buffer, _ = conn.read_with_buffer(13, 0)
    # The read served the log as it was at 1503; one more punch came between the chunks.
    assert struct.unpack_from("<I", buffer)[0] == 2001 * (16 if udp else 40)
    assert len(emu.state.attendance) == 2002
    punches = [(r.user_id, r.timestamp) for r in emu.state.attendance[2000:]]
    assert len(set(punches)) == 2 and punches[0][1] < punches[1][1]


# --- Faults -------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["one-frame", "chunked"])
def test_drop_after_bytes_breaks_the_download_and_the_device_keeps_serving(zk_emulator, chunked):
    emu = zk_emulator(small_state(users=20, punches=5000), drop_after_bytes=50_000, chunked=chunked)
    conn = connect(emu)
    with pytest.raises(BROKEN_CONNECTION):
        run_bounded(conn.get_attendance, 30)
    fresh = connect(emu)
    fresh.read_sizes()
    assert fresh.records == 5000
    assert fresh.get_serialnumber() == "EMU0001"


def test_stall_after_bytes_hangs_mid_download_and_the_device_keeps_serving(zk_emulator):
    emu = zk_emulator(small_state(users=20, punches=5000), stall_after_bytes=50_000)
    conn = ZK(emu.host, port=emu.port, timeout=1, ommit_ping=True).connect()
    started = time.monotonic()
    with pytest.raises((TimeoutError, ZKNetworkError)):
        run_bounded(conn.get_attendance, 30)
    assert time.monotonic() - started >= 1  # it waited for data that never came
    fresh = connect(emu)
    fresh.read_sizes()
    assert fresh.records == 5000


def test_delay_ms_slows_every_reply(zk_emulator):
    emu = zk_emulator(delay_ms=150)
    started = time.monotonic()
    conn = connect(emu)
    conn.get_firmware_version()
    conn.disconnect()
    assert time.monotonic() - started >= 3 * 0.150


@TRANSPORTS
def test_silent_device_makes_pyzk_connect_time_out(zk_emulator, udp):
    emu = zk_emulator(silent=True)
    with pytest.raises(ZKNetworkError, match="timed out"):
        connect(emu, udp=udp, timeout=1)


def test_garbage_never_disturbs_a_well_behaved_client(zk_emulator, raw_client):
    emu = zk_emulator(small_state(punches=2000))
    good = connect(emu)
    rng = random.Random(99)
    for _ in range(5):
        with socket.create_connection((emu.host, emu.port), timeout=3) as sock:
            sock.sendall(rng.randbytes(rng.randint(1, 3000)))
    raw = raw_client(emu)
    raw.send_bytes(rng.randbytes(100))
    raw.send_bytes(TCP_MAGIC + struct.pack("<I", 4) + b"\x01\x02\x03\x04")  # no room for a header
    raw.send_bytes(TCP_MAGIC + b"\xff\xff\xff\xff")  # a length no client sends
    assert raw.call(4321).command == CMD_ACK_UNAUTH  # framing recovered, not yet connected
    raw.connect()
    assert raw.call(4321).command == CMD_ACK_UNKNOWN

    noise = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for size in (0, 1, 7, 8, 9, 100, 2000):
        noise.sendto(rng.randbytes(size), (emu.host, emu.port))
    noise.close()
    datagrams = raw_client(emu, udp=True)
    datagrams.connect()
    bad_checksum = bytearray(build_packet(CMD_GET_VERSION, datagrams.session_id, 7))
    bad_checksum[2] ^= 0xFF
    datagrams.send_bytes(bytes(bad_checksum))
    assert datagrams.receive().payload == b"Ver 6.60 Apr 28 2017\0"

    assert len(good.get_attendance()) == 2000
    assert len(connect(emu, udp=True).get_attendance()) == 2000


def test_concurrent_clients_each_read_the_full_log(zk_emulator):
    state = small_state(users=30, punches=5000)
    expected = as_tuples(state.attendance)
    one_frame, chunked = zk_emulator(state), zk_emulator(state, chunked=True)
    clients = [(one_frame, False)] * 3 + [(chunked, False)] * 2 + [(one_frame, True)] * 3
    results: dict[int, object] = {}

    def read(index, emu, udp):
        try:
            conn = connect(emu, udp=udp, timeout=10)
            results[index] = as_tuples(conn.get_attendance())
            conn.disconnect()
        except Exception as exc:  # reported by the assertion below
            results[index] = exc

    threads = [
        threading.Thread(target=read, args=(i, emu, udp), daemon=True)
        for i, (emu, udp) in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(len(clients)))
    for result in results.values():
        assert not isinstance(result, Exception), result
        assert_same_log(result, expected)


def test_stop_closes_every_socket_and_thread():
    before = set(threading.enumerate())
    emu = ZKEmulator(small_state(), port=0).start()
    tcp = connect(emu)
    connect(emu, udp=True)
    emu.stop()
    assert not [t.name for t in set(threading.enumerate()) - before]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((emu.host, emu.port), timeout=1)
    with pytest.raises(ZKNetworkError):
        tcp.get_firmware_version()


def test_tcp_and_udp_share_one_port_and_port_zero_picks_a_free_one(zk_emulator, raw_client):
    first, second = zk_emulator(), zk_emulator()
    assert first.port != second.port and first.port > 0
    for udp in (False, True):
        assert raw_client(first, udp=udp).connect().command == CMD_ACK_OK


# --- Device data --------------------------------------------------------------------


def test_generation_is_deterministic_for_a_seed():
    first = DeviceState.generate(users=40, punches=3000, days=30, seed=9, now=NOW).to_dict()
    again = DeviceState.generate(users=40, punches=3000, days=30, seed=9, now=NOW).to_dict()
    other = DeviceState.generate(users=40, punches=3000, days=30, seed=10, now=NOW).to_dict()
    assert first == again
    assert first["attendance"] != other["attendance"]


@pytest.mark.parametrize(
    "users, punches, days",
    [(50, 5000, 30), (500, 100_000, 30), (5, 20, 60), (3, 1000, 1), (1, 0, 1)],
)
def test_generation_makes_exactly_the_requested_punches_within_the_window(users, punches, days):
    state = DeviceState.generate(users=users, punches=punches, days=days, seed=2, now=NOW)
    assert len(state.attendance) == punches
    assert [u.user_id for u in state.users] == [str(1000 + uid) for uid in range(1, users + 1)]
    known = {u.user_id for u in state.users}
    stamps = [r.timestamp for r in state.attendance]
    assert stamps == sorted(stamps)
    assert all(NOW - timedelta(days=days) <= t <= NOW for t in stamps)
    assert all(r.user_id in known and r.status in (1, 15) for r in state.attendance)


def test_generation_over_a_weekend_only_window_still_makes_its_punches():
    sunday_noon = datetime(2026, 12, 6, 12, 0, 0)
    state = DeviceState.generate(users=1, punches=1, days=1, seed=2, now=sunday_noon)
    assert len(state.attendance) == 1
    assert sunday_noon - timedelta(days=1) <= state.attendance[0].timestamp <= sunday_noon


def test_generated_log_looks_like_a_real_one():
    state = DeviceState.generate(users=60, punches=5000, days=90, seed=3, now=NOW)
    log = state.attendance
    assert {r.status for r in log} == {1, 15}
    assert {r.punch for r in log} == {0, 1}  # this density needs no break punches
    day_ins = [r.timestamp for r in log if r.punch == 0 and 5 <= r.timestamp.hour < 12]
    assert all(6 <= t.hour <= 9 for t in day_ins)
    assert sum(1 for t in day_ins if t.weekday() >= 5) < len(day_ins) * 0.05
    night_ins = [r for r in log if r.punch == 0 and r.timestamp.hour >= 21]
    night_outs = [r for r in log if r.punch == 1 and 5 <= r.timestamp.hour < 7]
    assert night_ins and night_outs
    previous = {}
    double_taps = 0
    for r in log:
        last = previous.get(r.user_id)
        if last and r.timestamp - last.timestamp <= timedelta(seconds=30):
            double_taps += 1
        previous[r.user_id] = r
    assert 0 < double_taps < len(log) * 0.05
    assert all(len(u.name.split()) == 2 for u in state.users)
    assert state.templates and all(len(t.template) >= 480 for t in state.templates)


def test_device_file_round_trips_through_json(tmp_path):
    state = small_state()
    state.options["~ExtendFmt"] = None
    state.add_punch(user_id="1001", timestamp=datetime(2026, 11, 2, 8, 1, 7), status=1, punch=0)
    path = tmp_path / "device.json"
    state.to_json(path)
    written = json.loads(path.read_text())
    assert written["attendance"][-1] == {
        "user_id": "1001",
        "timestamp": "2026-11-02 08:01:07",
        "status": 1,
        "punch": 0,
    }
    assert set(written["users"][0]) == {
        "uid", "user_id", "name", "privilege", "password", "card", "group_id",
    }  # fmt: skip
    assert DeviceState.from_json(path).to_dict() == state.to_dict()


def test_documented_device_file_loads():
    state = DeviceState.from_dict(
        {
            "serial_number": "EMU0001",
            "firmware": "Ver 6.60 Apr 28 2017",
            "device_name": "K40",
            "platform": "ZMM220_TFT",
            "comm_key": 0,
            "users": [
                {
                    "uid": 1,
                    "user_id": "1001",
                    "name": "Ana Silva",
                    "privilege": 0,
                    "password": "",
                    "card": 0,
                    "group_id": "",
                }
            ],
            "attendance": [
                {"user_id": "1001", "timestamp": "2026-11-02 08:01:07", "status": 1, "punch": 0}
            ],
        }
    )
    assert state.users[0].name == "Ana Silva"
    assert as_tuples(state.attendance) == [("1001", datetime(2026, 11, 2, 8, 1, 7), 1, 0)]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"users": [{"uid": "one", "user_id": "1001"}]}, r"users\[0\]\.uid"),
        ({"users": [{"uid": 1, "user_id": "1"}, {"uid": 1, "user_id": "2"}]}, "used twice"),
        ({"attendance": [{"user_id": "1001"}]}, r"attendance\[0\]: missing timestamp"),
        ({"attendance": [{"user_id": "1", "timestamp": "02/11/2026"}]}, "YYYY-MM-DD"),
        ({"attendance": [{"user_id": "1", "timestamp": "2101-01-01 00:00:00"}]}, "2000-2099"),
        ({"templates": [{"uid": 1, "fid": 0, "template": "zz"}]}, "hex"),
        ({"comm_key": -1}, "comm_key"),
    ],
)
def test_bad_device_file_names_the_wrong_field(change, message):
    with pytest.raises(ValueError, match=message):
        DeviceState.from_dict({"users": [], "attendance": [], **change})


# --- The command --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "/nonexistent/device.json"], "Cannot read --data"),
        (["--data", "device.json", "--users", "3"], "drop --users"),
        (["--users", "0"], "users"),
        (["--live-interval", "0"], "live_interval"),
        (["--delay-ms", "-5"], "delay_ms"),
        (["--encoding", "klingon"], "unknown encoding 'klingon'"),
        (["--record-size", "12"], "invalid choice: 12"),
        (["--port", "70000"], "port"),
        (["--clock-offset", "1e10"], "2000-2099"),
    ],
)
def test_command_rejects_bad_options_with_a_clear_error(argv, message):
    with pytest.raises(CommandError, match=message):
        call_command("zk_emulator", *argv)


def test_command_reports_an_invalid_device_file(tmp_path):
    path = tmp_path / "device.json"
    path.write_text('{"users": [{"uid": 1}]}')
    with pytest.raises(CommandError, match=r"not a valid device file: users\[0\]: missing user_id"):
        call_command("zk_emulator", "--data", str(path))


def test_command_reports_a_port_in_use(zk_emulator):
    taken = zk_emulator().port
    with pytest.raises(CommandError, match=f"Cannot listen on 127.0.0.1:{taken}"):
        call_command("zk_emulator", "--port", str(taken), "--users", "2", "--punches", "5")


def test_command_serves_pyzk_and_stops_cleanly_on_ctrl_c(tmp_path):
    saved = tmp_path / "device.json"
    argv = ["--port", "0", "--users", "5", "--punches", "40", "--seed", "3", "--save", str(saved)]
    log = tmp_path / "stderr.txt"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "zk_emulator", *argv, "-v", "2"],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    ).start()
    try:
        banner = []
        while not banner or not banner[-1].startswith("Ctrl-C"):
            banner.append(lines.get(timeout=30))
        port = int(banner[0].split(":")[1].split()[0])
        conn = ZK("127.0.0.1", port=port, timeout=5, ommit_ping=True).connect()
        assert len(conn.get_attendance()) == 40
        conn.disconnect()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    errors = log.read_text()
    assert process.returncode == 0, errors
    assert "5 users, 40 attendance records" in banner[1]
    assert "CMD_PREPARE_BUFFER (1503), 11 payload bytes" in errors
    assert len(DeviceState.from_json(saved).attendance) == 40
    assert lines.get(timeout=5).strip() == "Emulator stopped."


def test_command_serves_the_encoding_record_size_and_read_fault_it_is_given(tmp_path):
    argv = ["--port", "0", "--users", "3", "--punches", "10", "--seed", "3"]
    argv += ["--encoding", "cp1251", "--record-size", "49", "--punch-during-read"]
    argv += ["--ignore-disable"]
    process = subprocess.Popen(
        [sys.executable, "manage.py", "zk_emulator", *argv],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    ).start()
    try:
        banner = []
        while not banner or not banner[-1].startswith("Ctrl-C"):
            banner.append(lines.get(timeout=30))
        port = int(banner[0].split(":")[1].split()[0])
        conn = ZK("127.0.0.1", port=port, timeout=5, ommit_ping=True).connect()
        conn.disable_device()
        conn.read_sizes()
        first = conn.records
        buffer, _ = conn.read_with_buffer(13, 0)
        conn.read_sizes()
        # Recorded although disabled, just after the first count was read.
        assert (first, conn.records) == (10, 11)
        assert struct.unpack_from("<I", buffer)[0] == 11 * 49
        conn.enable_device()
        conn.disconnect()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    text = "".join(banner)
    assert "TCP: 72-byte users, 49-byte records" in text
    assert "UDP: 28-byte users, 49-byte records" in text
    assert "user names in cp1251" in text
    assert "faults: punches during reads (recorded while disabled)" in text
