"""Daily processing: raw punches → one ProcessedAttendance per employee and work day."""

import datetime
import random
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from core.models import Employee, ProcessedAttendance, ProcessingState, RawAttendance
from core.processing import (
    attendance_discard_edits,
    attendance_edit,
    attendance_mark_reviewed,
    attendance_process,
    attendance_recompute,
    planning,
)
from core.tests.factories import DeviceFactory, EmployeeFactory

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
H = datetime.timedelta(hours=1)
M = datetime.timedelta(minutes=1)


@pytest.fixture
def door():
    return DeviceFactory(name="Front door", timezone="UTC")


@pytest.fixture
def back_door():
    return DeviceFactory(name="Back door", timezone="UTC")


def at(local: str, device) -> datetime.datetime:
    """A device-local wall-clock time as aware UTC (fold=0, as ingest converts)."""
    naive = datetime.datetime.fromisoformat(local)
    return naive.replace(tzinfo=ZoneInfo(device.timezone)).astimezone(UTC)


def store(device, user_id: str, *locals_: str, suspect: bool = False) -> None:
    RawAttendance.objects.bulk_create(
        RawAttendance(
            device=device,
            user_id=user_id,
            timestamp=at(local, device),
            status=1,
            verify_type=1,
            is_suspect=suspect,
            suspect_reason="clock not set" if suspect else "",
        )
        for local in locals_
    )


def server_clock(hours: float):
    """The server's time, `hours` after a fixed start: punches stored then are received then.

    A run re-reads what was received within LATE_COMMIT_MARGIN of the previous
    run, so tests of what a later run does alone let an hour pass between runs.
    """
    start = datetime.datetime(2026, 12, 1, tzinfo=UTC)
    return time_machine.travel(start + hours * H, tick=False)


def day(user_id: str, work_date: str) -> ProcessedAttendance:
    return ProcessedAttendance.objects.get(
        user_id=user_id, work_date=datetime.date.fromisoformat(work_date)
    )


def codes(row: ProcessedAttendance) -> list[str]:
    return [reason["code"] for reason in row.outlier_reasons]


def snapshot() -> dict:
    fields = [
        "clock_in",
        "clock_out",
        "clock_in_device_id",
        "clock_out_device_id",
        "punch_count",
        "worked",
        "is_outlier",
        "outlier_reasons",
        "ignored_suspect_punches",
        "version",
        "updated_at",
    ]
    return {
        (user_id, work_date): rest
        for user_id, work_date, *rest in ProcessedAttendance.objects.values_list(
            "user_id", "work_date", *fields
        )
    }


# --- Shifts and days -----------------------------------------------------------------


def test_ordinary_day_is_one_row_with_first_punch_in_and_last_punch_out(door):
    store(
        door, "1001", "2026-11-02 08:02", "2026-11-02 12:30", "2026-11-02 13:15", "2026-11-02 17:05"
    )

    result = attendance_process()

    row = day("1001", "2026-11-02")
    assert (row.clock_in, row.clock_out) == (
        at("2026-11-02 08:02", door),
        at("2026-11-02 17:05", door),
    )
    assert row.clock_in_device == row.clock_out_device == door
    assert row.punch_count == 4
    assert row.worked == datetime.timedelta(hours=9, minutes=3)
    assert not row.is_outlier and row.outlier_reasons == []
    assert (row.version, row.sync_state, row.synced_version) == (1, "pending", None)
    assert (result.groups_recomputed, result.rows_created, result.rows_changed) == (1, 1, 0)


def test_night_shift_across_midnight_is_one_day_dated_on_its_start_beside_a_day_worker(door):
    EmployeeFactory(
        user_id="2001", work_start_time=datetime.time(22), work_end_time=datetime.time(6)
    )
    store(
        door, "2001", "2026-11-02 22:00", "2026-11-03 06:05", "2026-11-03 21:55", "2026-11-04 06:00"
    )
    store(
        door, "1001", "2026-11-02 08:00", "2026-11-02 17:00", "2026-11-03 08:00", "2026-11-03 17:00"
    )

    attendance_process()

    assert ProcessedAttendance.objects.filter(user_id="2001").count() == 2
    first, second = day("2001", "2026-11-02"), day("2001", "2026-11-03")
    assert (first.clock_in, first.clock_out) == (
        at("2026-11-02 22:00", door),
        at("2026-11-03 06:05", door),
    )
    assert first.worked == datetime.timedelta(hours=8, minutes=5)
    assert second.worked == datetime.timedelta(hours=8, minutes=5)
    assert not first.is_outlier and not second.is_outlier
    assert ProcessedAttendance.objects.filter(user_id="1001").count() == 2
    assert day("1001", "2026-11-03").worked == 9 * H


def test_night_worker_without_an_override_is_flagged_against_the_day_schedule(door):
    store(door, "2001", "2026-11-02 22:00", "2026-11-03 06:05")

    attendance_process()

    row = day("2001", "2026-11-02")
    # The nearest 08:00 to a 22:00 clock-in is the next morning's.
    assert codes(row) == ["early_clock_in", "early_clock_out"]
    assert row.outlier_reasons[0]["message"] == "early_clock_in: 22:00 is 10h00m before 08:00"


