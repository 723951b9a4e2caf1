"""Polling devices into RawAttendance, over real loopback sockets to the emulator."""

import datetime
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.ingest import (
    DeviceBusy,
    device_lease_claim,
    device_poll,
    device_sync_time,
    device_test,
    devices_poll,
)
from core.models import Device, Employee, RawAttendance
from core.tests.factories import DeviceFactory, EmployeeFactory
from core.zk.client import DeviceError
from core.zk.emulator import DeviceState, ZKEmulator

pytestmark = pytest.mark.django_db

UTC = datetime.UTC


def state_with(punches, *, users=("1001", "1002")) -> DeviceState:
    """A device holding exactly these (user_id, naive local time) punches."""
    return DeviceState.from_dict(
        {
            "serial_number": "EMU-TEST",
            "firmware": "Ver 6.60 Apr 28 2017",
            "device_name": "K40",
            "platform": "ZMM220_TFT",
            "comm_key": 0,
            "users": [
                {
                    "uid": index + 1,
                    "user_id": user_id,
                    "name": f"Person {user_id}",
                    "privilege": 0,
                    "password": "",
                    "card": 0,
                    "group_id": "",
                }
                for index, user_id in enumerate(users)
            ],
            "attendance": [
                {
                    "user_id": user_id,
                    "timestamp": moment.strftime("%Y-%m-%d %H:%M:%S"),
                    "status": 1,
                    "punch": index % 2,
                }
                for index, (user_id, moment) in enumerate(punches)
            ],
        }
    )


def day_punches(count: int, *, start=datetime.datetime(2026, 11, 2, 8, 0)) -> list:
    return [
        ("1001" if i % 2 else "1002", start + datetime.timedelta(minutes=i)) for i in range(count)
    ]


@contextmanager
def emulated(state: DeviceState, **device_fields):
    with ZKEmulator(state, host="127.0.0.1", port=0, **device_fields.pop("emulator", {})) as emu:
        device = DeviceFactory(ip_address=emu.host, port=emu.port, **device_fields)
        yield emu, device


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stored(device: Device) -> list[tuple]:
    return list(
        RawAttendance.objects.filter(device=device)
        .order_by("timestamp", "user_id")
        .values_list("user_id", "timestamp", "punch_state")
    )


# --- Round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_punches_round_trip_exactly_as_utc(protocol):
    punches = day_punches(30)
    with emulated(state_with(punches), protocol=protocol) as (_emu, device):
        result = device_poll(device=device)

    assert result.ok, result.error
    assert (result.new, result.duplicates, result.suspect) == (30, 0, 0)
    expected = sorted(
        (user_id, moment.replace(tzinfo=UTC), index % 2)
        for index, (user_id, moment) in enumerate(punches)
    )
    assert sorted(stored(device)) == expected


def test_device_in_a_dst_zone_converts_local_times_to_utc_across_both_changes():
    lisbon = [
        ("1001", datetime.datetime(2026, 3, 29, 0, 30)),  # WET, UTC+0
        ("1001", datetime.datetime(2026, 3, 29, 1, 30)),  # skipped hour: offset before the gap
        ("1001", datetime.datetime(2026, 7, 1, 8, 0)),  # WEST, UTC+1
        ("1001", datetime.datetime(2026, 10, 25, 1, 30)),  # repeated hour: first occurrence
        ("1001", datetime.datetime(2026, 10, 25, 2, 30)),  # WET again
    ]
    with emulated(state_with(lisbon), timezone="Europe/Lisbon") as (_emu, device):
        device_poll(device=device)

    assert [row[1] for row in stored(device)] == [
        datetime.datetime(2026, 3, 29, 0, 30, tzinfo=UTC),
        datetime.datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        datetime.datetime(2026, 7, 1, 7, 0, tzinfo=UTC),
        datetime.datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime.datetime(2026, 10, 25, 2, 30, tzinfo=UTC),
    ]


def test_device_users_become_employees_linked_to_the_device():
    with emulated(state_with(day_punches(2), users=("1001", "1002", "2001"))) as (_emu, device):
        result = device_poll(device=device)

    assert result.users == 3
    assert set(device.employees.values_list("user_id", "name")) == {
        ("1001", "Person 1001"),
        ("1002", "Person 1002"),
        ("2001", "Person 2001"),
    }


