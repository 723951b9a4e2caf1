"""Processing: raw punches → one ProcessedAttendance row per employee and work day.

Rules
-----
- A shift starts at an employee's first punch and takes in every later punch,
  from any device, within MAX_SHIFT_HOURS of that first punch; the next punch
  after that starts the next shift. Day and night workers need no setup.
- Punches of one employee within DEDUPE_WINDOW_SECONDS of the last punch kept
  count as one (double taps, also across devices). Suspect punches take no
  part: each one falls in the shift whose window holds it and is counted in
  that day's `ignored_suspect_punches`; one outside every shift belongs to no day.
- The work date is the local date, in the zone of the device that took it, of
  the shift's first punch. clock_in is that punch, clock_out the shift's last
  punch when the shift has two or more.
- Two shifts that start on the same local date (a forgotten clock-out at 06:00,
  then a night shift from 22:30) share that date's row, the only row the
  unique (user_id, work_date) allows: clock_in is the first shift's, clock_out
  the last shift's last punch, worked the sum of the shifts, and the day is an
  outlier with reason `multiple_shifts` so that HR looks at it.
- Outliers compare local wall-clock times, to the minute, with the expected
  start and end: the employee's work_start_time/work_end_time, else the
  clock-in device's, else WORK_START_TIME/WORK_END_TIME. The expected start is
  the occurrence of the start time nearest to the clock-in (a 23:50 clock-in
  for a 00:30 start is 40 minutes early); the expected end follows it (22:00 →
  06:00 ends the next morning). Exactly at a limit is not an outlier.

Incremental runs, and why they are correct
------------------------------------------
Shift boundaries up to a moment depend only on the punches before it, so a
stored (non-manual) row's clock_in stays a true shift start as long as no
punch arrives before it. For each employee with new punches between `since`
and `until`, a run re-chains from the latest such clock_in at or before
`since` (the anchor) and stops at the first recomputed shift start after
`until` that matches a stored row's clock_in: from there on the chain, and the
rows, are the stored ones. A late punch can extend or split its neighbours,
so the punches read reach 2 × MAX_SHIFT_HOURS past `until`, and to the last
punch when the chain has not settled by then.

Which punches are new: ids only grow, but a poll's transaction can commit after
a later poll's, so a run may read past an id that is not visible yet. RawAttendance
.received_at is stamped when a poll starts, and a poll commits within
LATE_COMMIT_MARGIN of that. A run therefore reads punches with an id above the
highest the previous run saw, plus those received within the margin before
the previous run started; a punch like that has an id above the highest seen
by a run that started at least the margin before the previous one, which
bounds the read to recent ids (ProcessingState.recent_runs keeps those runs).

Reads and writes are in bulk, per batch of employees: a handful of queries
whatever the batch's size. Rows are compared with what the punches give and
only differences are written: new rows in one COPY (bulk_create on SQLite),
changed ones in one UPDATE, removed ones in one DELETE. Re-running changes
nothing. On PostgreSQL the hot reads and writes bypass the ORM's per-value
work (see _fetch, _Inserter); the queries themselves are still built by it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import logging
import operator
import time
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Lookup, Max, Min, Q, QuerySet
from django.utils import timezone
from psycopg.pq import Format

from core.models import Device, Employee, ProcessedAttendance, ProcessingState, RawAttendance

logger = logging.getLogger(__name__)

UTC = datetime.UTC
DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)
UTC_MIN = datetime.datetime.min.replace(tzinfo=UTC)
STATE_NAME = "attendance"
# received_at is stamped when a poll starts, before the device download, and the
# poll's punches commit after the download and store: this must exceed the
# longest poll. A run re-reads what was received this long before the previous run.
LATE_COMMIT_MARGIN = datetime.timedelta(minutes=15)
# Employees per round of queries. A few hundred keeps a full run's memory
# bounded (each employee's whole history is read); an incremental run reads a
# couple of days per employee, so on PostgreSQL it takes bigger, fewer rounds.
# SQLite keeps to 250, inside its 999 query variables.
USER_BATCH = 250
USER_BATCH_INCREMENTAL = 2000
# Days before an employee's earliest new punch within which their anchor is looked
# for first (_stored_rows): yesterday's row, or Friday's on a Monday.
ANCHOR_DAYS = 3
# How far apart the windows of employees read by one query may start (_clusters).
CLUSTER_SPREAD = datetime.timedelta(days=7)
WRITE_BATCH = 2000

# What a run computes; a row whose values differ from these gets version + 1.
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
_UPSERT_FIELDS = [
    "employee",
    "clock_in",
    "clock_out",
    "clock_in_device",
    "clock_out_device",
    "punch_count",
    "worked",
    "is_outlier",
    "outlier_reasons",
    "ignored_suspect_punches",
    "version",
    "sync_state",
    "sync_attempts",
    "next_sync_at",
    "updated_at",
]
_STORED_FIELDS = (
    "id",
    "user_id",
    "work_date",
    *COMPUTED_FIELDS,
    "is_manual",
    "version",
    "has_newer_punches",
    "edited_at",
    "reviewed_at",
)


# --- Results -------------------------------------------------------------------------


@dataclass
class ProcessingResult:
    mode: str
    new_punches: int = 0
    groups_recomputed: int = 0
    punches_read: int = 0
    rows_created: int = 0
    rows_changed: int = 0
    rows_deleted: int = 0
    rows_voided: int = 0
    outliers: int = 0
    manual_flagged: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lines = [
            f"mode: {self.mode}",
            f"groups recomputed: {self.groups_recomputed}",
            f"rows created: {self.rows_created}",
            f"rows changed: {self.rows_changed}",
            f"outliers: {self.outliers}",
        ]
        if self.mode == "incremental":
            lines.insert(1, f"new punches: {self.new_punches}")
        if self.rows_deleted or self.rows_voided:
            lines.append(
                f"rows removed: {self.rows_deleted} deleted, {self.rows_voided} emptied "
                "(already sent to the CRM, sent again as a correction)"
            )
        if self.manual_flagged:
            lines.append(f"HR-edited days with newer punches: {self.manual_flagged}")
        lines.append(f"punches read: {self.punches_read} in {self.seconds:.2f} s")
        return lines

    def summary(self) -> str:
        return "; ".join(self.lines())


# --- Rules -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rules:
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
class _Hours:
    """A device's or an employee's zone and schedule overrides (None: not set)."""

    zone: ZoneInfo | None
    work_start: datetime.time | None
    work_end: datetime.time | None


def _device_hours() -> dict[int, _Hours]:
    rows = Device.objects.values_list("id", "timezone", "work_start_time", "work_end_time")
    return {pk: _Hours(ZoneInfo(tz), start, end) for pk, tz, start, end in rows}


def _reason(code: str, text: str) -> dict[str, str]:
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
    """
    reasons = []
    start = work_start.hour * 60 + work_start.minute
    offset = (clock_in.hour * 60 + clock_in.minute - start) % 1440
    if offset > 720:  # the nearest occurrence of the start time is the next day's
        offset -= 1440
    if offset < -rules.early_in:
        reasons.append(
            _reason(
                "early_clock_in",
                f"{_clock(clock_in)} is {_span(-offset)} before {_clock(work_start)}",
            )
        )
    elif offset > rules.late_in:
        reasons.append(
            _reason(
                "late_clock_in", f"{_clock(clock_in)} is {_span(offset)} after {_clock(work_start)}"
            )
        )
    if clock_out is None:
        reasons.append(_reason("missing_clock_out", f"one punch only, at {_clock(clock_in)}"))
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
                _reason(
                    "early_clock_out",
                    f"{_clock(clock_out)} is {_span(-out_offset)} before {_clock(work_end)}",
                )
            )
        elif out_offset > rules.late_out:
            reasons.append(
                _reason(
                    "late_clock_out",
                    f"{_clock(clock_out)} is {_span(out_offset)} after {_clock(work_end)}",
                )
            )
    if len(shift_starts) > 1:
        times = ", ".join(_clock(moment) for moment in shift_starts)
        reasons.append(
            _reason(
                "multiple_shifts",
                f"{len(shift_starts)} shifts start on this day ({times}); worked is their sum",
            )
        )
    return reasons


