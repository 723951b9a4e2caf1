"""Benchmark: the timesheet (core.reports.timesheet_build) over a year of days.

Loads 1 000 employees × 365 days of daily records (261 000 with a clock-in,
weekdays only; a tenth late, a tenth early out, a twentieth without a
clock-out, a fiftieth corrected by HR) and prints, side by side, in the order
they run:

  (a) one API page (100 employees) of a month's timesheet;
  (b) one API page of the year's timesheet;
  (c) the whole year's timesheet, every employee, iterated as the CSV
      download does;
  (d) the baseline: a naive loop reading each employee's days with a query
      per employee and adding them up in Python, over the same year.

Needs DATABASE_URL pointing at PostgreSQL; uses its own database
(<name>_bench_timesheet), emptied and loaded again before each run unless
--reuse says to measure what the previous run loaded.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/attendance_bridge \\
        .venv/bin/python bench/bench_timesheet.py [--employees 1000 --days 365] [--reuse]
"""

import argparse
import datetime
import random
import time

from benchdb import setup_django  # bench/ is on sys.path when run as a script

UTC = datetime.UTC


def load(employees: int, days: int) -> int:
    from django.db import connection

    from core.models import Employee, ProcessedAttendance
    from core.processing.rules import reason

    ProcessedAttendance.objects.all().delete()
    Employee.objects.all().delete()
    Employee.objects.bulk_create(
        Employee(user_id=str(10000 + n), name=f"Employee {n}") for n in range(employees)
    )
    rng = random.Random(7)
    first = datetime.date(2025, 1, 1)
    rows = []
    stored = 0
    for n in range(employees):
        for offset in range(days):
            day = first + datetime.timedelta(days=offset)
            if day.weekday() >= 5:
                continue
            start = datetime.datetime.combine(day, datetime.time(8), UTC)
            roll = rng.random()
            reasons = []
            clock_in, clock_out = start, start + datetime.timedelta(hours=9)
            if roll < 0.1:
                clock_in = start + datetime.timedelta(hours=2, minutes=30)
                reasons.append(reason("late_clock_in", "10:30 is 2h30m after 08:00"))
            elif roll < 0.2:
                clock_out = start + datetime.timedelta(hours=5)
                reasons.append(reason("early_clock_out", "13:00 is 4h00m before 17:00"))
            elif roll < 0.25:
                clock_out = None
                reasons.append(reason("missing_clock_out", "one punch only, at 08:00"))
            rows.append(
                ProcessedAttendance(
                    user_id=str(10000 + n),
                    work_date=day,
                    clock_in=clock_in,
                    clock_out=clock_out,
                    worked=None if clock_out is None else clock_out - clock_in,
                    punch_count=1 if clock_out is None else 2,
                    is_outlier=bool(reasons),
                    outlier_reasons=reasons,
                    is_manual=0.25 <= roll < 0.27,
                )
            )
            if len(rows) >= 20000:
                ProcessedAttendance.objects.bulk_create(rows)
                stored += len(rows)
                rows = []
    ProcessedAttendance.objects.bulk_create(rows)
    stored += len(rows)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE core_processedattendance")
    return stored


def naive(start: datetime.date, end: datetime.date) -> list[dict]:
    """One query per employee, sums in Python: what the SQL aggregation replaces."""
    from core.models import Employee, ProcessedAttendance

    result = []
    for employee in Employee.objects.order_by("user_id"):
        days = ProcessedAttendance.objects.filter(
            user_id=employee.user_id,
            work_date__gte=start,
            work_date__lte=end,
            clock_in__isnull=False,
        )
        total = datetime.timedelta()
        counts = dict.fromkeys(("days", "late", "early", "missing", "outlier", "manual"), 0)
        for day in days:
            codes = {r["code"] for r in day.outlier_reasons}
            counts["days"] += 1
            total += day.worked or datetime.timedelta()
            counts["late"] += "late_clock_in" in codes
            counts["early"] += "early_clock_out" in codes
            counts["missing"] += day.clock_out is None
            counts["outlier"] += day.is_outlier
            counts["manual"] += day.is_manual
        result.append({"user_id": employee.user_id, "worked": total, **counts})
    return result


def timed(label: str, func):
    print(f"{label} ...", flush=True)
    started = time.perf_counter()
    value = func()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--employees", type=int, default=1000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--reuse", action="store_true", help="measure the rows loaded before")
    options = parser.parse_args()
    setup_django("bench_timesheet")

    from core.models import ProcessedAttendance
    from core.reports import timesheet_build

    if options.reuse:
        print(f"{ProcessedAttendance.objects.count():,} daily rows from the previous load.")
    else:
        started = time.perf_counter()
        stored = load(options.employees, options.days)
        print(f"{stored:,} daily rows loaded in {time.perf_counter() - started:.1f} s.")

    first = datetime.date(2025, 1, 1)
    year_end = first + datetime.timedelta(days=options.days - 1)
    month_end = datetime.date(2025, 1, 31)

    month_page, a = timed(
        "(a) a month, one page", lambda: timesheet_build(start_date=first, end_date=month_end)[:100]
    )
    year_page, b = timed(
        "(b) the year, one page", lambda: timesheet_build(start_date=first, end_date=year_end)[:100]
    )
    year_all, c = timed(
        "(c) the year, every employee",
        lambda: list(timesheet_build(start_date=first, end_date=year_end)),
    )
    baseline, d = timed("(d) naive loop, the year", lambda: naive(first, year_end))

    assert len(year_all) == len(baseline) == options.employees
    for row, check in zip(year_all, baseline, strict=True):
        assert row["days_worked"] == check["days"] and row["late_clock_ins"] == check["late"]
        assert row["missing_clock_outs"] == check["missing"]
        assert row["manual_days"] == check["manual"]

    print()
    print(f"{'':40} {'seconds':>8} {'employees/s':>12} {'days/s':>12}")
    days_year = sum(row["days_worked"] for row in year_all)
    days_month = sum(
        row["days_worked"] for row in timesheet_build(start_date=first, end_date=month_end)
    )
    for label, seconds, employees, days in [
        (
            "(a) month, one page (100)",
            a,
            len(month_page),
            days_month * len(month_page) / options.employees,
        ),
        (
            "(b) year, one page (100)",
            b,
            len(year_page),
            days_year * len(year_page) / options.employees,
        ),
        ("(c) year, all employees", c, len(year_all), days_year),
        ("(d) baseline: naive loop, year", d, len(baseline), days_year),
    ]:
        print(f"{label:40} {seconds:8.3f} {employees / seconds:12,.0f} {days / seconds:12,.0f}")
    print()
    print(f"The SQL aggregation (c) against the naive loop (d): {d / c:.1f} times as fast.")


if __name__ == "__main__":
    main()
