"""What a run must recompute: which employees, from where, to where.

Shift boundaries up to a moment depend only on the punches before it, so a
stored (non-manual) row's clock_in stays a true shift start as long as no
punch arrives before it. For each employee with new punches between `since`
and `until`, a run re-chains from the latest such clock_in at or before
`since` (the anchor) and stops at the first recomputed shift start after
`until` that matches a stored row's clock_in (the settle point): from there on
the chain, and the rows, are the stored ones. A late punch can extend or split
its neighbours, so the punches read reach 2 × MAX_SHIFT_HOURS past `until`,
and to the last punch when the chain has not settled by then.

Work dates never go back in time (shifts.Calendar.date_shifts), so the shifts
from the anchor on are dated no earlier than the stored day before the
anchor's (date_floor), exactly as a run from the first punch dates them.

Which punches are new: ids only grow, but a poll's transaction can commit after
a later poll's, so a run may read past an id that is not visible yet.
RawAttendance.received_at is stamped when a poll writes its rows, and a poll
commits within settings.LATE_COMMIT_MARGIN of writing its rows. A run
therefore reads punches with an id above the highest the previous run saw (the
watermark), plus those received within the margin before the previous run
started; a punch like that has an id above the highest seen by a run that
started at least the margin before the previous one, which bounds the read to
recent ids (ProcessingState.recent_runs keeps those runs).

A revised punch (its suspect verdict changed after it was stored: a later
download judged it again, or an operator set or cleared the flag) is new
like a stored one: RawAttendance.revised_at is stamped with the change, and a
run reads those revised within the margin before the previous run started.

`--full` recomputes every employee from their first punch; a date range the
employees with punches on those local dates, from the first such punch to the
last, with the same anchors and settling.
"""

from __future__ import annotations

import datetime
import functools
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db.models import Count, Max, Min, Q, QuerySet
from django.utils import timezone

from core.models import Device, ProcessedAttendance, ProcessingState, RawAttendance
from core.processing import storage
from core.processing.diff import StoredDay
from core.processing.shifts import Shift

UTC = datetime.UTC
DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)
STATE_NAME = "attendance"
# Days before an employee's earliest new punch within which their anchor is looked
# for first (find_anchors): yesterday's row, or Friday's on a Monday.
ANCHOR_DAYS = 3


@dataclass(slots=True)
class Group:
    """One employee and the span of time whose punches may have changed.

    None for since/until means from the first punch / to the last one.
    """

    user_id: str
    since: datetime.datetime | None
    until: datetime.datetime | None


# --- The run's state: lock and watermark ---------------------------------------------


def lock_state() -> ProcessingState:
    """Takes the processing lock: the state row, written first.

    Writing first makes SQLite take its write lock now rather than fail later;
    on PostgreSQL the row lock keeps runs and HR edits from interleaving.
    """
    now = timezone.now()
    if not ProcessingState.objects.filter(name=STATE_NAME).update(updated_at=now):
        ProcessingState.objects.get_or_create(name=STATE_NAME)
    return ProcessingState.objects.select_for_update().get(name=STATE_NAME)


def late_commit_floor(runs: list[list]) -> int:
    """The highest raw id seen by a run that started LATE_COMMIT_MARGIN before the last one."""
    if not runs:
        return 0
    cutoff = datetime.datetime.fromisoformat(runs[-1][0]) - settings.LATE_COMMIT_MARGIN
    floor = 0
    for started, max_id in runs:
        if datetime.datetime.fromisoformat(started) <= cutoff:
            floor = max_id
    return floor


def record_run(state: ProcessingState, *, max_id: int, started: datetime.datetime) -> None:
    """Moves the watermark to max_id and keeps the runs later ones bound their reads by."""
    runs = [*state.recent_runs, [started.isoformat(), max_id]]
    # Later runs need the newest run that started a margin before them, never an older one.
    keep = 0
    margin = settings.LATE_COMMIT_MARGIN
    for index, (moment, _) in enumerate(runs):
        if datetime.datetime.fromisoformat(moment) <= started - margin:
            keep = index
    state.recent_runs = runs[keep:]
    state.last_raw_id = max_id
    state.last_run_at = started
    state.save(update_fields=["recent_runs", "last_raw_id", "last_run_at", "updated_at"])


