"""The stage's entry points: what the admin, the command and the tasks call.

Each run reads (planning, storage), computes (shifts, rules, diff: pure) and
writes the differences (storage), per batch of employees, under one lock.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Max
from django.utils import timezone

from core import metrics
from core.crm import crm_feed_prune
from core.models import ProcessedAttendance, RawAttendance
from core.processing import planning, storage
from core.processing.diff import diff_days
from core.processing.planning import Group
from core.processing.rules import Rules, day_outliers
from core.processing.shifts import Calendar, Shift, build_shifts

logger = logging.getLogger(__name__)

UTC_MIN = datetime.datetime.min.replace(tzinfo=datetime.UTC)
# Employees per round of queries. A few hundred keeps a full run's memory
# bounded (each employee's whole history is read); an incremental run reads a
# couple of days per employee, so on PostgreSQL it takes bigger, fewer rounds.
# SQLite keeps to 250, inside its 999 query variables.
USER_BATCH = 250
USER_BATCH_INCREMENTAL = 2000


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


def _calendar() -> Calendar:
    return Calendar(
        Rules.from_settings(), storage.device_hours(), ZoneInfo(settings.DEVICE_DEFAULT_TIMEZONE)
    )


# --- Recomputing groups ------------------------------------------------------------


def _recompute(
    groups: list[Group],
    *,
    calendar: Calendar,
    now: datetime.datetime,
    result: ProcessingResult,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    # Batches of employees with nearby windows, so each batch's bounds stay tight.
    groups.sort(key=lambda g: (g.since is not None, g.since or UTC_MIN, g.user_id))
    whole = [g for g in groups if g.since is None]
    recent = groups[len(whole) :]
    size = USER_BATCH_INCREMENTAL if connection.vendor == "postgresql" else USER_BATCH
    if progress is not None:
        progress(0, len(groups))
    for part, batch_size in ((whole, USER_BATCH), (recent, size)):
        for start in range(0, len(part), batch_size):
            batch = part[start : start + batch_size]
            _recompute_batch(batch, calendar=calendar, now=now, result=result)
            if progress is not None:
                progress(result.groups_recomputed, len(groups))


def _chains(
    batch: Sequence[Group],
    *,
    anchors: dict[str, datetime.datetime | None],
    stored: storage.StoredDays,
    calendar: Calendar,
    result: ProcessingResult,
) -> tuple[dict[str, list[Shift]], dict[str, datetime.datetime | None]]:
    """Each employee's dated shifts from their anchor, and where their stored rows hold again.

    Dated from the anchor on: no earlier than the day before the anchor's (date_floor).

    Round one reads from the anchor to 2 × MAX_SHIFT_HOURS past the last changed
    punch; round two, for chains not settled by then, the rest of the punches.
    """
    rules = calendar.rules
    reach = 2 * rules.max_shift
    punches = storage.read_punches(
        {
            g.user_id: (anchors.get(g.user_id), None if g.until is None else g.until + reach)
            for g in batch
        }
    )
    shifts: dict[str, list[Shift]] = {}
    ends: dict[str, datetime.datetime | None] = {}
    floors: dict[str, datetime.date | None] = {}
    unsettled = []
    for group in batch:
        user_id = group.user_id
        floors[user_id] = planning.date_floor(stored[user_id], anchors.get(user_id))
        chain = build_shifts(
            punches.get(user_id, ()), max_shift=rules.max_shift, dedupe=rules.dedupe
        )
        calendar.date_shifts(chain, floor=floors[user_id])
        shifts[user_id] = chain
        ends[user_id] = None
        if group.until is not None:
            end = planning.settle_point(chain, after=group.until, stored=stored[user_id])
            ends[user_id] = end
            if end is None and planning.needs_later_punches(
                group,
                read_until=group.until + reach,
                stored=stored[user_id],
                max_shift=rules.max_shift,
            ):
                unsettled.append(group)
    if unsettled:
        more = storage.read_punches({g.user_id: (g.until + reach, None) for g in unsettled})
        for group in unsettled:
            if more.get(group.user_id):
                punches.setdefault(group.user_id, []).extend(more[group.user_id])
                chain = build_shifts(
                    punches[group.user_id], max_shift=rules.max_shift, dedupe=rules.dedupe
                )
                calendar.date_shifts(chain, floor=floors[group.user_id])
                shifts[group.user_id] = chain
    result.punches_read += sum(len(p) for p in punches.values())
    return shifts, ends


def _recompute_batch(
    batch: Sequence[Group], *, calendar: Calendar, now: datetime.datetime, result: ProcessingResult
) -> None:
    anchors, stored = planning.find_anchors(batch)
    employees = storage.employee_hours([g.user_id for g in batch])
    shifts, ends = _chains(batch, anchors=anchors, stored=stored, calendar=calendar, result=result)

    changed: list[tuple[int, tuple]] = []
    vanished: list[int] = []
    flagged: list[int] = []
    with storage.DayInserter(now=now) as inserter:
        for group in batch:
            user_id = group.user_id
            employee_id, employee = employees.get(user_id, (None, None))
            diff = diff_days(
                user_id=user_id,
                shifts=shifts[user_id],
                stored=stored[user_id],
                low=anchors.get(user_id),
                high=ends[user_id],
                employee_id=employee_id,
                employee=employee,
                calendar=calendar,
            )
            if diff.new:
                inserter.add(diff.new)  # streams while the next employees are computed
                result.rows_created += len(diff.new)
            changed += diff.changed
            vanished += diff.vanished
            flagged += diff.flagged
            result.outliers += diff.outliers
    result.groups_recomputed += len(batch)
    result.rows_changed += len(changed)
    if changed:
        storage.update_days(changed, now=now)
    if vanished:
        deleted, emptied = storage.remove_days(vanished, now=now)
        result.rows_deleted += deleted
        result.rows_voided += emptied
    if flagged:
        result.manual_flagged += storage.flag_newer_punches(flagged)


# --- Services ----------------------------------------------------------------------


def attendance_process(
    *,
    full: bool = False,
    date_from: datetime.date | None = None,
    date_to: datetime.date | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ProcessingResult:
    """Builds ProcessedAttendance from raw punches.

    Without arguments, only the employees and spans touched by punches stored
    since the last run (see core.processing.planning). `full` recomputes
    everything; `date_from`/`date_to` the days in that range (local dates, inclusive).

    Idempotent: rows are compared with what the punches give and only
    differences are written, so a run with nothing new changes nothing and
    bumps no version. A changed row gets version + 1 and is due for delivery
    again; HR-edited rows are never overwritten. Runs hold a lock, so two never
    interleave. Each run also drops the pull feed's versions past their
    retention (core.crm.crm_feed_prune). `progress`, when given, is called
    with (employees done, employees to do) after each batch. Each run adds to
    the processing totals of /metrics (core.metrics). Raises ValueError for a
    bad combination of arguments.
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
        state = planning.lock_state()
        max_id = RawAttendance.objects.aggregate(top=Max("id"))["top"] or 0
        calendar = _calendar()
        now = timezone.now()  # after max_id was read (see planning.late_commit_floor)
        if mode == "full":
            groups = planning.all_groups()
        elif mode == "range":
            groups = planning.range_groups(date_from, date_to)
        else:
            groups, result.new_punches = planning.new_groups(state)
        _recompute(groups, calendar=calendar, now=now, result=result, progress=progress)
        if mode != "range":
            planning.record_run(state, max_id=max_id, started=now)
        # The feed's older versions and tombstones age out here, under the lock.
        crm_feed_prune(now=now)
        metrics.counter_add(
            counts=[
                (metrics.PROCESSING_RUNS, 0, mode, 1),
                (metrics.PROCESSING_ROWS, 0, "created", result.rows_created),
                (metrics.PROCESSING_ROWS, 0, "changed", result.rows_changed),
                (metrics.PROCESSING_ROWS, 0, "removed", result.rows_deleted + result.rows_voided),
            ]
        )
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
        planning.lock_state()
        calendar = _calendar()
        groups = planning.row_groups(list(ids))
        _recompute(groups, calendar=calendar, now=timezone.now(), result=result)
    result.seconds = time.monotonic() - started
    return result