def test_forgotten_clock_out_does_not_swallow_the_next_day(door):
    store(door, "1001", "2026-11-02 08:00", "2026-11-03 07:55", "2026-11-03 17:00")

    attendance_process()

    forgotten = day("1001", "2026-11-02")
    assert forgotten.clock_out is None and forgotten.worked is None
    assert codes(forgotten) == ["missing_clock_out"]
    next_day = day("1001", "2026-11-03")
    assert next_day.clock_in == at("2026-11-03 07:55", door)
    assert next_day.punch_count == 2 and not next_day.is_outlier


def test_double_taps_within_the_window_count_as_one_punch_even_across_devices(door, back_door):
    store(door, "1001", "2026-11-02 08:00:00", "2026-11-02 17:00:00")
    store(back_door, "1001", "2026-11-02 08:00:40", "2026-11-02 17:01:00")

    attendance_process()

    row = day("1001", "2026-11-02")
    assert row.punch_count == 2
    assert row.clock_out == at("2026-11-02 17:00:00", door)
    assert row.clock_out_device == door


def test_taps_just_over_the_dedupe_window_are_two_punches(door):
    store(door, "1001", "2026-11-02 08:00:00", "2026-11-02 08:01:01")

    attendance_process()

    row = day("1001", "2026-11-02")
    assert row.punch_count == 2
    assert row.clock_out == at("2026-11-02 08:01:01", door)


def test_a_double_tap_alone_is_a_single_punch(door):
    store(door, "1001", "2026-11-02 08:00:00", "2026-11-02 08:00:30")

    attendance_process()

    row = day("1001", "2026-11-02")
    assert (row.punch_count, row.clock_out) == (1, None)
    assert codes(row) == ["missing_clock_out"]


def test_single_punch_leaves_clock_out_empty_and_flags_missing_clock_out(door):
    store(door, "1001", "2026-11-02 08:10")

    attendance_process()

    row = day("1001", "2026-11-02")
    assert (row.clock_out, row.clock_out_device, row.worked, row.punch_count) == (
        None,
        None,
        None,
        1,
    )
    assert row.is_outlier
    assert row.outlier_reasons == [
        {"code": "missing_clock_out", "message": "missing_clock_out: one punch only, at 08:10"}
    ]


def test_in_on_one_device_and_out_on_another_is_one_day(door, back_door):
    store(door, "1001", "2026-11-02 08:00")
    store(back_door, "1001", "2026-11-02 17:00")

    attendance_process()

    row = ProcessedAttendance.objects.get(user_id="1001")
    assert (row.clock_in_device, row.clock_out_device) == (door, back_door)
    assert row.worked == 9 * H


def test_each_punch_is_dated_and_judged_in_its_own_devices_zone():
    tokyo = DeviceFactory(name="Tokyo", timezone="Asia/Tokyo")
    new_york = DeviceFactory(name="New York", timezone="America/New_York")
    # 08:00 in Tokyo is 23:00 UTC the day before; 17:00 in New York is 22:00 UTC.
    store(tokyo, "3001", "2026-11-03 08:00", "2026-11-03 17:00")
    store(new_york, "3002", "2026-11-02 08:00", "2026-11-02 17:00")
    # In on Tokyo, out on New York: the clock-out is read on New York's clock.
    store(tokyo, "3003", "2026-11-03 08:00")
    store(new_york, "3003", "2026-11-02 23:30")  # 04:30 UTC, 13:30 in Tokyo

    attendance_process()

    tokyo_day = day("3001", "2026-11-03")
    assert tokyo_day.clock_in == datetime.datetime(2026, 11, 2, 23, tzinfo=UTC)
    assert not tokyo_day.is_outlier
    assert not day("3002", "2026-11-02").is_outlier
    mixed = day("3003", "2026-11-03")
    assert mixed.worked == datetime.timedelta(hours=5, minutes=30)
    assert mixed.outlier_reasons == [
        {"code": "late_clock_out", "message": "late_clock_out: 23:30 is 6h30m after 17:00"}
    ]


@pytest.mark.parametrize(
    ("start", "end", "worked"),
    [
        ("2026-03-28 22:00", "2026-03-29 06:00", datetime.timedelta(hours=7)),  # clocks go forward
        ("2026-10-24 22:00", "2026-10-25 06:00", datetime.timedelta(hours=9)),  # clocks go back
    ],
)
def test_night_shift_over_a_dst_change_is_one_day_and_due_out_by_the_wall_clock(start, end, worked):
    lisbon = DeviceFactory(name="Lisbon", timezone="Europe/Lisbon")
    EmployeeFactory(
        user_id="2001", work_start_time=datetime.time(22), work_end_time=datetime.time(6)
    )
    store(lisbon, "2001", start, end)

    attendance_process()

    row = ProcessedAttendance.objects.get(user_id="2001")
    assert row.work_date == datetime.date.fromisoformat(start[:10])
    assert row.worked == worked
    assert not row.is_outlier


