"""Punches → shifts → day values. Pure: no database.

- A shift starts at an employee's first punch and takes in every later punch,
  from any device, within MAX_SHIFT_HOURS of that first punch; the next punch
  after that starts the next shift. Day and night workers need no setup.
- Punches of one employee within DEDUPE_WINDOW_SECONDS of the last punch kept
  count as one (double taps, also across devices). Suspect punches take no
  part: each one falls in the shift whose window holds it and is counted in
  that day's `ignored_suspect_punches`; one outside every shift belongs to no day.
- The work date is the local date, in the zone of the device that took it, of
  the shift's first punch, or the previous shift's work date when that is
  later: work dates never go back in time (Calendar.date_shifts). clock_in is
  the shift's first punch, clock_out its last when it has two or more.
- Two shifts that start on the same local date (a forgotten clock-out at 06:00,
  then a night shift from 22:30) share that date's row, the only row the
  unique (user_id, work_date) allows: clock_in is the first shift's, clock_out
  the last shift's last punch, worked the sum of the shifts, and the day is an
  outlier with reason `multiple_shifts` so that HR looks at it.
"""

from __future__ import annotations

import datetime
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from core.processing.rules import Hours, Rules, day_outliers, expected_hours

# (timestamp, device_id, is_suspect, received_at), in time order.
Punch = tuple[datetime.datetime, int, bool, datetime.datetime]

# What a run computes for a day, in the order day_values() gives them; a stored
# row whose values differ from these gets version + 1.
COMPUTED_FIELDS = (
    "employee_id",
    "clock_in",
    "clock_out",
    "clock_in_device_id",
    "clock_out_device_id",
    "punch_count",
    "worked",
    "is_outlier",
    "outlier_reasons",
    "ignored_suspect_punches",
)
CLOCK_IN = COMPUTED_FIELDS.index("clock_in")
IS_OUTLIER = COMPUTED_FIELDS.index("is_outlier")


@dataclass(slots=True)
class Shift:
    start: datetime.datetime
    start_device: int
    end: datetime.datetime
    end_device: int
    punches: int
    suspects: int
    newest_received: datetime.datetime
    local_start: datetime.datetime | None = None  # in the zone of start_device, once computed
    work_date: datetime.date | None = None  # set by Calendar.date_shifts


def build_shifts(
    punches: Iterable[Punch], *, max_shift: datetime.timedelta, dedupe: datetime.timedelta
) -> list[Shift]:
    """Chains one employee's punches, in time order, into shifts."""
    shifts: list[Shift] = []
    suspects: list[tuple[datetime.datetime, datetime.datetime]] = []
    shift: Shift | None = None
    kept: datetime.datetime | None = None
    for moment, device_id, is_suspect, received in punches:
        if is_suspect:
            suspects.append((moment, received))
            continue
        if shift is not None:
            if moment - kept <= dedupe:  # a double tap: the punch it repeats stands
                if received > shift.newest_received:
                    shift.newest_received = received
                continue
            if moment - shift.start <= max_shift:
                kept = shift.end = moment
                shift.end_device = device_id
                shift.punches += 1
                if received > shift.newest_received:
                    shift.newest_received = received
                continue
        kept = moment
        shift = Shift(moment, device_id, moment, device_id, 1, 0, received)
        shifts.append(shift)
    if suspects and shifts:
        starts = [s.start for s in shifts]
        for moment, received in suspects:
            index = bisect_right(starts, moment) - 1
            if index >= 0 and moment - starts[index] <= max_shift:
                owner = shifts[index]
                owner.suspects += 1
                if received > owner.newest_received:
                    owner.newest_received = received
    return shifts


@dataclass(slots=True)
class Calendar:
    """Dates and judges shifts: the rules, and each device's zone and hours.

    `devices` maps device ids to their Hours; a device missing there, or without
    a zone, is read in `default_zone`.
    """

    rules: Rules
    devices: dict[int, Hours]
    default_zone: ZoneInfo
    _hours: dict = field(default_factory=dict)

    def zone(self, device_id: int | None) -> ZoneInfo:
        hours = self.devices.get(device_id)
        return self.default_zone if hours is None or hours.zone is None else hours.zone

    def local_start(self, shift: Shift) -> datetime.datetime:
        if shift.local_start is None:
            shift.local_start = shift.start.astimezone(self.zone(shift.start_device))
        return shift.local_start

    def date_shifts(self, shifts: list[Shift], *, floor: datetime.date | None = None) -> None:
        """Sets each shift's work_date: the local date of its start, or the previous
        shift's work date when that is later (`floor` for the first shift).

        Work dates never go back in time, so each day is one run of consecutive
        shifts and no two days overlap. They could only go back when devices'
        zones are more than MAX_SHIFT_HOURS apart: 00:30 on a clock at UTC+14,
        then 17 hours later 21:30 on one at UTC-11, the day before.
        """
        for shift in shifts:
            work_date = self.local_start(shift).date()
            if floor is not None and work_date < floor:
                work_date = floor
            shift.work_date = floor = work_date

    def hours(
        self, employee: Hours | None, device_id: int | None
    ) -> tuple[datetime.time, datetime.time]:
        """The expected start and end of a day clocked in on this device."""
        key = (employee, device_id)
        found = self._hours.get(key)
        if found is None:
            found = self._hours[key] = expected_hours(
                self.rules, employee=employee, device=self.devices.get(device_id)
            )
        return found


def day_values(
    shifts: list[Shift], *, employee_id: int | None, employee: Hours | None, calendar: Calendar
) -> tuple:
    """The COMPUTED_FIELDS values of one day made of these shifts, in time order."""
    first = shifts[0]
    if len(shifts) == 1:
        punches, suspects, starts = first.punches, first.suspects, ()
    else:
        punches = sum(s.punches for s in shifts)
        suspects = sum(s.suspects for s in shifts)
        starts = [calendar.local_start(s) for s in shifts]
    clock_out = out_device = worked = local_out = None
    if punches >= 2:
        last = shifts[-1]
        clock_out, out_device = last.end, last.end_device
        worked = sum((s.end - s.start for s in shifts), datetime.timedelta())
        local_out = clock_out.astimezone(calendar.zone(out_device))
    work_start, work_end = calendar.hours(employee, first.start_device)
    reasons = day_outliers(
        clock_in=calendar.local_start(first),
        clock_out=local_out,
        work_start=work_start,
        work_end=work_end,
        rules=calendar.rules,
        shift_starts=starts,
    )
    return (
        employee_id,
        first.start,
        clock_out,
        first.start_device,
        out_device,
        punches,
        worked,
        bool(reasons),
        reasons,
        suspects,
    )