def attendance_discard_edits(*, ids: Iterable[int]) -> ProcessingResult:
    """Drops HR's edits on these rows and recomputes them from the punches.

    The recomputed values differ from the edited ones, so each such row gets
    version + 1 and goes to the CRM again. Idempotent.
    """
    ids = list(ids)
    with transaction.atomic():
        planning.lock_state()
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
        planning.lock_state()
        record = ProcessedAttendance.objects.select_for_update().get(pk=record_id)
        if record.is_manual and (record.clock_in, record.clock_out) == (clock_in, clock_out):
            return record
        calendar = _calendar()
        employee = storage.employee_hours([record.user_id]).get(record.user_id)
        hours = employee[1] if employee else None
        work_start, work_end = calendar.hours(hours, record.clock_in_device_id)
        out_zone = calendar.zone(record.clock_out_device_id or record.clock_in_device_id)
        reasons = day_outliers(
            clock_in=clock_in.astimezone(calendar.zone(record.clock_in_device_id)),
            clock_out=None if clock_out is None else clock_out.astimezone(out_zone),
            work_start=work_start,
            work_end=work_end,
            rules=calendar.rules,
        )
        record.clock_in = clock_in
        record.clock_out = clock_out
        record.worked = None if clock_out is None else clock_out - clock_in
        record.is_outlier = bool(reasons)
        record.outlier_reasons = reasons
        record.is_manual = True
        record.edited_by = user
        record.edited_at = timezone.now()
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
