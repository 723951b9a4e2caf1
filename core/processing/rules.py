"""The outlier rules, their overrides, and the wording of reasons. Pure: no database.

Outliers compare local wall-clock times, to the minute, with the expected start
and end: the employee's work_start_time/work_end_time, else the clock-in
device's, else WORK_START_TIME/WORK_END_TIME. The expected start is the
occurrence of the start time nearest to the clock-in (a 23:50 clock-in for a
00:30 start is 40 minutes early); the expected end follows it (22:00 → 06:00
ends the next morning). Exactly at a limit is not an outlier.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from django.conf import settings


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings a run computes days with."""

    max_shift: datetime.timedelta
    dedupe: datetime.timedelta
    work_start: datetime.time
    work_end: datetime.time
    early_in: int
    late_in: int
    early_out: int
    late_out: int

    @classmethod
    def from_settings(cls) -> Rules:
        return cls(
            max_shift=datetime.timedelta(hours=settings.MAX_SHIFT_HOURS),
            dedupe=datetime.timedelta(seconds=settings.DEDUPE_WINDOW_SECONDS),
            work_start=settings.WORK_START_TIME,
            work_end=settings.WORK_END_TIME,
            early_in=settings.EARLY_CLOCK_IN_MINUTES,
            late_in=settings.LATE_CLOCK_IN_MINUTES,
            early_out=settings.EARLY_CLOCK_OUT_MINUTES,
            late_out=settings.LATE_CLOCK_OUT_MINUTES,
        )


@dataclass(frozen=True, slots=True)
class Hours:
    """A device's or an employee's zone and schedule overrides (None: not set)."""

    zone: ZoneInfo | None
    work_start: datetime.time | None
    work_end: datetime.time | None


def expected_hours(
    rules: Rules, *, employee: Hours | None, device: Hours | None
) -> tuple[datetime.time, datetime.time]:
    """The start and end a day is judged against: the employee's overrides win
    over the clock-in device's, which win over the settings; each on its own."""
    start = (employee and employee.work_start) or (device and device.work_start)
    end = (employee and employee.work_end) or (device and device.work_end)
    return start or rules.work_start, end or rules.work_end


def reason(code: str, text: str) -> dict[str, str]:
    """One entry of outlier_reasons: the code, and a sentence that starts with it."""
    return {"code": code, "message": f"{code}: {text}"}


def _clock(moment: datetime.datetime | datetime.time) -> str:
    return f"{moment.hour:02d}:{moment.minute:02d}"


def _span(minutes: int) -> str:
    return f"{minutes // 60}h{minutes % 60:02d}m"


def day_outliers(
    *,
    clock_in: datetime.datetime,
    clock_out: datetime.datetime | None,
    work_start: datetime.time,
    work_end: datetime.time,
    rules: Rules,
    shift_starts: Sequence[datetime.datetime] = (),
) -> list[dict[str, str]]:
    """Outlier reasons for one day; clock_in/clock_out are aware, in their devices' zones.

    Compared to the minute, as HR reads them: 05:59:30 is 2h01m before 08:00.
    `shift_starts` are the local starts of the day's shifts when it has several.
    """
    reasons = []
    start = work_start.hour * 60 + work_start.minute
    offset = (clock_in.hour * 60 + clock_in.minute - start) % 1440
    if offset > 720:  # the nearest occurrence of the start time is the next day's
        offset -= 1440
    if offset < -rules.early_in:
        reasons.append(
            reason(
                "early_clock_in",
                f"{_clock(clock_in)} is {_span(-offset)} before {_clock(work_start)}",
            )
        )
    elif offset > rules.late_in:
        reasons.append(
            reason(
                "late_clock_in", f"{_clock(clock_in)} is {_span(offset)} after {_clock(work_start)}"
            )
        )
    if clock_out is None:
        reasons.append(reason("missing_clock_out", f"one punch only, at {_clock(clock_in)}"))
    else:
        # Wall-clock arithmetic on purpose: a 22:00 → 06:00 shift across a DST
        # change is still due out at 06:00 on the clock. In minutes from the
        # clock-in's local midnight:
        end = work_end.hour * 60 + work_end.minute
        expected_end = clock_in.hour * 60 + clock_in.minute - offset + (end - start) % 1440
        if clock_out.tzinfo != clock_in.tzinfo:
            # Out on a device in another zone: the end time on that device's clock
            # nearest to when the shift was due to end.
            midnight = clock_in.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
            due = midnight + datetime.timedelta(minutes=expected_end)
            moment = due.replace(tzinfo=clock_in.tzinfo).astimezone(clock_out.tzinfo)
            shift = (end - moment.hour * 60 - moment.minute) % 1440
            if shift > 720:
                shift -= 1440
            expected_end = (
                (moment.toordinal() - clock_in.toordinal()) * 1440
                + moment.hour * 60
                + moment.minute
                + shift
            )
        days = clock_out.toordinal() - clock_in.toordinal()
        out_offset = days * 1440 + clock_out.hour * 60 + clock_out.minute - expected_end
        if out_offset < -rules.early_out:
            reasons.append(
                reason(
                    "early_clock_out",
                    f"{_clock(clock_out)} is {_span(-out_offset)} before {_clock(work_end)}",
                )
            )
        elif out_offset > rules.late_out:
            reasons.append(
                reason(
                    "late_clock_out",
                    f"{_clock(clock_out)} is {_span(out_offset)} after {_clock(work_end)}",
                )
            )
    if len(shift_starts) > 1:
        times = ", ".join(_clock(moment) for moment in shift_starts)
        reasons.append(
            reason(
                "multiple_shifts",
                f"{len(shift_starts)} shifts start on this day ({times}); worked is their sum",
            )
        )
    return reasons