def test_device_facts_and_clock_drift_are_recorded():
    state = state_with(day_punches(4))
    with emulated(state, emulator={"clock_offset": 120}) as (_emu, device):
        device_poll(device=device)

    device.refresh_from_db()
    assert device.serial_number == "EMU-TEST"
    assert device.firmware == "Ver 6.60 Apr 28 2017"
    assert (device.user_count, device.record_count) == (2, 4)
    assert device.record_capacity >= 4
    assert 110 <= device.clock_drift_seconds <= 130
    assert device.last_success_at is not None
    assert device.consecutive_failures == 0


# --- Idempotence -----------------------------------------------------------------------


def test_repoll_skips_duplicates_and_stores_only_new_punches():
    state = state_with(day_punches(10))
    with emulated(state) as (_emu, device):
        first = device_poll(device=device)
        for user_id, moment in day_punches(3, start=datetime.datetime(2026, 11, 3, 8, 0)):
            state.add_punch(user_id=user_id, timestamp=moment, status=1, punch=0)
        second = device_poll(device=device)

    assert (first.new, first.duplicates) == (10, 0)
    assert (second.new, second.duplicates, second.downloaded) == (3, 10, 13)
    assert RawAttendance.objects.filter(device=device).count() == 13


def test_repoll_of_unchanged_device_downloads_nothing():
    with emulated(state_with(day_punches(10))) as (_emu, device):
        device_poll(device=device)
        again = device_poll(device=device)

    assert again.ok and again.quick
    assert again.downloaded == 0
    assert RawAttendance.objects.filter(device=device).count() == 10


def test_full_download_is_forced_after_full_poll_hours_even_with_the_same_count(settings):
    # A log cleared and refilled to the same count looks unchanged to a quick poll.
    state = state_with(day_punches(4))
    with emulated(state) as (emu, device):
        device_poll(device=device)
        emu.state.clear_attendance()
        for user_id, moment in day_punches(4, start=datetime.datetime(2026, 11, 9, 8, 0)):
            state.add_punch(user_id=user_id, timestamp=moment, status=1, punch=0)
        quick = device_poll(device=device)
        Device.objects.filter(pk=device.pk).update(
            last_full_download_at=device.last_full_download_at
            - datetime.timedelta(hours=settings.FULL_POLL_HOURS)
        )
        device.refresh_from_db()
        full = device_poll(device=device)

    assert quick.quick and quick.new == 0
    assert not full.quick and full.new == 4
    assert RawAttendance.objects.filter(device=device).count() == 8


def test_poll_query_count_does_not_grow_with_the_number_of_punches():
    # Up to ingest.ARRAY_BATCH punches go in one statement, more through a
    # temporary table (five statements more): constant on each side.
    counts = []
    for size in (20, 900, 1200, 4000):
        with emulated(state_with(day_punches(size))) as (_emu, device):
            with CaptureQueriesContext(connection) as queries:
                result = device_poll(device=device)
        assert result.new == size
        counts.append(len(queries))
    assert counts[0] == counts[1] and counts[2] == counts[3]
    # create, COPY, savepoint, release, drop
    assert counts[3] - counts[0] <= (5 if connection.vendor == "postgresql" else 0)


# --- Suspect punches -------------------------------------------------------------------


def test_punches_with_impossible_times_are_kept_and_flagged():
    punches = [
        ("1001", datetime.datetime(2000, 1, 1, 0, 0, 5)),  # a reset clock
        ("1001", datetime.datetime.now() + datetime.timedelta(days=3)),  # noqa: DTZ005 device-local
        ("1002", datetime.datetime(2026, 11, 2, 8, 0)),
    ]
    with emulated(state_with(punches)) as (_emu, device):
        result = device_poll(device=device)

    assert (result.new, result.suspect) == (3, 2)
    reasons = list(
        RawAttendance.objects.filter(is_suspect=True).values_list("suspect_reason", flat=True)
    )
    assert len(reasons) == 2
    assert any("before 2001: the device clock was not set" in reason for reason in reasons)
    assert any("more than 1 day ahead of the server's time" in reason for reason in reasons)
    assert not RawAttendance.objects.get(user_id="1002").is_suspect