# --- Shifts --------------------------------------------------------------------------


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


# (timestamp, device_id, is_suspect, received_at), in time order.
Punch = tuple[datetime.datetime, int, bool, datetime.datetime]


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
class _Context:
    rules: Rules
    devices: dict[int, _Hours]
    now: datetime.datetime
    default_zone: ZoneInfo = field(
        default_factory=lambda: ZoneInfo(settings.DEVICE_DEFAULT_TIMEZONE)
    )
    _schedules: dict = field(default_factory=dict)

    @classmethod
    def load(cls) -> _Context:
        return cls(Rules.from_settings(), _device_hours(), timezone.now())

    def zone(self, device_id: int | None) -> ZoneInfo:
        hours = self.devices.get(device_id)
        return self.default_zone if hours is None or hours.zone is None else hours.zone

    def local_start(self, shift: Shift) -> datetime.datetime:
        if shift.local_start is None:
            shift.local_start = shift.start.astimezone(self.zone(shift.start_device))
        return shift.local_start

    def work_date(self, shift: Shift) -> datetime.date:
        return self.local_start(shift).date()

    def schedule(
        self, employee: _Hours | None, device_id: int | None
    ) -> tuple[datetime.time, datetime.time]:
        """Employee overrides win over the clock-in device's, which win over settings."""
        key = (employee, device_id)
        found = self._schedules.get(key)
        if found is None:
            device = self.devices.get(device_id)
            start = (employee and employee.work_start) or (device and device.work_start)
            end = (employee and employee.work_end) or (device and device.work_end)
            found = self._schedules[key] = (
                start or self.rules.work_start,
                end or self.rules.work_end,
            )
        return found