def test_two_shifts_starting_on_one_local_date_share_its_row_and_are_flagged(door):
    # A forgotten clock-out at 06:00, then (16h30m later) a night shift from 22:30.
    store(door, "1001", "2026-11-02 06:00", "2026-11-02 22:30", "2026-11-03 06:30")

    attendance_process()

    row = ProcessedAttendance.objects.get(user_id="1001")
    assert row.work_date == datetime.date(2026, 11, 2)
    assert (row.clock_in, row.clock_out) == (
        at("2026-11-02 06:00", door),
        at("2026-11-03 06:30", door),
    )
    assert row.worked == 8 * H
    assert row.punch_count == 3
    assert "multiple_shifts" in codes(row)


def test_suspect_punches_are_ignored_and_their_day_says_so(door):
    store(door, "1001", "2026-11-02 08:00", "2026-11-02 17:00")
    store(door, "1001", "2026-11-02 06:00", "2026-11-02 20:00", suspect=True)
    store(door, "1002", "2026-11-02 09:00", suspect=True)  # no shift: no day

    attendance_process()

    row = day("1001", "2026-11-02")
    assert (row.clock_in, row.clock_out) == (
        at("2026-11-02 08:00", door),
        at("2026-11-02 17:00", door),
    )
    assert row.punch_count == 2
    assert row.ignored_suspect_punches == 1  # 06:00 is before the shift started
    assert not ProcessedAttendance.objects.filter(user_id="1002").exists()


# --- Outlier rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clock_in", "clock_out", "reasons"),
    [
        ("06:00", "17:00", []),
        ("05:59", "17:00", ["early_clock_in: 05:59 is 2h01m before 08:00"]),
        ("05:10", "17:00", ["early_clock_in: 05:10 is 2h50m before 08:00"]),
        ("10:00", "17:00", []),
        ("10:01", "17:00", ["late_clock_in: 10:01 is 2h01m after 08:00"]),
        ("08:00", "15:00", []),
        ("08:00", "14:59", ["early_clock_out: 14:59 is 2h01m before 17:00"]),
        ("08:00", "20:00", []),
        ("08:00", "20:01", ["late_clock_out: 20:01 is 3h01m after 17:00"]),
        ("05:59:30", "20:00:59", ["early_clock_in: 05:59 is 2h01m before 08:00"]),
    ],
)
def test_outlier_limits_are_exclusive_to_the_minute(door, clock_in, clock_out, reasons):
    store(door, "1001", f"2026-11-02 {clock_in}", f"2026-11-02 {clock_out}")

    attendance_process()

    row = day("1001", "2026-11-02")
    assert [r["message"] for r in row.outlier_reasons] == reasons
    assert row.is_outlier == bool(reasons)


def test_employee_hours_win_over_the_devices_which_win_over_settings(settings):
    settings.WORK_START_TIME = datetime.time(9)
    warehouse = DeviceFactory(
        name="Warehouse",
        timezone="UTC",
        work_start_time=datetime.time(5),
        work_end_time=datetime.time(14),
    )
    office = DeviceFactory(name="Office", timezone="UTC")
    EmployeeFactory(user_id="4003", work_start_time=datetime.time(12))
    store(warehouse, "4001", "2026-11-02 05:00", "2026-11-02 14:00")  # device: 05:00
    store(office, "4002", "2026-11-02 06:00", "2026-11-02 17:00")  # settings: 09:00
    store(warehouse, "4003", "2026-11-02 05:00", "2026-11-02 17:00")  # employee: 12:00

    attendance_process()

    assert not day("4001", "2026-11-02").is_outlier
    assert codes(day("4002", "2026-11-02")) == ["early_clock_in"]
    assert day("4003", "2026-11-02").outlier_reasons[0]["message"] == (
        "early_clock_in: 05:00 is 7h00m before 12:00"
    )


# --- Incremental and idempotent ------------------------------------------------------


def test_a_run_with_no_new_punches_changes_nothing(door):
    store(door, "1001", "2026-11-02 08:00", "2026-11-02 17:00", "2026-11-03 08:00")
    attendance_process()
    before = snapshot()

    again = attendance_process()
    full = attendance_process(full=True)

    assert snapshot() == before
    assert (again.rows_created, again.rows_changed, full.rows_created, full.rows_changed) == (
        0,
        0,
        0,
        0,
    )


def test_a_late_punch_after_delivery_bumps_the_version_and_is_due_again(door):
    with server_clock(0):
        store(door, "1001", "2026-11-02 08:00")
    with server_clock(1):
        attendance_process()
    ProcessedAttendance.objects.update(sync_state="synced", synced_version=1, sync_attempts=1)

    with server_clock(2):
        store(door, "1001", "2026-11-02 17:00")
        result = attendance_process()

    row = day("1001", "2026-11-02")
    assert (row.version, row.synced_version, row.sync_state, row.sync_attempts) == (
        2,
        1,
        "pending",
        0,
    )
    assert row.clock_out == at("2026-11-02 17:00", door)
    assert not row.is_outlier
    assert (result.new_punches, result.rows_created, result.rows_changed) == (1, 0, 1)


