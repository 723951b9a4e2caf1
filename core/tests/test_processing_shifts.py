"""Punches → shifts → days, without a database: the scenarios of test_processing.py
run on core.processing.shifts (and diff_days, which groups the shifts into days)."""

import datetime
from zoneinfo import ZoneInfo

import pytest

from core.processing.diff import ROW_COLUMNS, diff_days
from core.processing.rules import Hours, Rules
from core.processing.shifts import Calendar, build_shifts
from core.tests.factories import DEFAULT_RULES as RULES

UTC = datetime.UTC
H = datetime.timedelta(hours=1)
M = datetime.timedelta(minutes=1)

DOOR, BACK_DOOR, TOKYO, NEW_YORK, LISBON, WAREHOUSE, KIRITIMATI, PAGO_PAGO = range(1, 9)
ZONES = {
    DOOR: "UTC",
    BACK_DOOR: "UTC",
    TOKYO: "Asia/Tokyo",
    NEW_YORK: "America/New_York",
    LISBON: "Europe/Lisbon",
    WAREHOUSE: "UTC",
    KIRITIMATI: "Pacific/Kiritimati",  # UTC+14
    PAGO_PAGO: "Pacific/Pago_Pago",  # UTC-11
}
DEVICES = {pk: Hours(ZoneInfo(zone), None, None) for pk, zone in ZONES.items()}
DEVICES[WAREHOUSE] = Hours(ZoneInfo("UTC"), datetime.time(5), datetime.time(14))
NIGHTS = Hours(None, datetime.time(22), datetime.time(6))


def at(local: str, device: int) -> datetime.datetime:
    """A device-local wall-clock time as aware UTC (fold=0, as ingest converts)."""
    naive = datetime.datetime.fromisoformat(local)
    return naive.replace(tzinfo=ZoneInfo(ZONES[device])).astimezone(UTC)


def punch(local: str, device: int = DOOR, *, suspect: bool = False) -> tuple:
    moment = at(local, device)
    return (moment, device, suspect, moment + M)


def days(*punches: tuple, employee: Hours | None = None, rules: Rules = RULES) -> dict:
    """The days these punches give, by work date, as dicts of ProcessedAttendance fields."""
    calendar = Calendar(rules, DEVICES, ZoneInfo("UTC"))
    shifts = build_shifts(sorted(punches), max_shift=rules.max_shift, dedupe=rules.dedupe)
    calendar.date_shifts(shifts)
    diff = diff_days(
        user_id="1001",
        shifts=shifts,
        stored={},
        low=None,
        high=None,
        employee_id=None,
        employee=employee,
        calendar=calendar,
    )
    assert not (diff.changed or diff.vanished or diff.flagged)
    rows = [dict(zip(ROW_COLUMNS, row, strict=True)) for row in diff.new]
    return {row["work_date"]: row for row in rows}


def only(found: dict) -> dict:
    assert len(found) == 1, found
    return next(iter(found.values()))


def codes(row: dict) -> list[str]:
    return [reason["code"] for reason in row["outlier_reasons"]]


D = datetime.date.fromisoformat


def test_ordinary_day_is_one_day_with_first_punch_in_and_last_punch_out():
    row = only(
        days(
            punch("2026-11-02 08:02"),
            punch("2026-11-02 12:30"),
            punch("2026-11-02 13:15"),
            punch("2026-11-02 17:05"),
        )
    )
    assert row["work_date"] == D("2026-11-02")
    assert (row["clock_in"], row["clock_out"]) == (
        at("2026-11-02 08:02", DOOR),
        at("2026-11-02 17:05", DOOR),
    )
    assert row["clock_in_device_id"] == row["clock_out_device_id"] == DOOR
    assert row["punch_count"] == 4
    assert row["worked"] == datetime.timedelta(hours=9, minutes=3)
    assert not row["is_outlier"] and row["outlier_reasons"] == []
    assert row["version"] == 1