def _day_values(
    shifts: list[Shift], *, employee_id: int | None, employee: _Hours | None, ctx: _Context
) -> tuple:
    """The COMPUTED_FIELDS values of one day made of these shifts."""
    first = shifts[0]
    if len(shifts) == 1:
        punches, suspects, starts = first.punches, first.suspects, ()
    else:
        punches = sum(s.punches for s in shifts)
        suspects = sum(s.suspects for s in shifts)
        starts = [ctx.local_start(s) for s in shifts]
    clock_out = out_device = worked = local_out = None
    if punches >= 2:
        last = shifts[-1]
        clock_out, out_device = last.end, last.end_device
        worked = sum((s.end - s.start for s in shifts), datetime.timedelta())
        local_out = clock_out.astimezone(ctx.zone(out_device))
    work_start, work_end = ctx.schedule(employee, first.start_device)
    reasons = day_outliers(
        clock_in=ctx.local_start(first),
        clock_out=local_out,
        work_start=work_start,
        work_end=work_end,
        rules=ctx.rules,
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


# --- Recomputing groups ------------------------------------------------------------


@dataclass(slots=True)
class _Group:
    """One employee and the span of time whose punches may have changed.

    None for since/until means from the first punch / to the last one.
    """

    user_id: str
    since: datetime.datetime | None
    until: datetime.datetime | None


@dataclass(slots=True)
class _Stored:
    pk: int
    values: tuple
    is_manual: bool
    version: int
    has_newer_punches: bool
    seen_at: datetime.datetime | None  # the later of edited_at and reviewed_at


def _any(conditions: Iterable[Q]) -> Q:
    return functools.reduce(operator.or_, conditions, Q(pk__in=[]))


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Any(Lookup):
    """`user_id = ANY(%s)`, with the list as one array: with thousands of employees
    Django and psycopg spend far longer on `IN (%s, %s, …)` than PostgreSQL does."""

    lookup_name = "any"

    def get_prep_lookup(self):
        return list(self.rhs)

    def as_sql(self, compiler, connection):
        lhs, params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s)", [*params, self.rhs]


for _model in (RawAttendance, ProcessedAttendance, Employee):
    _model._meta.get_field("user_id").register_lookup(_Any)


def _user_in(users: Sequence[str]) -> Q:
    if connection.vendor == "postgresql":
        return Q(user_id__any=users)
    return Q(user_id__in=users)


def _clusters(starts: dict[str, datetime.datetime]) -> list[list[str]]:
    """Employees in groups whose starts lie within CLUSTER_SPREAD of each other.

    One query per group over the group's widest bounds then reads little that an
    employee does not need, even when one of them comes back after a year away.
    """
    clusters: list[list[str]] = []
    first = UTC_MIN
    for user_id in sorted(starts, key=starts.__getitem__):
        if not clusters or starts[user_id] - first > CLUSTER_SPREAD:
            clusters.append([])
            first = starts[user_id]
        clusters[-1].append(user_id)
    return clusters


class _JsonbLoader(psycopg.adapt.Loader):
    def load(self, data):
        return [] if data == b"[]" else json.loads(bytes(data))


def _fetch(queryset: QuerySet) -> list[tuple]:
    """The rows of a values_list() queryset.

    On PostgreSQL through a plain cursor with psycopg's own loaders: Django's
    timestamptz loader wraps psycopg's in Python and its jsonb values are
    decoded by a Python converter per row, which on a full run took longer
    than all the rest.
    """
    if connection.vendor != "postgresql":
        return list(queryset)
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        raw = cursor.cursor
        # psycopg's own timestamptz loader (C, with psycopg[binary]), and jsonb
        # decoded here: nearly every day has no outlier reasons.
        oid = psycopg.postgres.types["timestamptz"].oid
        raw.adapters.register_loader(oid, psycopg.adapters.get_loader(oid, Format.TEXT))
        raw.adapters.register_loader("jsonb", _JsonbLoader)
        cursor.execute(sql, params)
        return cursor.fetchall()


def _stored_rows(
    batch: Sequence[_Group],
) -> tuple[dict[str, datetime.datetime | None], dict[str, dict[datetime.date, _Stored]]]:
    """Each group's anchor, and its stored rows from the day before the anchor's UTC date on.

    The anchor is the latest stored shift start at or before `since`: only
    non-manual rows count (HR may have moved a manual row's clock_in); None,
    and all the employee's rows, when there is none or the group has no `since`.
    The day before: a later shift on a device in a zone behind UTC can be dated
    that day, never earlier. Rows further back that come along change nothing.

    The anchor is usually yesterday's row, so one query reads the last few days'
    rows and the anchors come from those; an employee with none there (back
    from leave) gets a second look, further back.
    """
    stored: dict[str, dict[datetime.date, _Stored]] = {g.user_id: {} for g in batch}

    def load(queryset: QuerySet) -> None:
        for row in _fetch(queryset.order_by().values_list(*_STORED_FIELDS)):
            pk, user_id, work_date, *values = row
            *values, is_manual, version, newer, edited_at, reviewed_at = values
            seen = max((m for m in (edited_at, reviewed_at) if m is not None), default=None)
            stored[user_id][work_date] = _Stored(pk, tuple(values), is_manual, version, newer, seen)

    rows = ProcessedAttendance.objects
    whole = [g.user_id for g in batch if g.since is None]
    if whole:
        load(rows.filter(_user_in(whole)))
    since = {g.user_id: g.since for g in batch if g.since is not None}
    for users in _clusters(since):
        first = min(since[u] for u in users).date()
        load(rows.filter(_user_in(users), work_date__gte=first - (ANCHOR_DAYS + 1) * DAY))
    anchors: dict[str, datetime.datetime | None] = {}
    for user_id, moment in since.items():
        earliest = moment.date() - ANCHOR_DAYS * DAY
        starts = [
            row.values[1]
            for work_date, row in stored[user_id].items()
            if work_date >= earliest
            and not row.is_manual
            and row.values[1] is not None
            and row.values[1] <= moment
        ]
        if starts:
            anchors[user_id] = max(starts)
    missing = {u: since[u] for u in since if u not in anchors}
    if missing:
        found: dict[str, datetime.datetime] = {}
        for users in _clusters(missing):
            candidates = rows.filter(
                _user_in(users),
                is_manual=False,
                clock_in__isnull=False,
                clock_in__lte=max(missing[u] for u in users),
            )
            for user_id, clock_in in _fetch(
                candidates.order_by().values_list("user_id", "clock_in")
            ):
                if clock_in <= missing[user_id] and clock_in > found.get(user_id, clock_in - DAY):
                    found[user_id] = clock_in
        for users in _clusters(found):
            load(
                rows.filter(
                    _user_in(users), work_date__gte=min(found[u] for u in users).date() - DAY
                )
            )
        unanchored = [u for u in missing if u not in found]
        if unanchored:
            load(rows.filter(_user_in(unanchored)))
        anchors.update(found)
        anchors.update(dict.fromkeys(unanchored))
    return anchors, stored