def test_a_late_punch_that_extends_a_shift_removes_the_day_it_used_to_be(door):
    # A night shift whose clock-in reached us late: the 06:00 clock-out stood alone
    # as a day of its own. The unsent one is deleted; the sent one is emptied
    # and sent again, so the CRM drops it.
    with server_clock(0):
        store(door, "2001", "2026-11-03 06:00")
        store(door, "2002", "2026-11-03 06:00")
    with server_clock(1):
        attendance_process()
    ProcessedAttendance.objects.filter(user_id="2002").update(sync_state="synced", synced_version=1)

    with server_clock(2):
        store(door, "2001", "2026-11-02 22:00")
        store(door, "2002", "2026-11-02 22:00")
        result = attendance_process()

    assert list(
        ProcessedAttendance.objects.filter(user_id="2001").values_list("work_date", flat=True)
    ) == [datetime.date(2026, 11, 2)]
    emptied = day("2002", "2026-11-03")
    assert (emptied.clock_in, emptied.punch_count, emptied.version, emptied.sync_state) == (
        None,
        0,
        2,
        "pending",
    )
    assert day("2002", "2026-11-02").worked == 8 * H
    assert (result.rows_deleted, result.rows_voided) == (1, 1)


def test_a_punch_that_commits_after_a_run_read_past_its_id_is_still_processed(door):
    start = datetime.datetime(2026, 11, 2, 9, tzinfo=UTC)
    with time_machine.travel(start, tick=False):
        RawAttendance.objects.create(
            id=1000, device=door, user_id="1001", timestamp=at("2026-11-02 08:00", door)
        )
        attendance_process()
    assert ProcessingState.objects.get().last_raw_id == 1000
    # A poll that started a minute before that run and committed after it.
    with time_machine.travel(start - M, tick=False):
        RawAttendance.objects.create(
            id=500, device=door, user_id="1002", timestamp=at("2026-11-02 08:30", door)
        )

    with time_machine.travel(start + 5 * M, tick=False):
        result = attendance_process()

    assert day("1002", "2026-11-02").clock_in == at("2026-11-02 08:30", door)
    assert result.new_punches == 2  # and 1000 again, re-read inside the margin
    # Once the margin has passed, a run reads only what is new.
    with time_machine.travel(start + settings.LATE_COMMIT_MARGIN + 10 * M, tick=False):
        attendance_process()
        assert attendance_process().new_punches == 0


def test_the_late_commit_margin_is_the_setting_at_run_time(door, settings):
    settings.LATE_COMMIT_MARGIN = 3 * H
    with server_clock(0):
        store(door, "1001", "2026-11-02 08:00")
    with server_clock(1):
        assert attendance_process().new_punches == 1

    with server_clock(2):
        # Received 1 hour before the previous run started: inside 3 hours, re-read.
        assert attendance_process().new_punches == 1
    settings.LATE_COMMIT_MARGIN = 30 * M
    with server_clock(3):
        assert attendance_process().new_punches == 0


def computed_days() -> dict:
    """What the punches give, as snapshot() without version and updated_at."""
    return {key: values[:-2] for key, values in snapshot().items() if values[0] is not None}


def revise(device, user_id: str, local: str, *, suspect: bool) -> None:
    """A punch's verdict changed after it was stored, written as ingest writes it."""
    changed = RawAttendance.objects.filter(
        device=device, user_id=user_id, timestamp=at(local, device)
    ).update(is_suspect=suspect, revised_at=timezone.now())
    assert changed == 1


def test_a_punch_revised_to_suspect_is_ignored_by_the_next_incremental_run(door):
    with server_clock(0):
        store(door, "1001", "2026-11-02 08:00", "2026-11-02 12:00", "2026-11-02 17:00")
    with server_clock(1):
        attendance_process()
    with server_clock(2):
        attendance_process()  # the run the next one bounds its read by: ids are old now
    assert day("1001", "2026-11-02").punch_count == 3

    with server_clock(2.5):
        revise(door, "1001", "2026-11-02 12:00", suspect=True)
    with server_clock(3):
        result = attendance_process()

    row = day("1001", "2026-11-02")
    assert (row.punch_count, row.ignored_suspect_punches, row.version) == (2, 1, 2)
    assert (result.new_punches, result.rows_changed) == (1, 1)
    with server_clock(4):
        assert attendance_process().new_punches == 0  # revised before the previous run


def test_a_punch_whose_suspect_flag_is_cleared_counts_again(door):
    with server_clock(0):
        store(door, "1001", "2026-11-02 08:00")
        store(door, "1001", "2026-11-02 17:00", suspect=True)
    with server_clock(1):
        attendance_process()
    with server_clock(2):
        attendance_process()
    row = day("1001", "2026-11-02")
    assert (row.punch_count, row.clock_out, row.ignored_suspect_punches) == (1, None, 1)

    with server_clock(2.5):
        revise(door, "1001", "2026-11-02 17:00", suspect=False)
    with server_clock(3):
        result = attendance_process()

    row = day("1001", "2026-11-02")
    assert (row.punch_count, row.clock_out, row.ignored_suspect_punches) == (
        2,
        at("2026-11-02 17:00", door),
        0,
    )
    assert (row.version, row.is_outlier, result.rows_changed) == (2, False, 1)


