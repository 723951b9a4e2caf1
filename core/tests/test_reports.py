"""The timesheet (core.reports): per employee figures over a period, on crafted days."""

import datetime

import pytest
from django.contrib.auth import get_user_model

from core.models import ProcessedAttendance, RawAttendance
from core.processing import attendance_edit, attendance_process
from core.reports import TIMESHEET_COLUMNS, timesheet_build
from core.tests.factories import DeviceFactory, EmployeeFactory

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
NOV = {day: datetime.date(2026, 11, day) for day in range(1, 10)}


def punch(device, user_id: str, *stamps: str) -> None:
    RawAttendance.objects.bulk_create(
        RawAttendance(
            device=device,
            user_id=user_id,
            timestamp=datetime.datetime.fromisoformat(stamp).replace(tzinfo=UTC),
            status=1,
            verify_type=1,
        )
        for stamp in stamps
    )


@pytest.fixture
def crafted_days():
    """Two employees' days, processed by the real processing run (rules at their
    defaults: 08:00-17:00, 120 minutes either way in, 120 early out).

    2001 (no overrides), period 2 to 7 November:
      1st 08:00-17:00 (before the period), 2nd 08:00-17:00, 3rd 10:30-17:00
      (late in), 4th 08:00-14:00 (early out), 5th 08:00 only (missing out),
      6th 05:00-17:00 (early in: an outlier, neither late nor early out),
      7th 08:00-17:00 corrected by HR to 09:00-17:00, 8th 08:00-17:00 (after).
    2002 works 06:00-14:00 (employee overrides):
      2nd 09:00-14:00 (late for 06:00), 3rd 06:00-11:00 (early for 14:00),
      4th 08:00-14:00 (late and early by the defaults, on time by the
      overrides), 7th 06:00-14:00 (the period's last day), 8th (after).
    """
    door = DeviceFactory(name="Front door", timezone="UTC")
    EmployeeFactory(user_id="2001", name="Ann Lee")
    EmployeeFactory(
        user_id="2002",
        name="Bo Ng",
        work_start_time=datetime.time(6),
        work_end_time=datetime.time(14),
    )
    punch(door, "2001", "2026-11-01 08:00", "2026-11-01 17:00")
    punch(door, "2001", "2026-11-02 08:00", "2026-11-02 17:00")
    punch(door, "2001", "2026-11-03 10:30", "2026-11-03 17:00")
    punch(door, "2001", "2026-11-04 08:00", "2026-11-04 14:00")
    punch(door, "2001", "2026-11-05 08:00")
    punch(door, "2001", "2026-11-06 05:00", "2026-11-06 17:00")
    punch(door, "2001", "2026-11-07 08:00", "2026-11-07 17:00")
    punch(door, "2001", "2026-11-08 08:00", "2026-11-08 17:00")
    punch(door, "2002", "2026-11-02 09:00", "2026-11-02 14:00")
    punch(door, "2002", "2026-11-03 06:00", "2026-11-03 11:00")
    punch(door, "2002", "2026-11-04 08:00", "2026-11-04 14:00")
    punch(door, "2002", "2026-11-07 06:00", "2026-11-07 14:00")
    punch(door, "2002", "2026-11-08 06:00", "2026-11-08 14:00")
    attendance_process(full=True)
    hr = get_user_model().objects.create_user("hr")
    corrected = ProcessedAttendance.objects.get(user_id="2001", work_date=NOV[7])
    attendance_edit(
        record_id=corrected.pk,
        clock_in=datetime.datetime(2026, 11, 7, 9, tzinfo=UTC),
        clock_out=datetime.datetime(2026, 11, 7, 17, tzinfo=UTC),
        user=hr,
    )


def by_user(rows) -> dict[str, dict]:
    return {row["user_id"]: row for row in rows}


def test_timesheet_counts_late_early_missing_outlier_and_manual_days(crafted_days):
    rows = by_user(timesheet_build(start_date=NOV[2], end_date=NOV[7]))

    assert rows["2001"] == {
        "user_id": "2001",
        "name": "Ann Lee",
        "days_worked": 6,
        # 9 + 6.5 + 6 + 0 (no clock-out) + 12 + 8 (as corrected)
        "worked_hours": 41.5,
        "worked": "41:30",
        "late_clock_ins": 1,
        "early_clock_outs": 1,
        "missing_clock_outs": 1,
        # 3rd, 4th, 5th and 6th; the corrected 7th is an hour late, within the tolerance
        "outlier_days": 4,
        "manual_days": 1,
    }


def test_timesheet_judges_late_and_early_by_the_employees_own_hours(crafted_days):
    rows = by_user(timesheet_build(start_date=NOV[2], end_date=NOV[7]))

    assert rows["2002"] == {
        "user_id": "2002",
        "name": "Bo Ng",
        "days_worked": 4,
        "worked_hours": 24.0,
        "worked": "24:00",
        "late_clock_ins": 1,
        "early_clock_outs": 1,
        "missing_clock_outs": 0,
        "outlier_days": 2,
        "manual_days": 0,
    }


def test_timesheet_includes_both_ends_of_the_period_and_nothing_beyond(crafted_days):
    only_first = by_user(timesheet_build(start_date=NOV[1], end_date=NOV[1]))
    assert list(only_first) == ["2001"]
    assert only_first["2001"]["days_worked"] == 1

    last_two = by_user(timesheet_build(start_date=NOV[7], end_date=NOV[8]))
    assert last_two["2001"]["days_worked"] == 2
    assert last_two["2001"]["manual_days"] == 1
    assert last_two["2002"]["days_worked"] == 2
    assert last_two["2002"]["worked"] == "16:00"


def test_timesheet_is_two_queries_per_page_and_rows_are_flat(
    crafted_days, django_assert_num_queries
):
    rows = timesheet_build(start_date=NOV[1], end_date=NOV[9])
    with django_assert_num_queries(2):  # the aggregation, the names
        page = rows[0:10]
    assert [row["user_id"] for row in page] == ["2001", "2002"]
    assert all(tuple(row) == TIMESHEET_COLUMNS for row in page)
    with django_assert_num_queries(1):
        assert len(rows) == 2


def test_timesheet_filters_by_user_id(crafted_days):
    rows = list(timesheet_build(start_date=NOV[1], end_date=NOV[9], user_ids=["2002"]))
    assert [row["user_id"] for row in rows] == ["2002"]


def test_timesheet_lists_no_one_for_a_period_without_days(crafted_days):
    assert list(timesheet_build(start_date=NOV[9], end_date=NOV[9])) == []


def test_timesheet_refuses_an_end_before_the_start():
    with pytest.raises(ValueError, match="before the start date"):
        timesheet_build(start_date=NOV[3], end_date=NOV[2])