def server_local_now() -> datetime.datetime:
    """Now as a UTC-zone clock shows it (the test devices' zone)."""
    return datetime.datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def test_clock_reset_to_2000_before_the_poll_does_not_flag_the_real_punches_it_took():
    taken = server_local_now() - datetime.timedelta(hours=3)
    punches = [("1001", taken), ("1002", taken + datetime.timedelta(minutes=5))]
    # The power cut reset the clock to its factory date after the punches.
    reset = (datetime.datetime(2000, 1, 1, 1, 0) - server_local_now()).total_seconds()
    with emulated(state_with(punches), emulator={"clock_offset": reset}) as (_emu, device):
        result = device_poll(device=device)

    assert (result.new, result.suspect) == (2, 0)
    assert not RawAttendance.objects.filter(is_suspect=True).exists()
    device.refresh_from_db()
    assert device.clock_drift_seconds < -20 * 365 * 86400
    assert "the device clock is" in result.summary()
    assert "days behind the server's time" in result.summary()


def test_clock_set_years_ahead_makes_its_future_punches_suspect():
    ahead = 5 * 365 * 86400
    future = server_local_now() + datetime.timedelta(seconds=ahead, minutes=-10)
    punches = [("1001", future), ("1002", server_local_now() - datetime.timedelta(hours=1))]
    with emulated(state_with(punches), emulator={"clock_offset": ahead}) as (_emu, device):
        result = device_poll(device=device)

    assert (result.new, result.suspect) == (2, 1)
    suspect = RawAttendance.objects.get(is_suspect=True)
    assert suspect.user_id == "1001"
    assert "more than 1 day ahead of the server's time" in suspect.suspect_reason
    assert "days ahead of the server's time" in result.summary()


def test_suspect_future_tolerance_is_a_setting(settings):
    settings.SUSPECT_FUTURE_TOLERANCE = datetime.timedelta(hours=2)
    punches = [("1001", server_local_now() + datetime.timedelta(hours=3))]
    with emulated(state_with(punches)) as (_emu, device):
        result = device_poll(device=device)
    assert result.suspect == 1
    assert "more than 2 hours ahead" in RawAttendance.objects.get().suspect_reason


def test_a_punch_downloaded_again_is_judged_again_and_marked_revised(settings):
    settings.SUSPECT_FUTURE_TOLERANCE = datetime.timedelta(hours=1)
    later = server_local_now() + datetime.timedelta(hours=2)
    with emulated(state_with([("1001", later)])) as (_emu, device):
        first = device_poll(device=device)
        punch = RawAttendance.objects.get()
        assert (first.suspect, punch.is_suspect, punch.revised_at) == (1, True, None)

        # Three hours on, the same punch is no longer ahead of the server's time.
        with time_machine.travel(datetime.timedelta(hours=3)):
            second = device_poll(device=device, force_full=True)
            polled_at = timezone.now()

    assert (second.new, second.revised, second.suspect) == (0, 1, 0)
    assert "1 re-judged" in second.summary()
    punch.refresh_from_db()
    assert (punch.is_suspect, punch.suspect_reason) == (False, "")
    assert punch.revised_at is not None
    assert punch.revised_at <= polled_at
    assert punch.received_at < punch.revised_at


def test_downloading_the_same_log_again_revises_nothing():
    punches = [("1001", datetime.datetime(2000, 1, 1, 0, 0, 5)), *day_punches(5)]
    with emulated(state_with(punches)) as (_emu, device):
        device_poll(device=device)
        again = device_poll(device=device, force_full=True)
    assert (again.new, again.revised, again.duplicates) == (0, 0, 6)
    assert not RawAttendance.objects.filter(revised_at__isnull=False).exists()


def test_an_operator_verdict_survives_later_downloads():
    punches = [("1001", datetime.datetime(2000, 1, 1, 0, 0, 5))]
    with emulated(state_with(punches)) as (_emu, device):
        device_poll(device=device)
        RawAttendance.objects.update(
            suspect_override=False, is_suspect=False, suspect_reason="cleared by alice: checked"
        )
        again = device_poll(device=device, force_full=True)
    assert again.revised == 0
    punch = RawAttendance.objects.get()
    assert (punch.is_suspect, punch.suspect_reason) == (False, "cleared by alice: checked")


def test_a_record_the_device_logged_twice_is_stored_once():
    moment = datetime.datetime(2026, 11, 2, 8, 0)
    punches = [("1001", moment), ("1001", moment), ("1002", moment)]
    with emulated(state_with(punches)) as (_emu, device):
        result = device_poll(device=device)
        again = device_poll(device=device, force_full=True)
    assert (result.downloaded, result.new, result.duplicates) == (3, 2, 1)
    assert (again.new, again.revised) == (0, 0)
    assert RawAttendance.objects.count() == 2


