"""Computed days against stored rows: what to insert, update, empty and flag. Pure.

Only differences are written, so re-running changes nothing and bumps no version.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from core.processing.rules import Hours
from core.processing.shifts import (
    CLOCK_IN,
    COMPUTED_FIELDS,
    IS_OUTLIER,
    Calendar,
    Shift,
    day_values,
)

# A row as diff_days gives it and storage writes it: (user_id, work_date,
# *COMPUTED_FIELDS, version).
ROW_COLUMNS = ("user_id", "work_date", *COMPUTED_FIELDS, "version")


@dataclass(slots=True)
class StoredDay:
    """A stored ProcessedAttendance row, as far as a run needs it."""

    pk: int
    values: tuple  # as in COMPUTED_FIELDS
    is_manual: bool
    version: int
    has_newer_punches: bool
    seen_at: datetime.datetime | None  # the later of edited_at and reviewed_at

    @property
    def clock_in(self) -> datetime.datetime | None:
        return self.values[CLOCK_IN]


@dataclass(slots=True)
class DayDiff:
    new: list[tuple] = field(default_factory=list)  # rows as in ROW_COLUMNS
    changed: list[tuple[int, tuple]] = field(default_factory=list)  # (pk, row)
    vanished: list[int] = field(default_factory=list)  # pks of days the punches no longer give
    flagged: list[int] = field(default_factory=list)  # pks of HR-edited days with newer punches
    outliers: int = 0  # among the days computed


def diff_days(
    *,
    user_id: str,
    shifts: list[Shift],
    stored: dict[datetime.date, StoredDay],
    low: datetime.datetime | None,
    high: datetime.datetime | None,
    employee_id: int | None,
    employee: Hours | None,
    calendar: Calendar,
) -> DayDiff:
    """The changes that make one employee's stored rows match their shifts in [low, high).

    `shifts` are dated (Calendar.date_shifts); None for low/high is unbounded.
    Stored rows whose clock-in lies in [low, high) and that no shift gives any
    more vanish. HR-edited rows are never changed; one gets flagged when punches
    received after its edit (or review) fall on its day.
    """
    diff = DayDiff()
    days: dict[datetime.date, list[Shift]] = {}
    for shift in shifts:
        if (low is not None and shift.start < low) or (high is not None and shift.start >= high):
            continue
        days.setdefault(shift.work_date, []).append(shift)
    for work_date, day_shifts in days.items():
        existing = stored.get(work_date)
        if existing is not None and existing.is_manual:
            newest = max(s.newest_received for s in day_shifts)
            if (
                not existing.has_newer_punches
                and existing.seen_at is not None
                and newest > existing.seen_at
            ):
                diff.flagged.append(existing.pk)
            continue
        values = day_values(
            day_shifts, employee_id=employee_id, employee=employee, calendar=calendar
        )
        if values[IS_OUTLIER]:
            diff.outliers += 1
        if existing is None:
            diff.new.append((user_id, work_date, *values, 1))
        elif existing.values != values:
            diff.changed.append((existing.pk, (user_id, work_date, *values, existing.version + 1)))
    for work_date, row in stored.items():
        clock_in = row.values[CLOCK_IN]
        if (
            work_date not in days
            and not row.is_manual
            and clock_in is not None
            and (low is None or clock_in >= low)
            and (high is None or clock_in < high)
        ):
            diff.vanished.append(row.pk)
    return diff