def test_night_shift_across_midnight_is_one_day_dated_on_its_start():
    found = days(
        punch("2026-11-02 22:00"),
        punch("2026-11-03 06:05"),
        punch("2026-11-03 21:55"),
        punch("2026-11-04 06:00"),
        employee=NIGHTS,
    )
    assert list(found) == [D("2026-11-02"), D("2026-11-03")]
    first, second = found.values()
    assert (first["clock_in"], first["clock_out"]) == (
        at("2026-11-02 22:00", DOOR),
        at("2026-11-03 06:05", DOOR),
    )
    assert first["worked"] == second["worked"] == datetime.timedelta(hours=8, minutes=5)
    assert not first["is_outlier"] and not second["is_outlier"]


def test_night_worker_without_an_override_is_judged_against_the_day_schedule():
    row = only(days(punch("2026-11-02 22:00"), punch("2026-11-03 06:05")))
    assert codes(row) == ["early_clock_in", "early_clock_out"]
    assert row["outlier_reasons"][0]["message"] == "early_clock_in: 22:00 is 10h00m before 08:00"


def test_forgotten_clock_out_does_not_swallow_the_next_day():
    found = days(punch("2026-11-02 08:00"), punch("2026-11-03 07:55"), punch("2026-11-03 17:00"))
    forgotten, next_day = found[D("2026-11-02")], found[D("2026-11-03")]
    assert (forgotten["clock_out"], forgotten["worked"]) == (None, None)
    assert codes(forgotten) == ["missing_clock_out"]
    assert next_day["clock_in"] == at("2026-11-03 07:55", DOOR)
    assert next_day["punch_count"] == 2 and not next_day["is_outlier"]


def test_double_taps_within_the_window_count_as_one_punch_even_across_devices():
    row = only(
        days(
            punch("2026-11-02 08:00:00"),
            punch("2026-11-02 17:00:00"),
            punch("2026-11-02 08:00:40", BACK_DOOR),
            punch("2026-11-02 17:01:00", BACK_DOOR),
        )
    )
    assert row["punch_count"] == 2
    assert (row["clock_out"], row["clock_out_device_id"]) == (at("2026-11-02 17:00", DOOR), DOOR)


def test_taps_just_over_the_dedupe_window_are_two_punches():
    row = only(days(punch("2026-11-02 08:00:00"), punch("2026-11-02 08:01:01")))
    assert (row["punch_count"], row["clock_out"]) == (2, at("2026-11-02 08:01:01", DOOR))


def test_a_double_tap_alone_is_a_single_punch_without_clock_out():
    row = only(days(punch("2026-11-02 08:00:00"), punch("2026-11-02 08:00:30")))
    assert (row["punch_count"], row["clock_out"], row["worked"]) == (1, None, None)
    assert row["outlier_reasons"] == [
        {"code": "missing_clock_out", "message": "missing_clock_out: one punch only, at 08:00"}
    ]


def test_in_on_one_device_and_out_on_another_is_one_day():
    row = only(days(punch("2026-11-02 08:00"), punch("2026-11-02 17:00", BACK_DOOR)))
    assert (row["clock_in_device_id"], row["clock_out_device_id"]) == (DOOR, BACK_DOOR)
    assert row["worked"] == 9 * H


def test_each_punch_is_dated_and_judged_in_its_own_devices_zone():
    # 08:00 in Tokyo is 23:00 UTC the day before.
    tokyo_day = only(days(punch("2026-11-03 08:00", TOKYO), punch("2026-11-03 17:00", TOKYO)))
    assert tokyo_day["work_date"] == D("2026-11-03")
    assert tokyo_day["clock_in"] == datetime.datetime(2026, 11, 2, 23, tzinfo=UTC)
    assert not tokyo_day["is_outlier"]
    # In on Tokyo, out on New York: the clock-out is read on New York's clock.
    mixed = only(days(punch("2026-11-03 08:00", TOKYO), punch("2026-11-02 23:30", NEW_YORK)))
    assert mixed["work_date"] == D("2026-11-03")
    assert mixed["worked"] == datetime.timedelta(hours=5, minutes=30)
    assert mixed["outlier_reasons"] == [
        {"code": "late_clock_out", "message": "late_clock_out: 23:30 is 6h30m after 17:00"}
    ]


