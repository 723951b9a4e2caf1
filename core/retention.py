"""Retention: old raw punches and daily records are deleted once delivered.

RETENTION_DAYS (0 keeps everything) is how long punches and days are kept. A
row older than that is deleted only when nothing can still need it:

- a daily record only when the CRM holds it at its version (synced, at the
  version it has now); a pending, failed, rejected or in-flight day is kept.
  Without push delivery (CRM_API_URL empty) no day counts as delivered, since
  the bridge cannot know what a pulling CRM has read, so days are kept;
- a raw punch only when processing has read it (it was stored, and any change
  of its verdict made, more than LATE_COMMIT_MARGIN before the last processing
  run started: core.processing.planning explains why a run then has seen it),
  when the employee has no undelivered day that starts before the day after
  the punch (such a day, and a recomputation of it, may need the punch; so
  without push delivery an employee's punches are kept), and, with the
  raw punch export on, when its own delivery is done: registered by an export
  run the same way, and its delivery row synced or gone (delivered and
  dropped), never pending, failed, held or rejected.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from core import crm
from core.models import (
    ProcessedAttendance,
    ProcessedAttendanceVersion,
    ProcessingState,
    PunchDelivery,
    RawAttendance,
)
from core.processing import planning

logger = logging.getLogger(__name__)

DAY = datetime.timedelta(days=1)
# Rows deleted per statement: a big first cleanup must not hold long locks.
# SQLite takes at most 999 query parameters on older builds.
DELETE_BATCH = 5000
SQLITE_DELETE_BATCH = 900


@dataclass
class PruneResult:
    retention_days: int
    punches_deleted: int = 0
    days_deleted: int = 0
    punches_kept: int = 0
    days_kept: int = 0

    def summary(self) -> str:
        if not self.retention_days:
            return "RETENTION_DAYS is 0: everything is kept"
        return (
            f"older than {self.retention_days} days: {self.punches_deleted} raw punches and "
            f"{self.days_deleted} daily records deleted; {self.punches_kept} punches and "
            f"{self.days_kept} days kept, not delivered yet"
        )


def _delivered_days() -> Q:
    return Q(sync_state=ProcessedAttendance.SyncState.SYNCED, synced_version=F("version"))


def _read_before(state_name: str) -> datetime.datetime | None:
    """Punches stored (or re-judged) before this moment have been read by the
    runs of the given state; None when no run has happened."""
    last_run = (
        ProcessingState.objects.filter(name=state_name)
        .values_list("last_run_at", flat=True)
        .first()
    )
    if last_run is None:
        return None
    return last_run - settings.LATE_COMMIT_MARGIN


def _deletable_punches(cutoff: datetime.datetime, *, push: bool, punch_export: bool):
    """Raw punches older than `cutoff` that nothing needs any more (module docstring)."""
    old = RawAttendance.objects.filter(timestamp__lt=cutoff)
    processed_before = _read_before(planning.STATE_NAME)
    if processed_before is None:
        return RawAttendance.objects.none(), old
    readable = Q(received_at__lt=processed_before) & (
        Q(revised_at__isnull=True) | Q(revised_at__lt=processed_before)
    )
    if punch_export:
        registered_before = _read_before(crm.PUNCH_STATE_NAME)
        if registered_before is None:
            return RawAttendance.objects.none(), old
        readable &= Q(received_at__lt=registered_before) & ~Exists(
            PunchDelivery.objects.filter(raw=OuterRef("pk")).exclude(
                sync_state=PunchDelivery.SyncState.SYNCED
            )
        )
    undelivered = ProcessedAttendance.objects.filter(
        user_id=OuterRef("user_id"), clock_in__lte=OuterRef("timestamp") + DAY
    )
    if push:
        undelivered = undelivered.exclude(_delivered_days())
    deletable = old.filter(readable).exclude(Exists(undelivered))
    return deletable, old


def _delete_in_batches(queryset) -> int:
    """Deletes what `queryset` selects, a batch of ids at a time; returns how many."""
    deleted = 0
    model = queryset.model
    size = SQLITE_DELETE_BATCH if connection.vendor == "sqlite" else DELETE_BATCH
    while True:
        ids = list(queryset.values_list("pk", flat=True)[:size])
        if not ids:
            return deleted
        with transaction.atomic():
            if model is RawAttendance:
                # The ORM would load every punch to cascade to its delivery
                # row; the delivery rows go first, then one DELETE by id.
                PunchDelivery.objects.filter(raw_id__in=ids).delete()
                table = connection.ops.quote_name(RawAttendance._meta.db_table)
                marks = ", ".join(["%s"] * len(ids))
                with connection.cursor() as cursor:
                    cursor.execute(f"DELETE FROM {table} WHERE id IN ({marks})", ids)
            else:
                model.objects.filter(pk__in=ids).delete()
                # The days are gone from the bridge's store, not from the world:
                # no tombstone in the changes feed, where a consumer would take
                # it as a deletion. The copy of each day's last version stays,
                # for consumers that have not read it yet.
                ProcessedAttendanceVersion.objects.filter(day_id__in=ids, deleted=True).delete()
        deleted += len(ids)


def records_prune(*, now: datetime.datetime | None = None) -> PruneResult:
    """Deletes raw punches and daily records older than RETENTION_DAYS that
    are delivered and needed by nothing undelivered (module docstring).

    Idempotent: a second run finds nothing more to delete until time passes
    or rows get delivered. Set-based: one SELECT of ids and one DELETE per
    DELETE_BATCH rows, none per row. Raises nothing of its own; a database
    failure propagates, leaving what was deleted so far deleted (each batch
    is its own transaction, and the rules hold for every batch).
    """
    days = settings.RETENTION_DAYS
    result = PruneResult(retention_days=days)
    if not days:
        return result
    now = now or timezone.now()
    cutoff = now - datetime.timedelta(days=days)
    push = bool(settings.CRM_API_URL)
    punch_export = bool(settings.CRM_PUNCHES_URL)

    # Punches first: the undelivered-day rule reads the days still stored.
    deletable, old = _deletable_punches(cutoff, push=push, punch_export=punch_export)
    result.punches_deleted = _delete_in_batches(deletable)
    result.punches_kept = old.count()

    old_days = ProcessedAttendance.objects.filter(work_date__lt=cutoff.date())
    if push:
        result.days_deleted = _delete_in_batches(
            old_days.filter(_delivered_days(), delivery_key="")
        )
    result.days_kept = old_days.count()
    logger.info("Retention: %s", result.summary())
    return result