@pytest.mark.parametrize("suspect", [True, False])
def test_revising_a_days_first_punch_gives_what_a_full_run_gives(door, suspect):
    with server_clock(0):
        store(door, "1001", "2026-11-01 08:00", "2026-11-01 17:00")
        store(door, "1001", "2026-11-02 08:00", suspect=not suspect)
        store(door, "1001", "2026-11-02 12:00", "2026-11-02 17:00", "2026-11-03 08:00")
    with server_clock(1):
        attendance_process()
    with server_clock(2):
        attendance_process()

    with server_clock(2.5):
        revise(door, "1001", "2026-11-02 08:00", suspect=suspect)
    with server_clock(3):
        attendance_process()
    incremental = computed_days()
    ProcessedAttendance.objects.all().delete()
    attendance_process(full=True)

    assert computed_days() == incremental
    clock_in = "2026-11-02 12:00" if suspect else "2026-11-02 08:00"
    assert day("1001", "2026-11-02").clock_in == at(clock_in, door)


def test_the_revised_punches_are_found_through_their_partial_index(door):
    if connection.vendor != "postgresql":
        pytest.skip("the query plan is PostgreSQL's")
    with server_clock(0):
        store(door, "1001", "2026-11-02 08:00")
    with server_clock(1):
        attendance_process()
    with server_clock(2):
        attendance_process()
    state = ProcessingState.objects.get()

    with connection.cursor() as cursor:
        # A table this small is read whole; the question is whether it has to be.
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = planning.new_punches(state).explain()

    assert "raw_attendance_revised" in plan
    assert "Seq Scan" not in plan


def test_a_late_punch_that_starts_a_second_shift_on_a_stored_day_joins_that_day(door):
    with server_clock(0):
        store(door, "1001", "2026-11-02 22:30", "2026-11-03 06:30")
    with server_clock(1):
        attendance_process()

    with server_clock(2):
        store(door, "1001", "2026-11-02 06:00")  # 16h30m before the night shift
        result = attendance_process()

    row = ProcessedAttendance.objects.get(user_id="1001")
    assert (row.clock_in, row.clock_out) == (
        at("2026-11-02 06:00", door),
        at("2026-11-03 06:30", door),
    )
    assert (row.punch_count, row.version) == (3, 2)
    assert "multiple_shifts" in codes(row)
    assert result.new_punches == 1


def test_late_punches_after_long_gaps_are_chained_from_each_employees_own_last_day(door):
    # Neither has a day in the three days before their late punch, so their
    # anchors come from a second, wider look, which must not hand 1001 a day
    # after its own late punch.
    with server_clock(0):
        store(door, "1001", "2026-11-02 08:00", "2026-11-02 17:00")
        store(door, "1001", "2026-11-15 08:00", "2026-11-15 17:00")
        store(door, "1002", "2026-11-02 08:00", "2026-11-02 17:00")
    with server_clock(1):
        attendance_process()

    with server_clock(2):
        store(door, "1001", "2026-11-12 08:00", "2026-11-12 17:00")
        store(door, "1002", "2026-11-18 08:00", "2026-11-18 17:00")
        result = attendance_process()

    assert result.rows_created == 2
    assert day("1001", "2026-11-12").worked == 9 * H
    assert day("1002", "2026-11-18").worked == 9 * H


def test_incremental_runs_match_a_full_recompute_whatever_order_punches_arrive_in():
    lisbon = DeviceFactory(name="Lisbon", timezone="Europe/Lisbon")
    madrid = DeviceFactory(name="Madrid", timezone="Europe/Madrid")
    rng = random.Random(7)
    punches = []
    first_day = datetime.datetime(2026, 10, 19, tzinfo=UTC)
    for number in range(15):
        user_id = str(5000 + number)
        pattern = ("day", "night", "any")[number % 3]
        for day_number in range(21):
            if day_number % 7 in (5, 6) and pattern == "day" or rng.random() < 0.15:
                continue  # weekends and days off leave gaps longer than a shift
            hour = {"day": 8, "night": 22, "any": rng.randint(0, 23)}[pattern]
            start = first_day + day_number * 24 * H + hour * H + rng.randint(-150, 150) * M
            end = start + rng.randint(4 * 60, 13 * 60) * M
            moments = [start, end]
            if rng.random() < 0.15:
                moments.append(start + rng.randint(5, 90) * datetime.timedelta(seconds=1))
            if rng.random() < 0.1:
                moments.pop()  # a forgotten clock-out
            if rng.random() < 0.1:
                moments.append(end + rng.randint(8, 30) * H)  # a stray punch
            for moment in moments:
                punches.append((user_id, moment, rng.random() < 0.05, rng.choice([lisbon, madrid])))
    # Mostly in order, with a fifth of the punches arriving up to a week late.
    punches.sort(key=lambda p: p[1] + (rng.randint(1, 7 * 24) * H if rng.random() < 0.2 else H))
    for run, chunk in enumerate(range(0, len(punches), 6)):
        with server_clock(run):
            RawAttendance.objects.bulk_create(
                [
                    RawAttendance(device=d, user_id=u, timestamp=t, is_suspect=s)
                    for u, t, s, d in punches[chunk : chunk + 6]
                ],
                ignore_conflicts=True,
            )
            attendance_process()

    def computed() -> dict:
        return {
            key: values[:-2]  # without version and updated_at
            for key, values in snapshot().items()
            if values[0] is not None  # rows emptied for the CRM
        }

    incremental = computed()
    ProcessedAttendance.objects.all().delete()
    attendance_process(full=True)

    assert computed() == incremental
    assert len(incremental) > 200
    assert sum("multiple_shifts" in str(v[7]) for v in incremental.values()) > 3