@pytest.mark.parametrize(
    ("start", "end", "worked"),
    [
        ("2026-03-28 22:00", "2026-03-29 06:00", 7 * H),  # clocks go forward
        ("2026-10-24 22:00", "2026-10-25 06:00", 9 * H),  # clocks go back
    ],
)
def test_night_shift_over_a_dst_change_is_one_day_due_out_by_the_wall_clock(start, end, worked):
    row = only(days(punch(start, LISBON), punch(end, LISBON), employee=NIGHTS))
    assert row["work_date"] == D(start[:10])
    assert row["worked"] == worked
    assert not row["is_outlier"]


def test_two_shifts_starting_on_one_local_date_share_its_day_and_are_flagged():
    row = only(
        days(punch("2026-11-02 06:00"), punch("2026-11-02 22:30"), punch("2026-11-03 06:30"))
    )
    assert row["work_date"] == D("2026-11-02")
    assert (row["clock_in"], row["clock_out"]) == (
        at("2026-11-02 06:00", DOOR),
        at("2026-11-03 06:30", DOOR),
    )
    assert (row["worked"], row["punch_count"]) == (8 * H, 3)
    assert row["outlier_reasons"][-1]["message"] == (
        "multiple_shifts: 2 shifts start on this day (06:00, 22:30); worked is their sum"
    )


def test_suspect_punches_are_ignored_and_counted_on_the_day_whose_window_holds_them():
    row = only(
        days(
            punch("2026-11-02 08:00"),
            punch("2026-11-02 17:00"),
            punch("2026-11-02 06:00", suspect=True),  # before the shift started: no day's
            punch("2026-11-02 20:00", suspect=True),
        )
    )
    assert (row["clock_in"], row["clock_out"]) == (
        at("2026-11-02 08:00", DOOR),
        at("2026-11-02 17:00", DOOR),
    )
    assert (row["punch_count"], row["ignored_suspect_punches"]) == (2, 1)


def test_a_suspect_punch_outside_every_shift_gives_no_day():
    assert days(punch("2026-11-02 09:00", suspect=True)) == {}


def test_a_shift_takes_punches_up_to_max_shift_hours_after_its_first_and_no_later():
    found = days(punch("2026-11-02 08:00"), punch("2026-11-03 00:00"), punch("2026-11-03 00:05"))
    assert found[D("2026-11-02")]["clock_out"] == at("2026-11-03 00:00", DOOR)
    assert found[D("2026-11-03")]["clock_in"] == at("2026-11-03 00:05", DOOR)


def test_device_hours_win_over_the_rules_and_employee_hours_over_the_devices():
    device_day = only(
        days(punch("2026-11-02 05:00", WAREHOUSE), punch("2026-11-02 14:00", WAREHOUSE))
    )
    assert not device_day["is_outlier"]
    employee_day = only(
        days(
            punch("2026-11-02 05:00", WAREHOUSE),
            punch("2026-11-02 17:00", WAREHOUSE),
            employee=Hours(None, datetime.time(12), None),
        )
    )
    assert employee_day["outlier_reasons"][0]["message"] == (
        "early_clock_in: 05:00 is 7h00m before 12:00"
    )


def test_work_dates_never_go_back_when_devices_zones_are_further_apart_than_a_shift():
    # 17 hours after a 00:30 clock-in at UTC+14, 21:30 at UTC-11 is the day before:
    # that second shift is dated on the first one's day, which has two shifts.
    row = only(
        days(
            punch("2026-11-03 00:30", KIRITIMATI),
            punch("2026-11-03 08:30", KIRITIMATI),
            punch("2026-11-02 21:30", PAGO_PAGO),
        )
    )
    assert row["work_date"] == D("2026-11-03")
    assert (row["clock_in"], row["clock_out"]) == (
        at("2026-11-03 00:30", KIRITIMATI),
        at("2026-11-02 21:30", PAGO_PAGO),
    )
    assert "multiple_shifts" in codes(row)


def test_the_first_shift_of_a_chain_is_dated_no_earlier_than_its_floor():
    calendar = Calendar(RULES, DEVICES, ZoneInfo("UTC"))
    shifts = build_shifts(
        [punch("2026-11-02 21:30", PAGO_PAGO), punch("2026-11-04 09:00", PAGO_PAGO)],
        max_shift=RULES.max_shift,
        dedupe=RULES.dedupe,
    )

    calendar.date_shifts(shifts, floor=D("2026-11-03"))

    assert [s.work_date for s in shifts] == [D("2026-11-03"), D("2026-11-04")]