def _read_punches(
    windows: dict[str, tuple[datetime.datetime | None, datetime.datetime | None]],
) -> dict[str, list[Punch]]:
    """Each employee's punches in [start, end) (None: unbounded), in time order.

    One query for the employees without a start and one per cluster of those
    with one, each over the widest bounds of its employees, trimmed here.
    """
    punches: dict[str, list[Punch]] = {}
    unbounded = [u for u, (start, _) in windows.items() if start is None]
    bounded = {u: start for u, (start, _) in windows.items() if start is not None}
    queries = []
    if unbounded:
        queries.append((unbounded, RawAttendance.objects.filter(_user_in(unbounded))))
    for users in _clusters(bounded):
        start = min(bounded[u] for u in users)
        queries.append((users, RawAttendance.objects.filter(_user_in(users), timestamp__gte=start)))
    for users, queryset in queries:
        ends = [windows[u][1] for u in users]
        if None not in ends:
            queryset = queryset.filter(timestamp__lt=max(ends))
        rows = _fetch(
            queryset.order_by("user_id", "timestamp", "id").values_list(
                "user_id", "timestamp", "device_id", "is_suspect", "received_at"
            )
        )
        for user_id, group in itertools.groupby(rows, operator.itemgetter(0)):
            start, end = windows[user_id]
            punches[user_id] = [
                row[1:]
                for row in group
                if (start is None or row[1] >= start) and (end is None or row[1] < end)
            ]
    return punches


def _window(
    shifts: list[Shift],
    *,
    after: datetime.datetime,
    stored: dict[datetime.date, _Stored],
    ctx: _Context,
) -> datetime.datetime | None:
    """The first shift start after `after` from which the stored rows still hold.

    That is a start that a stored, non-manual row also begins at, with no earlier
    recomputed shift on the same date (which would have merged into that row).
    """
    if not shifts or shifts[-1].start <= after:
        return None  # the usual case: the new punches are the latest
    starts = {
        s.values[1]: work_date
        for work_date, s in stored.items()
        if not s.is_manual and s.values[1] is not None
    }
    dates: set[datetime.date] = set()
    for shift in shifts:
        work_date = ctx.work_date(shift)
        if shift.start > after and starts.get(shift.start) == work_date and work_date not in dates:
            return shift.start
        dates.add(work_date)
    return None