# --- Reading while people punch ----------------------------------------------------------

READ_MODES = pytest.mark.parametrize(
    ("protocol", "chunked"),
    [("tcp", False), ("tcp", True), ("udp", False)],
    ids=["tcp-one-frame", "tcp-chunked", "udp"],
)


def on_device(emu: ZKEmulator) -> set[tuple]:
    with emu.state.lock:
        return {(r.user_id, r.timestamp) for r in emu.state.attendance}


def stored_as_device_time(device: Device) -> list[tuple]:
    # The device's zone is UTC: a stored instant is the device's wall-clock time.
    return [
        (user_id, moment.replace(tzinfo=None))
        for user_id, moment in RawAttendance.objects.filter(device=device).values_list(
            "user_id", "timestamp"
        )
    ]


@READ_MODES
@pytest.mark.parametrize(
    "ignore_disable", [False, True], ids=["clock-locked-while-disabled", "records-while-disabled"]
)
@pytest.mark.parametrize("size", [4, 2500], ids=["small-log", "big-log"])
def test_punches_made_during_reads_are_each_stored_once_and_nothing_else(
    protocol, chunked, ignore_disable, size
):
    # A small log read at the count from before the punch decodes at a wrong stride
    # (5 records of 40 bytes at a count of 4: 50 bytes each, garbage); 2500 records
    # are more than one 1504 chunk over TCP (65 472 bytes) and UDP (16 KiB).
    emulator = {"punch_during_read": True, "ignore_disable": ignore_disable, "chunked": chunked}
    with emulated(state_with(day_punches(size)), protocol=protocol, emulator=emulator) as (
        emu,
        device,
    ):
        polls = [device_poll(device=device, force_full=True) for _ in range(2)]
        assert all(poll.ok for poll in polls), [poll.error for poll in polls]
        made_while_polling = emu.punches_during_read
        after_two = stored_as_device_time(device)
        assert set(after_two) <= on_device(emu)
        # The punches made since the last read are in the next poll, made without the fault.
        emu.punch_during_read = False
        last = device_poll(device=device, force_full=True)
        assert last.ok, last.error
        everything = on_device(emu)
        assert emu.enabled

    # Each poll had someone punch after every count read, and between chunks when chunked.
    assert made_while_polling >= 4
    rows = stored_as_device_time(device)
    assert len(rows) == len(set(rows)) == len(everything) == size + made_while_polling
    assert set(rows) == everything
    assert all(user_id in ("1001", "1002") for user_id, _ in rows)
    assert min(moment for _, moment in rows) == datetime.datetime(2026, 11, 2, 8, 0)
    assert not RawAttendance.objects.filter(device=device, is_suspect=True).exists()


@pytest.mark.parametrize(
    "fault",
    [
        {"drop_after_bytes": 50_000},
        {"stall_after_bytes": 50_000},
        {"drop_after_bytes": 50_000, "chunked": True},
    ],
    ids=["connection-reset", "device-hangs", "connection-reset-chunked"],
)
def test_device_is_enabled_again_after_a_read_that_was_cut_off(fault):
    with emulated(state_with(day_punches(3000)), timeout_seconds=1, emulator=fault) as (
        emu,
        device,
    ):
        result = device_poll(device=device)
        assert not result.ok
        # Disabled for the read; the enable went over a fresh connection.
        assert emu.enable_log == ["disable", "enable"]
        assert emu.enabled
    assert "could not be enabled" not in result.error
    assert not RawAttendance.objects.filter(device=device).exists()


def test_a_device_that_cannot_be_enabled_again_is_named_in_the_error(caplog):
    state = state_with(day_punches(3000))
    emulator = {"stall_after_bytes": 50_000}
    with emulated(state, timeout_seconds=2, emulator=emulator) as (emu, device):

        def power_cut() -> None:
            # The device goes away once the read has disabled it: no connection
            # can enable it again.
            deadline = time.monotonic() + 10
            while "disable" not in emu.enable_log and time.monotonic() < deadline:
                time.sleep(0.01)
            emu.stop()

        cutter = threading.Thread(target=power_cut, daemon=True)
        cutter.start()
        result = device_poll(device=device)
        cutter.join(10)
        assert emu.enable_log == ["disable"] and not emu.enabled

    assert not result.ok
    assert "the device could not be enabled again" in result.error
    assert "takes no punches until it is" in result.error
    assert any(
        record.levelname == "ERROR" and "may be left disabled" in record.getMessage()
        for record in caplog.records
    )
    assert not RawAttendance.objects.filter(device=device).exists()