ZONE_PAIRS = [
    ("Europe/Lisbon", "Europe/Madrid"),
    ("Asia/Tokyo", "Pacific/Honolulu"),  # 19 hours apart
    ("Pacific/Kiritimati", "Pacific/Pago_Pago"),  # 25 hours apart: the same time, two dates
    ("Australia/Sydney", "America/Los_Angeles"),
]


def overlapping_rows() -> list:
    """Pairs of one employee's rows whose clock-in → clock-out spans overlap in time."""
    spans = ProcessedAttendance.objects.exclude(clock_in=None).order_by("user_id", "clock_in")
    found = []
    previous = None
    for row in spans:
        if previous is not None and previous.user_id == row.user_id:
            if row.clock_in <= (previous.clock_out or previous.clock_in):
                found.append((previous.work_date, row.work_date))
        previous = row
    return found


@pytest.mark.parametrize("seed", range(12))
def test_incremental_runs_match_a_full_recompute_with_devices_in_far_apart_zones(seed):
    rng = random.Random(seed)
    zones = ZONE_PAIRS[seed % len(ZONE_PAIRS)]
    devices = [DeviceFactory(name=zone, timezone=zone) for zone in zones]
    punches = []
    first_day = datetime.datetime(2026, 10, 19, tzinfo=UTC)
    for number in range(6):
        user_id = str(6000 + number)
        for day_number in range(10):
            if rng.random() < 0.15:
                continue
            start = first_day + day_number * 24 * H + rng.randint(0, 23 * 60) * M
            moments = [start, start + rng.randint(2 * 60, 15 * 60) * M]
            if rng.random() < 0.3:
                moments.append(start + rng.randint(16 * 60 + 1, 20 * 60) * M)
            if rng.random() < 0.1:
                moments.pop(1)
            for moment in moments:
                punches.append((user_id, moment, rng.random() < 0.05, rng.choice(devices)))
    punches.sort(key=lambda p: p[1] + (rng.randint(1, 4 * 24) * H if rng.random() < 0.25 else H))
    for run, chunk in enumerate(range(0, len(punches), 8)):
        with server_clock(run):
            RawAttendance.objects.bulk_create(
                [
                    RawAttendance(device=d, user_id=u, timestamp=t, is_suspect=s)
                    for u, t, s, d in punches[chunk : chunk + 8]
                ],
                ignore_conflicts=True,
            )
            attendance_process()

    def computed() -> dict:
        return {key: values[:-2] for key, values in snapshot().items() if values[0] is not None}

    incremental = computed()
    assert overlapping_rows() == []
    ProcessedAttendance.objects.all().delete()
    attendance_process(full=True)

    assert computed() == incremental
    assert overlapping_rows() == []
    assert len(incremental) > 30


def test_the_number_of_queries_does_not_grow_with_the_number_of_groups(door):
    def queries_for_one_new_day(employees: int) -> int:
        RawAttendance.objects.all().delete()
        ProcessedAttendance.objects.all().delete()
        ProcessingState.objects.all().delete()
        users = [str(7000 + n) for n in range(employees)]
        for user_id in users:
            store(door, user_id, "2026-11-02 08:00", "2026-11-02 17:00")
        attendance_process()
        for user_id in users:
            store(door, user_id, "2026-11-03 08:00", "2026-11-03 17:00")
        with CaptureQueriesContext(connection) as queries:
            result = attendance_process()
        assert result.rows_created == employees
        return len(queries)

    # 25, not more: on SQLite, bulk_create splits at 999 parameters, 28 rows of
    # ProcessedAttendance's 35 columns: one statement more per 28 new days.
    assert queries_for_one_new_day(3) == queries_for_one_new_day(25)


def test_an_incremental_run_stays_within_a_fixed_number_of_queries(
    door, django_assert_max_num_queries
):
    for user_id in ("1001", "1002", "1003"):
        store(door, user_id, "2026-11-02 08:00", "2026-11-02 17:00")
    attendance_process()
    for user_id in ("1001", "1002", "1003"):
        store(door, user_id, "2026-11-03 08:00", "2026-11-03 17:00")

    # Lock, read state, max id, devices, new punches, anchors, rows, employees,
    # punches (two rounds), upsert, record the run: 12, and a savepoint pair.
    with django_assert_max_num_queries(14):
        attendance_process()


# --- HR corrections ------------------------------------------------------------------