def _recompute_batch(batch: Sequence[_Group], *, ctx: _Context, result: ProcessingResult) -> None:
    rules = ctx.rules
    anchors, stored = _stored_rows(batch)
    employees = {
        user_id: (pk, _Hours(None, start, end))
        for user_id, pk, start, end in _fetch(
            Employee.objects.filter(_user_in([g.user_id for g in batch]))
            .order_by()
            .values_list("user_id", "id", "work_start_time", "work_end_time")
        )
    }

    # Round one: from the anchor to 2 × MAX_SHIFT_HOURS past the last changed punch.
    reach = 2 * rules.max_shift
    punches = _read_punches(
        {
            g.user_id: (anchors.get(g.user_id), None if g.until is None else g.until + reach)
            for g in batch
        }
    )
    ends: dict[str, datetime.datetime | None] = {}
    shifts: dict[str, list[Shift]] = {}
    unsettled = []
    for group in batch:
        chain = build_shifts(
            punches.get(group.user_id, ()), max_shift=rules.max_shift, dedupe=rules.dedupe
        )
        shifts[group.user_id] = chain
        ends[group.user_id] = None
        if group.until is not None:
            end = _window(chain, after=group.until, stored=stored[group.user_id], ctx=ctx)
            ends[group.user_id] = end
            # Any older punch past the read would be in a shift that started at most
            # MAX_SHIFT_HOURS before the read's end, stored on that day or the next
            # (UTC vs local date): without such a row there is nothing to read.
            later = (group.until + reach - rules.max_shift).date() - DAY
            if end is None and any(d >= later for d in stored[group.user_id]):
                unsettled.append(group)
    # Round two, for chains not settled yet: the rest of those employees' punches.
    if unsettled:
        more = _read_punches({g.user_id: (g.until + reach, None) for g in unsettled})
        for group in unsettled:
            if more.get(group.user_id):
                punches.setdefault(group.user_id, []).extend(more[group.user_id])
                shifts[group.user_id] = build_shifts(
                    punches[group.user_id], max_shift=rules.max_shift, dedupe=rules.dedupe
                )
    result.punches_read += sum(len(p) for p in punches.values())

    changed: list[tuple[int, tuple]] = []
    vanished: list[int] = []
    flagged: list[int] = []
    with _Inserter(ctx=ctx) as inserter:
        for group in batch:
            user_id = group.user_id
            low, high = anchors.get(user_id), ends[user_id]
            days: dict[datetime.date, list[Shift]] = {}
            for shift in shifts[user_id]:
                if (low is not None and shift.start < low) or (
                    high is not None and shift.start >= high
                ):
                    continue
                days.setdefault(ctx.work_date(shift), []).append(shift)
            employee_id, employee = employees.get(user_id, (None, None))
            rows = stored[user_id]
            for work_date, day_shifts in days.items():
                existing = rows.get(work_date)
                if existing is not None and existing.is_manual:
                    # Never overwritten; punches stored after HR's edit (or review) flag it.
                    newest = max(s.newest_received for s in day_shifts)
                    if (
                        not existing.has_newer_punches
                        and existing.seen_at is not None
                        and newest > existing.seen_at
                    ):
                        flagged.append(existing.pk)
                    continue
                values = _day_values(
                    day_shifts, employee_id=employee_id, employee=employee, ctx=ctx
                )
                if values[7]:
                    result.outliers += 1
                if existing is None:
                    result.rows_created += 1
                    inserter.add((user_id, work_date, *values, 1))
                elif existing.values != values:
                    changed.append(
                        (existing.pk, (user_id, work_date, *values, existing.version + 1))
                    )
            for work_date, row in rows.items():
                clock_in = row.values[1]
                if (
                    work_date not in days
                    and not row.is_manual
                    and clock_in is not None
                    and (low is None or clock_in >= low)
                    and (high is None or clock_in < high)
                ):
                    vanished.append(row.pk)
    result.groups_recomputed += len(batch)
    result.rows_changed += len(changed)
    if changed:
        _update(changed, ctx=ctx)
    if vanished:
        _remove(vanished, ctx=ctx, result=result)
    if flagged:
        result.manual_flagged += ProcessedAttendance.objects.filter(pk__in=flagged).update(
            has_newer_punches=True
        )


# (user_id, work_date, *COMPUTED_FIELDS, version): a row as _Inserter/_update store it.
_ROW_COLUMNS = ["user_id", "work_date", *COMPUTED_FIELDS, "version"]
# Written with every new or changed row: it is due for delivery (again).
_DUE = {
    "sync_state": ProcessedAttendance.SyncState.PENDING,
    "sync_attempts": 0,
    "next_sync_at": None,
}


def _copy(cursor, table: str, names: list[str]):
    """A binary COPY into these columns: psycopg formats text COPY in Python, six times slower."""
    quote = connection.ops.quote_name
    meta = ProcessedAttendance._meta
    copy = cursor.cursor.copy(
        f"COPY {table} ({', '.join(quote(meta.get_field(n).column) for n in names)}) "
        "FROM STDIN (FORMAT BINARY)"
    )
    types = [meta.get_field(name).db_type(connection).split("(")[0] for name in names]
    return copy, types


class _Inserter:
    """Stores new rows (as in _ROW_COLUMNS) as they are computed.

    The rows are known not to exist: every row of these employees they could
    collide with was read, under the processing lock; should that ever not
    hold, the insert fails on the unique constraint rather than overwrite.
    On PostgreSQL they stream into a COPY, opened at the first row, so the
    server stores them while the next ones are computed; elsewhere bulk_create.
    """

    def __init__(self, *, ctx: _Context) -> None:
        self.ctx = ctx
        self.postgresql = connection.vendor == "postgresql"
        self.rows: list[tuple] = []
        self.stack = contextlib.ExitStack()
        self.copy = None
        self.tail: tuple = ()

    def __enter__(self) -> _Inserter:
        return self

    def add(self, row: tuple) -> None:
        if not self.postgresql:
            self.rows.append(row)
        elif self.copy is not None:
            self.copy.write_row(row + self.tail)
        else:
            self._open()
            self.copy.write_row(row + self.tail)

    def _open(self) -> None:
        meta = ProcessedAttendance._meta
        names = list(_ROW_COLUMNS)
        # Every other column gets its model default (so that a field added later
        # needs nothing here); columns that default to NULL are left out.
        fixed = {**_DUE, "created_at": self.ctx.now, "updated_at": self.ctx.now}
        tail = []
        for column in meta.concrete_fields:
            if column.primary_key or column.attname in _ROW_COLUMNS:
                continue
            value = fixed.get(column.attname, column.get_default())
            if value is None and column.null:
                continue
            names.append(column.attname)
            tail.append(column.get_db_prep_save(value, connection))
        self.tail = tuple(tail)
        cursor = self.stack.enter_context(connection.cursor())
        copying, types = _copy(cursor, connection.ops.quote_name(meta.db_table), names)
        self.copy = self.stack.enter_context(copying)
        self.copy.set_types(types)

    def __exit__(self, *exc_info) -> None:
        self.stack.__exit__(*exc_info)
        if self.rows and exc_info[0] is None:
            ProcessedAttendance.objects.bulk_create(
                [
                    ProcessedAttendance(**dict(zip(_ROW_COLUMNS, row, strict=True)), **_DUE)
                    for row in self.rows
                ],
                batch_size=WRITE_BATCH,
            )


