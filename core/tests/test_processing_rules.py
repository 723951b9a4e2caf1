"""The outlier rules and the wording of reasons, without a database (core.processing.rules)."""

import dataclasses
import datetime
from zoneinfo import ZoneInfo

import pytest

from core.processing.rules import Hours, day_outliers, expected_hours
from core.tests.factories import DEFAULT_RULES as RULES

UTC = ZoneInfo("UTC")


def local(text: str, zone: str = "UTC") -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone))


def messages(
    clock_in, clock_out, *, start="08:00", end="17:00", rules=RULES, **kwargs
) -> list[str]:
    reasons = day_outliers(
        clock_in=clock_in,
        clock_out=clock_out,
        work_start=datetime.time.fromisoformat(start),
        work_end=datetime.time.fromisoformat(end),
        rules=rules,
        **kwargs,
    )
    assert all(r["message"].startswith(r["code"] + ": ") for r in reasons)
    return [r["message"] for r in reasons]


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
def test_outlier_limits_are_exclusive_to_the_minute(clock_in, clock_out, reasons):
    day = "2026-11-02 "
    assert messages(local(day + clock_in), local(day + clock_out)) == reasons


def test_a_single_punch_is_a_missing_clock_out():
    assert messages(local("2026-11-02 08:10"), None) == [
        "missing_clock_out: one punch only, at 08:10"
    ]


def test_the_expected_start_is_the_occurrence_nearest_to_the_clock_in():
    # 23:50 for a 00:30 start: 40 minutes early (the next day's 00:30), not 23h20m late.
    assert messages(local("2026-11-02 23:50"), None, start="00:30", end="08:30") == [
        "missing_clock_out: one punch only, at 23:50"
    ]
    strict = dataclasses.replace(RULES, early_in=30)
    assert messages(local("2026-11-02 23:50"), None, start="00:30", rules=strict)[0] == (
        "early_clock_in: 23:50 is 0h40m before 00:30"
    )
    assert messages(local("2026-11-02 22:00"), local("2026-11-03 06:05")) == [
        "early_clock_in: 22:00 is 10h00m before 08:00",
        "early_clock_out: 06:05 is 10h55m before 17:00",
    ]


@pytest.mark.parametrize("day", ["2026-03-28", "2026-10-24"])  # the two DST changes
def test_a_night_schedule_is_due_out_by_the_wall_clock_across_dst(day):
    clock_in = local(f"{day} 22:00", "Europe/Lisbon")
    next_day = datetime.date.fromisoformat(day) + datetime.timedelta(days=1)
    clock_out = local(f"{next_day} 06:00", "Europe/Lisbon")
    assert messages(clock_in, clock_out, start="22:00", end="06:00") == []


def test_a_clock_out_in_another_zone_is_judged_on_that_devices_clock():
    clock_in = local("2026-11-03 08:00", "Asia/Tokyo")
    on_time = local("2026-11-02 17:00", "America/New_York").astimezone(ZoneInfo("America/New_York"))
    # Due out at 17:00 Tokyo, 03:00 in New York; the nearest 17:00 there is 14 hours later.
    assert messages(clock_in, local("2026-11-02 03:00", "America/New_York")) == [
        "early_clock_out: 03:00 is 14h00m before 17:00"
    ]
    assert messages(clock_in, on_time) == []


def test_several_shift_starts_are_listed_in_the_multiple_shifts_reason():
    starts = [local("2026-11-02 06:00"), local("2026-11-02 22:30")]
    assert messages(local("2026-11-02 06:00"), local("2026-11-03 06:30"), shift_starts=starts)[
        -1
    ] == ("multiple_shifts: 2 shifts start on this day (06:00, 22:30); worked is their sum")
    assert (
        messages(local("2026-11-02 08:00"), local("2026-11-02 17:00"), shift_starts=starts[:1])
        == []
    )


def test_employee_hours_win_over_the_devices_which_win_over_the_rules_each_on_its_own():
    device = Hours(UTC, datetime.time(5), datetime.time(14))
    employee = Hours(None, datetime.time(12), None)
    assert expected_hours(RULES, employee=None, device=None) == (
        datetime.time(8),
        datetime.time(17),
    )
    assert expected_hours(RULES, employee=None, device=device) == (
        datetime.time(5),
        datetime.time(14),
    )
    assert expected_hours(RULES, employee=employee, device=device) == (
        datetime.time(12),
        datetime.time(14),
    )
    assert expected_hours(RULES, employee=employee, device=Hours(UTC, None, None)) == (
        datetime.time(12),
        datetime.time(17),
    )