@pytest.fixture
def hr_user():
    return get_user_model().objects.create_superuser("hr", "hr@example.com", "pw")


def test_a_manual_edit_survives_reprocessing_and_newer_punches_flag_it(door, hr_user):
    with time_machine.travel(datetime.datetime(2026, 11, 2, 18, tzinfo=UTC), tick=False):
        store(door, "1001", "2026-11-02 08:00")
        attendance_process()
    row = day("1001", "2026-11-02")
    with time_machine.travel(datetime.datetime(2026, 11, 3, 9, tzinfo=UTC), tick=False):
        attendance_edit(
            record_id=row.pk,
            clock_in=at("2026-11-02 08:00", door),
            clock_out=at("2026-11-02 16:30", door),
            user=hr_user,
        )
    edited = day("1001", "2026-11-02")
    assert edited.is_manual and edited.edited_by == hr_user
    assert edited.worked == datetime.timedelta(hours=8, minutes=30)
    assert (edited.version, edited.is_outlier) == (2, False)

    with time_machine.travel(datetime.datetime(2026, 11, 3, 10, tzinfo=UTC), tick=False):
        attendance_process(full=True)
        assert not day("1001", "2026-11-02").has_newer_punches
        store(door, "1001", "2026-11-02 17:10")
        attendance_process()

    kept = day("1001", "2026-11-02")
    assert (kept.clock_out, kept.worked, kept.version) == (edited.clock_out, edited.worked, 2)
    assert kept.is_manual and kept.has_newer_punches

    attendance_mark_reviewed(ids=[kept.pk], user=hr_user)
    attendance_process(full=True)
    assert not day("1001", "2026-11-02").has_newer_punches


def test_discarding_an_edit_recomputes_the_day_from_its_punches(door, hr_user):
    store(door, "1001", "2026-11-02 08:00", "2026-11-02 17:00")
    attendance_process()
    row = day("1001", "2026-11-02")
    attendance_edit(
        record_id=row.pk,
        clock_in=at("2026-11-02 09:00", door),
        clock_out=at("2026-11-02 17:00", door),
        user=hr_user,
    )

    attendance_discard_edits(ids=[row.pk])

    row = day("1001", "2026-11-02")
    assert not row.is_manual
    assert row.clock_in == at("2026-11-02 08:00", door)
    assert (row.version, row.sync_state) == (3, "pending")


def test_an_edit_with_clock_out_before_clock_in_is_refused(door, hr_user):
    store(door, "1001", "2026-11-02 08:00")
    attendance_process()
    row = day("1001", "2026-11-02")

    with pytest.raises(ValueError, match="after the clock-in"):
        attendance_edit(
            record_id=row.pk, clock_in=row.clock_in, clock_out=row.clock_in - H, user=hr_user
        )


def test_recompute_picks_up_changed_hours_for_the_selected_days_only(door, settings):
    store(
        door, "1001", "2026-11-02 07:00", "2026-11-02 16:00", "2026-11-03 07:00", "2026-11-03 16:00"
    )
    attendance_process()
    settings.WORK_START_TIME = datetime.time(10)

    result = attendance_recompute(ids=[day("1001", "2026-11-03").pk])

    assert codes(day("1001", "2026-11-03")) == ["early_clock_in"]
    assert not day("1001", "2026-11-02").is_outlier  # recomputed days stay as they were
    assert result.rows_changed == 1


# --- The command ---------------------------------------------------------------------


def test_command_prints_what_it_did(door, capsys):
    store(door, "1001", "2026-11-02 08:00", "2026-11-02 17:00", "2026-11-03 05:00")

    call_command("process_attendance")

    out = capsys.readouterr().out
    assert "groups recomputed: 1" in out
    assert "rows created: 2" in out
    assert "rows changed: 0" in out
    assert "outliers: 1" in out