def test_a_clock_that_refuses_punches_while_read_takes_them_once_enabled_again():
    emulator = {"punch_during_read": True}
    with emulated(state_with(day_punches(5)), emulator=emulator) as (emu, device):
        device_poll(device=device)
        # The punch after the read's count read waited for the enable, then was made.
        assert emu.waiting_punches() == 0
        assert emu.enable_log == ["disable", "enable"]
        assert len(on_device(emu)) == 5 + emu.punches_during_read


# --- 8-byte records and names ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_8_byte_record_of_a_uid_with_no_user_is_stored_suspect_never_credited(protocol):
    EmployeeFactory(user_id="17", name="Someone else")
    # "17" is no user on this clock (uid 1 is 1001, uid 2 is 1002): its records carry uid 17.
    punches = [
        ("1001", datetime.datetime(2026, 11, 2, 8, 0)),
        ("17", datetime.datetime(2026, 11, 2, 8, 5)),
    ]
    emulator = {"record_size": 8}
    with emulated(state_with(punches), protocol=protocol, emulator=emulator) as (_emu, device):
        result = device_poll(device=device)

    assert result.ok, result.error
    assert (result.new, result.suspect) == (2, 1)
    rows = {row.user_id: row for row in RawAttendance.objects.filter(device=device)}
    assert set(rows) == {"1001", "uid:17"}
    assert rows["uid:17"].is_suspect
    assert rows["uid:17"].suspect_reason == "uid 17 matches no user on the device"
    assert not rows["1001"].is_suspect
    assert not RawAttendance.objects.filter(user_id="17").exists()


def cyrillic_state() -> DeviceState:
    state = state_with(day_punches(4))
    state.users[0].name = "Иван Петров"
    state.users[1].name = "Ольга Смирнова"
    return state


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_names_of_a_cp1251_clock_are_read_right_with_the_device_set_to_cp1251(protocol):
    emulator = {"encoding": "cp1251"}
    with emulated(cyrillic_state(), protocol=protocol, encoding="cp1251", emulator=emulator) as (
        _emu,
        device,
    ):
        result = device_poll(device=device)
    assert result.ok and result.warnings == []
    names = dict(Employee.objects.values_list("user_id", "name"))
    # UDP records hold 8 bytes of name, one byte a letter in cp1251.
    expected = ("Иван Петров", "Ольга Смирнова") if protocol == "tcp" else ("Иван Пет", "Ольга См")
    assert (names["1001"], names["1002"]) == expected


def test_names_of_a_cp1251_clock_polled_as_utf8_are_reported_not_silently_garbled(capsys, caplog):
    emulator = {"encoding": "cp1251"}
    with emulated(cyrillic_state(), name="Kyiv", encoding="utf-8", emulator=emulator):
        call_command("poll_devices")
    out = capsys.readouterr().out
    assert "Kyiv: 4 new" in out
    assert "WARNING: 2 user name(s) are not valid utf-8" in out
    assert "set the device's Encoding" in out
    assert "not valid utf-8" in caplog.text
    # Stored all the same, with replacement characters marking what could not be read.
    assert all("\ufffd" in name for name in Employee.objects.values_list("name", flat=True))


# --- Failures --------------------------------------------------------------------------


def assert_failed(device: Device, result, fragment: str) -> None:
    device.refresh_from_db()
    assert not result.ok
    assert fragment in result.error
    assert device.last_error == result.error
    assert device.consecutive_failures == 1
    assert not RawAttendance.objects.filter(device=device).exists()


def test_device_that_is_down_records_an_error_and_stores_nothing():
    device = DeviceFactory(ip_address="127.0.0.1", port=free_port(), timeout_seconds=2)
    result = device_poll(device=device)
    assert_failed(device, result, "refused the connection while connecting")


def test_silent_device_times_out():
    state = state_with(day_punches(3))
    with emulated(state, timeout_seconds=1, emulator={"silent": True}) as (_emu, device):
        result = device_poll(device=device)
    assert_failed(device, result, "did not answer within 1 s")