def _update(changed: list[tuple[int, tuple]], *, ctx: _Context) -> None:
    """Overwrites changed rows, given as (pk, row as in _ROW_COLUMNS).

    On PostgreSQL: COPY into a temporary table, then one UPDATE … FROM.
    """
    if connection.vendor != "postgresql":
        ProcessedAttendance.objects.bulk_create(
            [
                ProcessedAttendance(**dict(zip(_ROW_COLUMNS, row, strict=True)), **_DUE)
                for _, row in changed
            ],
            update_conflicts=True,
            unique_fields=["user_id", "work_date"],
            update_fields=_UPSERT_FIELDS,
            batch_size=WRITE_BATCH,
        )
        return
    assert connection.in_atomic_block, "the temporary table lives until the transaction ends"
    quote = connection.ops.quote_name
    meta = ProcessedAttendance._meta
    table = quote(meta.db_table)
    columns = [quote(meta.get_field(name).column) for name in _ROW_COLUMNS]
    assignments = [f"{c} = t.{c}" for c in columns[2:]]  # not the (user_id, work_date) key
    assignments += [f"{quote(name)} = %s" for name in (*_DUE, "updated_at")]
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS processing_changed ON COMMIT DROP AS "
            f"SELECT id, {', '.join(columns)} FROM {table} WITH NO DATA"
        )
        copying, types = _copy(cursor, "processing_changed", ["id", *_ROW_COLUMNS])
        with copying as copy:
            copy.set_types(types)
            for pk, row in changed:
                copy.write_row((pk, *row))
        cursor.execute(
            f"UPDATE {table} AS p SET {', '.join(assignments)} "
            f"FROM processing_changed AS t WHERE p.id = t.id",
            [*_DUE.values(), ctx.now],
        )
        cursor.execute("TRUNCATE processing_changed")


def _remove(pks: list[int], *, ctx: _Context, result: ProcessingResult) -> None:
    """Rows whose punches now belong to other days: deleted if the CRM never saw them.

    One that has been sent (or whose sending was attempted) stays, emptied, with
    version + 1, so that the CRM receives the correction. The conditions are
    re-checked in the DELETE itself, in case delivery started meanwhile.
    """
    deleted, _ = ProcessedAttendance.objects.filter(
        pk__in=pks,
        synced_version__isnull=True,
        sync_attempts=0,
        last_sync_attempt__isnull=True,
    ).delete()
    result.rows_deleted += deleted
    result.rows_voided += ProcessedAttendance.objects.filter(pk__in=pks).update(
        clock_in=None,
        clock_out=None,
        clock_in_device=None,
        clock_out_device=None,
        punch_count=0,
        worked=None,
        is_outlier=False,
        outlier_reasons=[],
        ignored_suspect_punches=0,
        version=F("version") + 1,
        sync_state=ProcessedAttendance.SyncState.PENDING,
        sync_attempts=0,
        next_sync_at=None,
        updated_at=ctx.now,
    )


def _recompute(groups: list[_Group], *, ctx: _Context, result: ProcessingResult) -> None:
    # Batches of employees with nearby windows, so each batch's bounds stay tight.
    groups.sort(key=lambda g: (g.since is not None, g.since or UTC_MIN, g.user_id))
    whole = [g for g in groups if g.since is None]
    recent = groups[len(whole) :]
    size = USER_BATCH_INCREMENTAL if connection.vendor == "postgresql" else USER_BATCH
    for part, batch_size in ((whole, USER_BATCH), (recent, size)):
        for batch in _batches(part, batch_size):
            _recompute_batch(batch, ctx=ctx, result=result)


# --- Which groups a run recomputes ---------------------------------------------------


def _lock_state() -> ProcessingState:
    """Takes the processing lock: the state row, written first.

    Writing first makes SQLite take its write lock now rather than fail later;
    on PostgreSQL the row lock keeps runs and HR edits from interleaving.
    """
    now = timezone.now()
    if not ProcessingState.objects.filter(name=STATE_NAME).update(updated_at=now):
        ProcessingState.objects.get_or_create(name=STATE_NAME)
    return ProcessingState.objects.select_for_update().get(name=STATE_NAME)


def _late_commit_floor(runs: list[list]) -> int:
    """The highest raw id seen by a run that started LATE_COMMIT_MARGIN before the last one."""
    if not runs:
        return 0
    cutoff = datetime.datetime.fromisoformat(runs[-1][0]) - LATE_COMMIT_MARGIN
    floor = 0
    for started, max_id in runs:
        if datetime.datetime.fromisoformat(started) <= cutoff:
            floor = max_id
    return floor