def test_command_recomputes_a_date_range_or_everything(door, settings, capsys):
    for date in ("2026-11-02", "2026-11-03", "2026-11-04"):
        store(door, "1001", f"{date} 07:00", f"{date} 16:00")
    call_command("process_attendance")
    settings.WORK_START_TIME = datetime.time(10)

    call_command("process_attendance", "--from", "2026-11-03", "--to", "2026-11-03")
    assert [day("1001", d).is_outlier for d in ("2026-11-02", "2026-11-03", "2026-11-04")] == [
        False,
        True,
        False,
    ]
    call_command("process_attendance", "--full")
    assert ProcessedAttendance.objects.filter(is_outlier=True).count() == 3
    assert "rows changed: 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "2026-11-03"], "go together"),
        (["--full", "--from", "2026-11-01", "--to", "2026-11-02"], "not both"),
        (["--from", "2026-11-05", "--to", "2026-11-02"], "after"),
        (["--from", "3/11/2026", "--to", "2026-11-02"], "not a date"),
    ],
)
def test_command_refuses_bad_arguments(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("process_attendance", *args)


# --- Admin ---------------------------------------------------------------------------


@pytest.fixture
def hr_client(client, hr_user):
    client.force_login(hr_user)
    return client


def test_admin_list_filters_searches_and_shows_reasons(door, hr_client):
    Employee.objects.create(user_id="1001", name="Ana Lopes")
    store(door, "1001", "2026-11-02 05:10", "2026-11-02 17:00")
    store(door, "1002", "2026-11-02 08:00", "2026-11-02 17:00")
    attendance_process()
    url = reverse("admin:core_processedattendance_changelist")

    page = hr_client.get(url, {"is_outlier__exact": "1", "q": "Lopes"}).content.decode()
    assert "early_clock_in: 05:10 is 2h50m before 08:00" in page
    assert ">1002<" not in page

    for params in (
        {"work_date__gte": "2026-11-01", "work_date__lte": "2026-11-30"},
        {"sync_state__exact": "pending", "device": str(door.pk)},
        {"q": "1002"},
        {"range": "last_month"},
    ):
        assert hr_client.get(url, params).status_code == 200


# Days around the turn of May to June 2026 (1 June is a Monday), and two moments
# when the date in UTC is not the company's, so a period counted from the UTC
# date selects other days.
PERIOD_DAYS = [
    datetime.date(2026, month, number)
    for month, number in [(4, 1), (4, 30), (5, 1), (5, 17), (5, 18), (5, 24), (5, 25)]
    + [(5, 29), (5, 30), (5, 31), (6, 1), (6, 2)]
]
MAY_31, JUNE_1 = datetime.date(2026, 5, 31), datetime.date(2026, 6, 1)
KOLKATA_MONDAY = datetime.datetime(2026, 5, 31, 20, tzinfo=UTC)  # Monday 1 June, 01:30 there
LOS_ANGELES_SUNDAY = datetime.datetime(2026, 6, 1, 3, tzinfo=UTC)  # Sunday 31 May, 20:00 there


@pytest.mark.parametrize(
    ("zone", "now", "period", "span"),
    [
        pytest.param("Asia/Kolkata", KOLKATA_MONDAY, period, span, id=f"Kolkata-{period}")
        for period, span in [
            ("yesterday", (MAY_31, MAY_31)),
            ("this_week", (JUNE_1, JUNE_1)),
            ("last_week", (datetime.date(2026, 5, 25), MAY_31)),
            ("this_month", (JUNE_1, JUNE_1)),
            ("last_month", (datetime.date(2026, 5, 1), MAY_31)),
        ]
    ]
    + [
        pytest.param(
            "America/Los_Angeles", LOS_ANGELES_SUNDAY, period, span, id=f"Los_Angeles-{period}"
        )
        for period, span in [
            ("yesterday", (datetime.date(2026, 5, 30), datetime.date(2026, 5, 30))),
            ("this_week", (datetime.date(2026, 5, 25), MAY_31)),
            ("last_week", (datetime.date(2026, 5, 18), datetime.date(2026, 5, 24))),
            ("this_month", (datetime.date(2026, 5, 1), MAY_31)),
            ("last_month", (datetime.date(2026, 4, 1), datetime.date(2026, 4, 30))),
        ]
    ],
)
def test_admin_period_filter_counts_from_today_in_the_company_zone(
    client, hr_user, settings, zone, now, period, span
):
    settings.COMPANY_TIMEZONE = zone
    ProcessedAttendance.objects.bulk_create(
        ProcessedAttendance(user_id="1001", work_date=work_date) for work_date in PERIOD_DAYS
    )

    with time_machine.travel(now, tick=False):
        client.force_login(hr_user)
        response = client.get(
            reverse("admin:core_processedattendance_changelist"), {"range": period}
        )

    shown = {row.work_date for row in response.context["cl"].result_list}
    assert shown == {work_date for work_date in PERIOD_DAYS if span[0] <= work_date <= span[1]}


def test_admin_edit_marks_the_day_manual_and_records_who(door, hr_client, hr_user):
    store(door, "1001", "2026-11-02 08:00")
    attendance_process()
    row = day("1001", "2026-11-02")
    url = reverse("admin:core_processedattendance_change", args=[row.pk])
    assert hr_client.get(url).status_code == 200

    response = hr_client.post(
        url,
        {
            "clock_in_0": "2026-11-02",
            "clock_in_1": "08:00:00",
            "clock_out_0": "2026-11-02",
            "clock_out_1": "17:00:00",
        },
    )

    assert response.status_code == 302
    row = day("1001", "2026-11-02")
    assert row.is_manual and row.edited_by == hr_user and row.edited_at is not None
    assert row.clock_out == at("2026-11-02 17:00", door)
    assert not row.is_outlier and row.version == 2


def test_admin_actions_recompute_and_mark_reviewed(door, hr_client, hr_user):
    store(door, "1001", "2026-11-02 05:00", "2026-11-02 17:00")
    attendance_process()
    row = day("1001", "2026-11-02")
    url = reverse("admin:core_processedattendance_changelist")

    hr_client.post(url, {"action": "mark_reviewed", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert row.reviewed_by == hr_user and row.reviewed_at is not None

    ProcessedAttendance.objects.filter(pk=row.pk).update(clock_out=None)
    hr_client.post(url, {"action": "recompute", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert row.clock_out == at("2026-11-02 17:00", door) and row.version == 2