def test_wrong_comm_key_is_reported_as_an_authentication_failure():
    state = state_with(day_punches(3))
    with emulated(state, comm_key=1234, emulator={"comm_key": 4321}) as (_emu, device):
        result = device_poll(device=device)
    assert_failed(device, result, "rejected the comm key")


def test_right_comm_key_polls():
    state = state_with(day_punches(3))
    with emulated(state, comm_key=4321, emulator={"comm_key": 4321}) as (_emu, device):
        result = device_poll(device=device)
    assert result.ok and result.new == 3


def test_connection_dropped_mid_transfer_stores_no_partial_data():
    state = state_with(day_punches(3000))
    emulator = {"drop_after_bytes": 50_000}
    with emulated(state, timeout_seconds=3, emulator=emulator) as (_emu, device):
        result = device_poll(device=device)
    assert_failed(device, result, "")
    assert "mid-transfer" in result.error or "lost" in result.error


def test_device_that_hangs_mid_transfer_times_out_and_stores_no_partial_data():
    state = state_with(day_punches(3000))
    emulator = {"stall_after_bytes": 50_000}
    with emulated(state, timeout_seconds=1, emulator=emulator) as (_emu, device):
        result = device_poll(device=device)
    assert_failed(device, result, "did not answer within 1 s while downloading")


def test_consecutive_failures_count_up_and_reset_on_success():
    state = state_with(day_punches(3))
    with emulated(state, comm_key=1, emulator={"comm_key": 2}) as (_emu, device):
        device_poll(device=device)
        device_poll(device=device)
    device.refresh_from_db()
    assert device.consecutive_failures == 2

    with ZKEmulator(state_with(day_punches(3)), port=0) as emu:
        Device.objects.filter(pk=device.pk).update(port=emu.port, comm_key=0)
        device.refresh_from_db()
        assert device_poll(device=device).ok
    device.refresh_from_db()
    assert (device.consecutive_failures, device.last_error) == (0, "")


@pytest.mark.django_db(transaction=True)
def test_one_failing_device_does_not_stop_the_others():
    dead = DeviceFactory(name="Dead", ip_address="127.0.0.1", port=free_port(), timeout_seconds=2)
    with emulated(state_with(day_punches(5)), name="Alive") as (_emu, alive):
        results = {r.device_name: r for r in devices_poll(devices=[dead, alive])}
    assert not results["Dead"].ok
    assert results["Alive"].ok and results["Alive"].new == 5
    assert RawAttendance.objects.filter(device=alive).count() == 5


# --- Clock and test ----------------------------------------------------------------------


def test_sync_time_sets_the_device_clock_to_now_in_its_zone():
    with emulated(state_with([]), timezone="Asia/Tokyo", emulator={"clock_offset": -3600}) as (
        emu,
        device,
    ):
        device_sync_time(device=device)
        report = device_test(device=device)
    assert report.ok
    assert abs(report.clock_drift_seconds) < 5


def test_test_and_sync_time_of_a_device_being_polled_report_busy_without_connecting():
    with emulated(state_with([]), emulator={"clock_offset": -3600}) as (emu, device):
        device_lease_claim(device_id=device.pk, lease=datetime.timedelta(seconds=20))

        report = device_test(device=device)
        with pytest.raises(DeviceBusy) as busy:
            device_sync_time(device=device)

        assert emu.connects == 0
        assert emu.device_now() < datetime.datetime.now() - datetime.timedelta(minutes=59)
    assert not report.ok and report.busy
    # The lease ends in 20 s: sooner than the usual 30 s wait.
    assert report.error == str(busy.value)
    assert str(busy.value) == (
        "device busy: a poll is in progress (or another session with the device), try again in 20 s"
    )
    assert busy.value.retry_in == 20


def expired_lease(device: Device) -> None:
    """The lease a worker that died left behind: over, but still on the row."""
    Device.objects.filter(pk=device.pk).update(
        poll_lease_until=timezone.now() - datetime.timedelta(seconds=1)
    )


def test_test_and_sync_time_take_the_lease_and_give_it_back():
    with emulated(state_with([]), emulator={"clock_offset": -3600}) as (emu, device):
        expired_lease(device)
        report = device_test(device=device)
        assert report.ok and not report.busy
        assert Device.objects.get(pk=device.pk).poll_lease_until is None

        expired_lease(device)
        device_sync_time(device=device)
        assert Device.objects.get(pk=device.pk).poll_lease_until is None
        assert emu.connects == 2
        assert abs((emu.device_now() - datetime.datetime.now()).total_seconds()) < 5