def _new_groups(state: ProcessingState, result: ProcessingResult) -> list[_Group]:
    punches = RawAttendance.objects.filter(id__gt=_late_commit_floor(state.recent_runs))
    new = Q(id__gt=state.last_raw_id)
    if state.recent_runs:
        previous_start = datetime.datetime.fromisoformat(state.recent_runs[-1][0])
        new |= Q(received_at__gte=previous_start - LATE_COMMIT_MARGIN)
    rows = _fetch(
        punches.filter(new)
        .order_by()
        .values("user_id")
        .annotate(since=Min("timestamp"), until=Max("timestamp"), count=Count("id"))
        .values_list("user_id", "since", "until", "count")
    )
    result.new_punches += sum(row[3] for row in rows)
    return [_Group(user_id, since, until) for user_id, since, until, _ in rows]


def _all_groups() -> list[_Group]:
    users = set(RawAttendance.objects.order_by().values_list("user_id", flat=True).distinct())
    users.update(
        ProcessedAttendance.objects.filter(is_manual=False)
        .order_by()
        .values_list("user_id", flat=True)
        .distinct()
    )
    return [_Group(user_id, None, None) for user_id in users]


def _day_span(
    first: datetime.date, last: datetime.date
) -> tuple[datetime.datetime, datetime.datetime]:
    """UTC bounds of local dates first..last in every zone, UTC-12 to UTC+14."""
    since = datetime.datetime.combine(first, datetime.time(), tzinfo=UTC) - 14 * HOUR
    until = datetime.datetime.combine(last, datetime.time(), tzinfo=UTC) + DAY + 12 * HOUR
    return since, until


def _range_groups(date_from: datetime.date, date_to: datetime.date) -> list[_Group]:
    """Employees with punches on those local dates, from the first such punch to the last."""
    zones: dict[str, list[int]] = {}
    for pk, zone in Device.objects.values_list("pk", "timezone"):
        zones.setdefault(zone, []).append(pk)
    conditions = []
    for zone, devices in zones.items():
        since = datetime.datetime.combine(date_from, datetime.time(), tzinfo=ZoneInfo(zone))
        until = datetime.datetime.combine(date_to + DAY, datetime.time(), tzinfo=ZoneInfo(zone))
        conditions.append(Q(device_id__in=devices, timestamp__gte=since, timestamp__lt=until))
    rows = (
        RawAttendance.objects.filter(_any(conditions))
        .order_by()
        .values("user_id")
        .annotate(since=Min("timestamp"), until=Max("timestamp"))
    )
    return [_Group(row["user_id"], row["since"], row["until"]) for row in rows]


def _row_groups(ids: list[int]) -> list[_Group]:
    """Employees of these rows, from the first row's clock-in to the last row's clock-out.

    A row without a trustworthy clock-in (HR-edited, or emptied) stands for its whole date.
    """
    spans: dict[str, tuple[datetime.datetime, datetime.datetime]] = {}
    rows = ProcessedAttendance.objects.filter(pk__in=ids).values_list(
        "user_id", "work_date", "clock_in", "clock_out", "is_manual"
    )
    for user_id, work_date, clock_in, clock_out, is_manual in rows:
        if clock_in is None or is_manual:
            since, until = _day_span(work_date, work_date)
        else:
            since, until = clock_in, clock_out or clock_in
        first, last = spans.get(user_id, (since, until))
        spans[user_id] = (min(first, since), max(last, until))
    return [_Group(user_id, since, until) for user_id, (since, until) in spans.items()]


def _record_run(state: ProcessingState, *, max_id: int, started: datetime.datetime) -> None:
    runs = [*state.recent_runs, [started.isoformat(), max_id]]
    # Later runs need the newest run that started a margin before them, never an older one.
    keep = 0
    for index, (moment, _) in enumerate(runs):
        if datetime.datetime.fromisoformat(moment) <= started - LATE_COMMIT_MARGIN:
            keep = index
    state.recent_runs = runs[keep:]
    state.last_raw_id = max_id
    state.last_run_at = started
    state.save(update_fields=["recent_runs", "last_raw_id", "last_run_at", "updated_at"])


# --- Services ----------------------------------------------------------------------