# --- Which groups a run recomputes ---------------------------------------------------


def new_punches(state: ProcessingState) -> QuerySet:
    """The punches a run takes as new: stored since the previous run, or revised since.

    Stored: an id above the watermark, or received within the margin before the
    previous run started (an id above the late-commit floor). Revised: a
    revised_at within the margin before the previous run started, whatever the
    id, by the same reasoning (the revision commits within the margin of being
    stamped); that condition is served by the partial index on revised_at, so
    no run scans the table for the few punches ever revised.
    """
    floor = Q(id__gt=late_commit_floor(state.recent_runs))
    if not state.recent_runs:
        return RawAttendance.objects.filter(floor & Q(id__gt=state.last_raw_id))
    previous_start = datetime.datetime.fromisoformat(state.recent_runs[-1][0])
    since = previous_start - settings.LATE_COMMIT_MARGIN
    stored = floor & (Q(id__gt=state.last_raw_id) | Q(received_at__gte=since))
    return RawAttendance.objects.filter(stored | Q(revised_at__gte=since))


def new_groups(state: ProcessingState) -> tuple[list[Group], int]:
    """The employees with new punches, each from their earliest to their latest; and
    how many punches are new."""
    rows = storage.fetch(
        new_punches(state)
        .order_by()
        .values("user_id")
        .annotate(since=Min("timestamp"), until=Max("timestamp"), count=Count("id"))
        .values_list("user_id", "since", "until", "count")
    )
    groups = [Group(user_id, since, until) for user_id, since, until, _ in rows]
    return groups, sum(row[3] for row in rows)


def all_groups() -> list[Group]:
    """Everyone with punches or computed rows, whole (`--full`)."""
    users = set(RawAttendance.objects.order_by().values_list("user_id", flat=True).distinct())
    users.update(
        ProcessedAttendance.objects.filter(is_manual=False)
        .order_by()
        .values_list("user_id", flat=True)
        .distinct()
    )
    return [Group(user_id, None, None) for user_id in users]


def day_span(
    first: datetime.date, last: datetime.date
) -> tuple[datetime.datetime, datetime.datetime]:
    """UTC bounds of local dates first..last in every zone, UTC-12 to UTC+14."""
    since = datetime.datetime.combine(first, datetime.time(), tzinfo=UTC) - 14 * HOUR
    until = datetime.datetime.combine(last, datetime.time(), tzinfo=UTC) + DAY + 12 * HOUR
    return since, until


def _any(conditions: Iterable[Q]) -> Q:
    return functools.reduce(operator.or_, conditions, Q(pk__in=[]))


def range_groups(date_from: datetime.date, date_to: datetime.date) -> list[Group]:
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
    return [Group(row["user_id"], row["since"], row["until"]) for row in rows]


def row_groups(ids: list[int]) -> list[Group]:
    """Employees of these rows, from the first row's clock-in to the last row's clock-out.

    A row without a trustworthy clock-in (HR-edited, or emptied) stands for its whole date.
    """
    spans: dict[str, tuple[datetime.datetime, datetime.datetime]] = {}
    rows = ProcessedAttendance.objects.filter(pk__in=ids).values_list(
        "user_id", "work_date", "clock_in", "clock_out", "is_manual"
    )
    for user_id, work_date, clock_in, clock_out, is_manual in rows:
        if clock_in is None or is_manual:
            since, until = day_span(work_date, work_date)
        else:
            since, until = clock_in, clock_out or clock_in
        first, last = spans.get(user_id, (since, until))
        spans[user_id] = (min(first, since), max(last, until))
    return [Group(user_id, since, until) for user_id, (since, until) in spans.items()]