def test_test_and_sync_time_give_the_lease_back_when_the_device_fails():
    device = DeviceFactory(port=free_port(), timeout_seconds=1)
    expired_lease(device)
    report = device_test(device=device)
    assert "refused the connection" in report.error and not report.busy
    assert Device.objects.get(pk=device.pk).poll_lease_until is None

    expired_lease(device)
    with pytest.raises(DeviceError, match="refused the connection"):
        device_sync_time(device=device)
    assert Device.objects.get(pk=device.pk).poll_lease_until is None


# --- Commands ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's file lock")
def test_a_locked_sqlite_database_fails_each_device_with_a_message_and_raises_nothing():
    with (
        emulated(state_with(day_punches(10))) as (_emu, first),
        emulated(state_with(day_punches(5))) as (_emu2, second),
    ):
        # Another process (the web server, a worker) holds the write lock.
        other = sqlite3.connect(connection.settings_dict["NAME"], uri=True, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE core_device SET name = name")
        try:
            results = devices_poll(devices=[first, second])
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert [result.device_name for result in results] == [first.name, second.name]
        for result in results:
            assert not result.ok
            assert "the database was locked by another process" in result.error
            assert "nothing from this device was stored" in result.error
        assert not RawAttendance.objects.exists()

        # Once the lock is gone, the next poll stores everything.
        assert [result.new for result in devices_poll(devices=[first, second])] == [10, 5]


def test_poll_devices_command_prints_a_line_per_device(capsys):
    with emulated(state_with(day_punches(6)), name="Front door"):
        call_command("poll_devices")
    out = capsys.readouterr().out
    assert "Front door: 6 new, 0 duplicate, 0 suspect of 6 downloaded" in out


def test_poll_devices_command_fails_when_a_device_fails():
    DeviceFactory(name="Gone", ip_address="127.0.0.1", port=free_port(), timeout_seconds=2)
    with pytest.raises(CommandError, match="1 of 1 device"):
        call_command("poll_devices", device=["Gone"])


def test_poll_devices_command_rejects_an_unknown_device_name():
    with pytest.raises(CommandError, match="No device named 'Nope'"):
        call_command("poll_devices", device=["Nope"])


def test_test_device_command_shows_counts_against_capacity(capsys):
    with emulated(state_with(day_punches(8)), name="Lobby"):
        call_command("test_device", "Lobby")
    out = capsys.readouterr().out
    assert "Lobby (127.0.0.1:" in out and "OK" in out
    assert "serial number  EMU-TEST" in out
    assert "records        8 of" in out


def test_test_device_command_does_not_contact_a_device_being_polled(capsys):
    with emulated(state_with(day_punches(8)), name="Lobby") as (emu, device):
        device_lease_claim(device_id=device.pk, lease=datetime.timedelta(minutes=5))
        with pytest.raises(CommandError, match="1 of 1 device.s. were busy with a poll"):
            call_command("test_device", "Lobby")
        assert emu.connects == 0
    out = capsys.readouterr().out
    assert "Lobby (127.0.0.1:" in out
    assert "NOT TESTED: device busy: a poll is in progress" in out
    assert "try again in 30 s" in out


def test_employees_are_not_duplicated_across_devices():
    with emulated(state_with(day_punches(2)), name="A") as (_emu, a):
        device_poll(device=a)
    with emulated(state_with(day_punches(2)), name="B") as (_emu, b):
        device_poll(device=b)
    assert Employee.objects.count() == 2
    assert set(Employee.objects.get(user_id="1001").devices.all()) == {a, b}


@pytest.mark.parametrize("zone", ["Europe/Lisbon", "America/New_York", "Australia/Sydney"])
def test_fast_day_offset_conversion_agrees_with_zoneinfo_every_half_hour_of_a_year(zone):
    from zoneinfo import ZoneInfo

    from core.ingest import _rows, local_to_utc
    from core.zk.client import Punch

    tz = ZoneInfo(zone)
    start = datetime.datetime(2026, 1, 1, 0, 15)
    punches = [Punch("1", start + datetime.timedelta(minutes=30 * i), 1, 0) for i in range(17_520)]
    rows, _ = _rows(punches, zone=tz, latest=datetime.datetime(2027, 1, 1))
    assert [row[1] for row in rows] == [local_to_utc(p.timestamp, tz) for p in punches]