def attendance_process(
    *,
    full: bool = False,
    date_from: datetime.date | None = None,
    date_to: datetime.date | None = None,
) -> ProcessingResult:
    """Builds ProcessedAttendance from raw punches.

    Without arguments, only the employees and spans touched by punches stored
    since the last run (see the module docstring). `full` recomputes everything;
    `date_from`/`date_to` the days in that range (local dates, inclusive).

    Idempotent: rows are compared with what the punches give and only
    differences are written, so a run with nothing new changes nothing and
    bumps no version. A changed row gets version + 1 and is due for delivery
    again; HR-edited rows are never overwritten. Runs hold a lock, so two never
    interleave. Raises ValueError for a bad combination of arguments.
    """
    if full and (date_from or date_to):
        raise ValueError("Use either full or a date range, not both.")
    if (date_from is None) != (date_to is None):
        raise ValueError("A date range needs both date_from and date_to.")
    if date_from and date_from > date_to:
        raise ValueError(f"date_from {date_from} is after date_to {date_to}.")
    mode = "full" if full else "range" if date_from else "incremental"
    started = time.monotonic()
    result = ProcessingResult(mode=mode)
    with transaction.atomic():
        state = _lock_state()
        max_id = RawAttendance.objects.aggregate(top=Max("id"))["top"] or 0
        ctx = _Context.load()  # its `now` is after max_id was read (see _late_commit_floor)
        if mode == "full":
            groups = _all_groups()
        elif mode == "range":
            groups = _range_groups(date_from, date_to)
        else:
            groups = _new_groups(state, result)
        _recompute(groups, ctx=ctx, result=result)
        if mode != "range":
            _record_run(state, max_id=max_id, started=ctx.now)
    result.seconds = time.monotonic() - started
    logger.info("Attendance processing: %s", result.summary())
    return result


def attendance_recompute(*, ids: Iterable[int]) -> ProcessingResult:
    """Recomputes the employees and days of these rows from their punches (admin action).

    Idempotent like attendance_process; HR-edited rows among them are left alone.
    """
    started = time.monotonic()
    result = ProcessingResult(mode="recompute")
    with transaction.atomic():
        _lock_state()
        ctx = _Context.load()
        groups = _row_groups(list(ids))
        _recompute(groups, ctx=ctx, result=result)
    result.seconds = time.monotonic() - started
    return result


def attendance_discard_edits(*, ids: Iterable[int]) -> ProcessingResult:
    """Drops HR's edits on these rows and recomputes them from the punches.

    The recomputed values differ from the edited ones, so each such row gets
    version + 1 and goes to the CRM again. Idempotent.
    """
    ids = list(ids)
    with transaction.atomic():
        _lock_state()
        released = list(
            ProcessedAttendance.objects.filter(pk__in=ids, is_manual=True).values_list(
                "pk", flat=True
            )
        )
        # Emptied first: an edited clock-in is no shift start to re-chain from.
        ProcessedAttendance.objects.filter(pk__in=released).update(
            is_manual=False,
            has_newer_punches=False,
            clock_in=None,
            clock_out=None,
            worked=None,
            punch_count=0,
            is_outlier=False,
            outlier_reasons=[],
        )
        result = attendance_recompute(ids=ids)
        # A date the punches give no day stays empty: still a correction for the CRM.
        ProcessedAttendance.objects.filter(pk__in=released, clock_in__isnull=True).update(
            version=F("version") + 1,
            sync_state=ProcessedAttendance.SyncState.PENDING,
            sync_attempts=0,
            next_sync_at=None,
        )
    return result


def attendance_edit(
    *,
    record_id: int,
    clock_in: datetime.datetime,
    clock_out: datetime.datetime | None,
    user,
) -> ProcessedAttendance:
    """HR's correction of a day's clock-in/clock-out.

    Marks the row manual (processing never overwrites it again), records who
    and when, recomputes worked and the outlier reasons from the new times,
    and bumps the version so the CRM receives the correction. Saving the same
    times again changes nothing. Raises ValueError when clock_out is not after
    clock_in, ProcessedAttendance.DoesNotExist for an unknown id.
    """
    if clock_out is not None and clock_out <= clock_in:
        raise ValueError("The clock-out must be after the clock-in.")
    with transaction.atomic():
        _lock_state()
        record = ProcessedAttendance.objects.select_for_update().get(pk=record_id)
        if record.is_manual and (record.clock_in, record.clock_out) == (clock_in, clock_out):
            return record
        ctx = _Context.load()
        employee = Employee.objects.filter(user_id=record.user_id).first()
        hours = employee and _Hours(None, employee.work_start_time, employee.work_end_time)
        work_start, work_end = ctx.schedule(hours, record.clock_in_device_id)
        out_zone = ctx.zone(record.clock_out_device_id or record.clock_in_device_id)
        reasons = day_outliers(
            clock_in=clock_in.astimezone(ctx.zone(record.clock_in_device_id)),
            clock_out=None if clock_out is None else clock_out.astimezone(out_zone),
            work_start=work_start,
            work_end=work_end,
            rules=ctx.rules,
        )
        record.clock_in = clock_in
        record.clock_out = clock_out
        record.worked = None if clock_out is None else clock_out - clock_in
        record.is_outlier = bool(reasons)
        record.outlier_reasons = reasons
        record.is_manual = True
        record.edited_by = user
        record.edited_at = ctx.now
        record.has_newer_punches = False
        record.version += 1
        record.sync_state = ProcessedAttendance.SyncState.PENDING
        record.sync_attempts = 0
        record.next_sync_at = None
        record.save()
    return record


def attendance_mark_reviewed(*, ids: Iterable[int], user) -> int:
    """Records that HR reviewed these days; clears their newer-punches flag.

    Idempotent apart from the review time. Returns how many rows it marked.
    """
    return ProcessedAttendance.objects.filter(pk__in=list(ids)).update(
        reviewed_by=user, reviewed_at=timezone.now(), has_newer_punches=False
    )