# --- Anchors and settling ------------------------------------------------------------


def find_anchors(
    batch: Sequence[Group],
) -> tuple[dict[str, datetime.datetime | None], storage.StoredDays]:
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
    stored: storage.StoredDays = {g.user_id: {} for g in batch}
    whole = [g.user_id for g in batch if g.since is None]
    if whole:
        storage.read_days(stored, whole)
    since = {g.user_id: g.since for g in batch if g.since is not None}
    storage.read_days_near(stored, since, days=ANCHOR_DAYS + 1)
    anchors: dict[str, datetime.datetime | None] = {}
    for user_id, moment in since.items():
        start = latest_start(stored[user_id], moment, earliest=moment.date() - ANCHOR_DAYS * DAY)
        if start is not None:
            anchors[user_id] = start
    missing = {u: since[u] for u in since if u not in anchors}
    if missing:
        found = storage.latest_shift_starts(missing)
        storage.read_days_near(stored, found, days=1)
        unanchored = [u for u in missing if u not in found]
        if unanchored:
            storage.read_days(stored, unanchored)
        anchors.update(found)
        anchors.update(dict.fromkeys(unanchored))
    return anchors, stored


def latest_start(
    stored: dict[datetime.date, StoredDay], moment: datetime.datetime, *, earliest: datetime.date
) -> datetime.datetime | None:
    """The latest computed clock_in at or before `moment` among rows dated `earliest` on."""
    starts = [
        row.clock_in
        for work_date, row in stored.items()
        if work_date >= earliest
        and not row.is_manual
        and row.clock_in is not None
        and row.clock_in <= moment
    ]
    return max(starts, default=None)


def date_floor(
    stored: dict[datetime.date, StoredDay], anchor: datetime.datetime | None
) -> datetime.date | None:
    """The work date of the last day before the anchor's: no shift from the anchor on
    is dated earlier (Calendar.date_shifts). None without an anchor.

    Days before the anchor's are those of the unchanged shifts before it. Only
    the rows read with the anchor are looked at: an older one is dated at least
    two days before the anchor's UTC date, and no later shift could be dated that early.
    """
    if anchor is None:
        return None
    anchor_date = next(
        (d for d, row in stored.items() if row.clock_in == anchor and not row.is_manual), None
    )
    if anchor_date is None:
        return None
    return max(
        (d for d, row in stored.items() if d < anchor_date and row.clock_in is not None),
        default=None,
    )


def settle_point(
    shifts: list[Shift], *, after: datetime.datetime, stored: dict[datetime.date, StoredDay]
) -> datetime.datetime | None:
    """The first shift start after `after` from which the stored rows still hold.

    That is a start that a stored, non-manual row also begins at, on the same
    date, with no earlier recomputed shift on that date (which would have
    merged into that row). `shifts` are dated (Calendar.date_shifts).
    """
    if not shifts or shifts[-1].start <= after:
        return None  # the usual case: the new punches are the latest
    starts = {
        row.clock_in: work_date
        for work_date, row in stored.items()
        if not row.is_manual and row.clock_in is not None
    }
    dates: set[datetime.date] = set()
    for shift in shifts:
        if (
            shift.start > after
            and starts.get(shift.start) == shift.work_date
            and shift.work_date not in dates
        ):
            return shift.start
        dates.add(shift.work_date)
    return None


def needs_later_punches(
    group: Group,
    *,
    read_until: datetime.datetime,
    stored: dict[datetime.date, StoredDay],
    max_shift: datetime.timedelta,
) -> bool:
    """Whether a chain that has not settled by `read_until` must read on to the last punch.

    Any older punch past the read would be in a shift that started at most
    MAX_SHIFT_HOURS before the read's end, stored on that day or the next (UTC
    vs local date): without such a row there is nothing to read.
    """
    later = (read_until - max_shift).date() - DAY
    return any(work_date >= later for work_date in stored)
