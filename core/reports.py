"""Reports over the daily records: the timesheet payroll asks for.

The figures come from ProcessedAttendance in one SQL aggregation per page,
and the names in one more query, never a query per row. "Late" and "early" are the outlier rules of
core.processing.rules, as processing (or an HR correction) applied them to
each day: a clock-in more than LATE_CLOCK_IN_MINUTES after the expected start
(the employee's work_start_time, else the clock-in device's, else
WORK_START_TIME) is a late clock-in; a clock-out more than
EARLY_CLOCK_OUT_MINUTES before the expected end is an early one. The report
counts the reason codes stored on the days (``late_clock_in``,
``early_clock_out``), so it agrees with the daily attendance pages; days keep
the rules of their last computation until they are processed again
(``process_attendance --full``).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Sequence
from typing import Any

from django.db.models import Count, Q, QuerySet, Sum

from core.models import Employee, ProcessedAttendance

# The columns of a timesheet row, in the order the CSV download writes them.
TIMESHEET_COLUMNS = (
    "user_id",
    "name",
    "days_worked",
    "worked_hours",
    "worked",
    "late_clock_ins",
    "early_clock_outs",
    "missing_clock_outs",
    "outlier_days",
    "manual_days",
)

# Rows read per query when a timesheet is iterated whole (the CSV download).
ITERATION_CHUNK = 2000


def _reason(code: str) -> Q:
    # The code in quotes: a reason's message starts with "code: ...", so only
    # the code itself is the quoted string. Text search works alike on
    # PostgreSQL's jsonb and SQLite's JSON text; only outlier days have reasons,
    # so the others skip it.
    return Q(is_outlier=True) & Q(outlier_reasons__icontains=f'"{code}"')


def _hours_minutes(total: datetime.timedelta | None) -> str:
    minutes = int((total or datetime.timedelta()).total_seconds()) // 60
    return f"{minutes // 60}:{minutes % 60:02d}"


def timesheet_row(values: dict[str, Any], name: str = "") -> dict[str, Any]:
    """One employee's aggregated values as the flat row the report shows."""
    total = values["worked_total"] or datetime.timedelta()
    return {
        "user_id": values["user_id"],
        "name": name,
        "days_worked": values["days_worked"],
        "worked_hours": round(total.total_seconds() / 3600, 2),
        "worked": _hours_minutes(total),
        "late_clock_ins": values["late_clock_ins"],
        "early_clock_outs": values["early_clock_outs"],
        "missing_clock_outs": values["missing_clock_outs"],
        "outlier_days": values["outlier_days"],
        "manual_days": values["manual_days"],
    }


def _rows(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Names by user_id (a day's employee link may be unset), one query per
    # batch: in the aggregation, a lookup would run once per day.
    names = dict(
        Employee.objects.filter(user_id__in=[values["user_id"] for values in batch]).values_list(
            "user_id", "name"
        )
    )
    return [timesheet_row(values, names.get(values["user_id"], "")) for values in batch]


class TimesheetRows(Sequence):
    """The rows of a timesheet, read lazily: counted and sliced in SQL (a page
    of the API), or iterated in chunks (a download), never all in memory. Two
    queries a page or chunk: the aggregation, and the employees' names."""

    def __init__(self, queryset: QuerySet):
        self.queryset = queryset

    def count(self) -> int:
        return self.queryset.count()

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, item):
        if isinstance(item, slice):
            return _rows(list(self.queryset[item]))
        return _rows([self.queryset[item]])[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batch = []
        for values in self.queryset.iterator(chunk_size=ITERATION_CHUNK):
            batch.append(values)
            if len(batch) == ITERATION_CHUNK:
                yield from _rows(batch)
                batch = []
        if batch:
            yield from _rows(batch)


def timesheet_build(
    *,
    start_date: datetime.date,
    end_date: datetime.date,
    user_ids: Sequence[str] | None = None,
) -> TimesheetRows:
    """Per employee (user_id) over start_date..end_date, both included: days
    worked, total worked time, late clock-ins, early clock-outs, missing
    clock-outs, outlier days and days HR corrected (manual), ordered by user_id.

    A day counts when it has a clock-in; days emptied because their punches
    went away count for nothing. Employees with no day in the period are not
    listed. Reads only, so idempotent. Raises ValueError when end_date is
    before start_date.
    """
    if end_date < start_date:
        raise ValueError(f"The end date {end_date} is before the start date {start_date}.")
    days = ProcessedAttendance.objects.filter(
        work_date__gte=start_date, work_date__lte=end_date, clock_in__isnull=False
    )
    if user_ids is not None:
        days = days.filter(user_id__in=list(user_ids))
    queryset = (
        days.values("user_id")
        .annotate(
            days_worked=Count("pk"),
            worked_total=Sum("worked"),
            late_clock_ins=Count("pk", filter=_reason("late_clock_in")),
            early_clock_outs=Count("pk", filter=_reason("early_clock_out")),
            missing_clock_outs=Count("pk", filter=Q(clock_out__isnull=True)),
            outlier_days=Count("pk", filter=Q(is_outlier=True)),
            manual_days=Count("pk", filter=Q(is_manual=True)),
        )
        .order_by("user_id")
    )
    return TimesheetRows(queryset)
