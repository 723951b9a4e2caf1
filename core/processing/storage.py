"""Reading punches and stored days in bulk, and writing the differences.

The PostgreSQL and SQLite paths are side by side here and nowhere else. Reads
and writes are per batch of employees: a handful of queries whatever the
batch's size. On PostgreSQL the hot ones bypass the ORM's per-value work
while the ORM still builds the queries: reads go through a plain cursor with
psycopg's C loaders (fetch), new rows stream into a binary COPY (DayInserter),
changed rows go through a temporary table and one UPDATE … FROM (update_days).
SQLite uses bulk_create.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import operator
from collections.abc import Sequence
from zoneinfo import ZoneInfo

import psycopg
from django.db import connection
from django.db.models import F, Lookup, Q, QuerySet
from psycopg.pq import Format

from core.models import (
    Device,
    Employee,
    ProcessedAttendance,
    ProcessedAttendanceVersion,
    RawAttendance,
)
from core.processing.diff import ROW_COLUMNS, StoredDay
from core.processing.rules import Hours
from core.processing.shifts import COMPUTED_FIELDS, Punch

UTC_MIN = datetime.datetime.min.replace(tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
# How far apart the windows of employees read by one query may start (clusters).
CLUSTER_SPREAD = datetime.timedelta(days=7)
WRITE_BATCH = 2000

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
# Written with every new or changed row: it is due for delivery (again).
_DUE = {
    "sync_state": ProcessedAttendance.SyncState.PENDING,
    "sync_attempts": 0,
    "next_sync_at": None,
}
# What the pull feed keeps of a version it replaces (ProcessedAttendanceVersion).
_VERSION_COLUMNS = (
    "id",
    "user_id",
    "employee_id",
    "work_date",
    "version",
    "clock_in",
    "clock_out",
    "clock_in_device_id",
    "clock_out_device_id",
    "punch_count",
    "worked",
    "is_outlier",
    "outlier_reasons",
    "is_manual",
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


# --- Queries -------------------------------------------------------------------------


class _UserIdAny(Lookup):
    """`user_id = ANY(%s)`, with the list as one array: with thousands of employees
    Django and psycopg spend far longer on `IN (%s, %s, …)` than PostgreSQL does.
    Used as an expression in filter(), so no model needs it registered."""

    lookup_name = "any"

    def get_prep_lookup(self):
        return list(self.rhs)

    def as_sql(self, compiler, connection):
        lhs, params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s)", [*params, self.rhs]


def user_in(users: Sequence[str]) -> Q | Lookup:
    """A filter on user_id in these, for any of the models keyed by it."""
    if connection.vendor == "postgresql":
        return _UserIdAny(F("user_id"), users)
    return Q(user_id__in=users)


def clusters(starts: dict[str, datetime.datetime]) -> list[list[str]]:
    """Employees in groups whose starts lie within CLUSTER_SPREAD of each other.

    One query per group over the group's widest bounds then reads little that an
    employee does not need, even when one of them comes back after a year away.
    """
    found: list[list[str]] = []
    first = UTC_MIN
    for user_id in sorted(starts, key=starts.__getitem__):
        if not found or starts[user_id] - first > CLUSTER_SPREAD:
            found.append([])
            first = starts[user_id]
        found[-1].append(user_id)
    return found


class _JsonbLoader(psycopg.adapt.Loader):
    def load(self, data):
        return [] if data == b"[]" else json.loads(bytes(data))


def fetch(queryset: QuerySet) -> list[tuple]:
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


# --- Reads ---------------------------------------------------------------------------


def device_hours() -> dict[int, Hours]:
    """Each device's zone and schedule overrides."""
    rows = Device.objects.values_list("id", "timezone", "work_start_time", "work_end_time")
    return {pk: Hours(ZoneInfo(tz), start, end) for pk, tz, start, end in rows}


def employee_hours(users: Sequence[str]) -> dict[str, tuple[int, Hours]]:
    """Each known employee's pk and schedule overrides."""
    return {
        user_id: (pk, Hours(None, start, end))
        for user_id, pk, start, end in fetch(
            Employee.objects.filter(user_in(users))
            .order_by()
            .values_list("user_id", "id", "work_start_time", "work_end_time")
        )
    }


StoredDays = dict[str, dict[datetime.date, StoredDay]]


def _load_days(stored: StoredDays, queryset: QuerySet) -> None:
    for row in fetch(queryset.order_by().values_list(*_STORED_FIELDS)):
        pk, user_id, work_date, *values = row
        *values, is_manual, version, newer, edited_at, reviewed_at = values
        seen = max((m for m in (edited_at, reviewed_at) if m is not None), default=None)
        stored[user_id][work_date] = StoredDay(pk, tuple(values), is_manual, version, newer, seen)


def read_days(stored: StoredDays, users: Sequence[str]) -> None:
    """Adds all of these employees' stored rows to `stored` (keyed by user, then date)."""
    _load_days(stored, ProcessedAttendance.objects.filter(user_in(users)))


def read_days_near(stored: StoredDays, starts: dict[str, datetime.datetime], *, days: int) -> None:
    """Adds each employee's stored rows from `days` days before the UTC date of their start.

    One query per cluster of employees (the rows of its earliest start on).
    """
    for users in clusters(starts):
        first = min(starts[u] for u in users).date()
        _load_days(
            stored,
            ProcessedAttendance.objects.filter(user_in(users), work_date__gte=first - days * DAY),
        )


def latest_shift_starts(bounds: dict[str, datetime.datetime]) -> dict[str, datetime.datetime]:
    """Each employee's latest computed (non-manual) clock_in at or before their bound."""
    found: dict[str, datetime.datetime] = {}
    for users in clusters(bounds):
        candidates = ProcessedAttendance.objects.filter(
            user_in(users),
            is_manual=False,
            clock_in__isnull=False,
            clock_in__lte=max(bounds[u] for u in users),
        )
        for user_id, clock_in in fetch(candidates.order_by().values_list("user_id", "clock_in")):
            if clock_in <= bounds[user_id] and clock_in > found.get(user_id, clock_in - DAY):
                found[user_id] = clock_in
    return found


def read_punches(
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
        queries.append((unbounded, RawAttendance.objects.filter(user_in(unbounded))))
    for users in clusters(bounded):
        start = min(bounded[u] for u in users)
        queries.append((users, RawAttendance.objects.filter(user_in(users), timestamp__gte=start)))
    for users, queryset in queries:
        ends = [windows[u][1] for u in users]
        if None not in ends:
            queryset = queryset.filter(timestamp__lt=max(ends))
        rows = fetch(
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


# --- Writes --------------------------------------------------------------------------


def _copy(cursor, table: str, names: Sequence[str]):
    """A binary COPY into these columns: psycopg formats text COPY in Python, six times slower."""
    quote = connection.ops.quote_name
    meta = ProcessedAttendance._meta
    copy = cursor.cursor.copy(
        f"COPY {table} ({', '.join(quote(meta.get_field(n).column) for n in names)}) "
        "FROM STDIN (FORMAT BINARY)"
    )
    types = [meta.get_field(name).db_type(connection).split("(")[0] for name in names]
    return copy, types


class DayInserter:
    """Stores new rows (as in ROW_COLUMNS) as they are computed.

    The rows are known not to exist: every row of these employees they could
    collide with was read, under the processing lock; should that ever not
    hold, the insert fails on the unique constraint rather than overwrite.
    On PostgreSQL they stream into a COPY, opened at the first row, so the
    server stores them while the next ones are computed; elsewhere bulk_create.
    """

    def __init__(self, *, now: datetime.datetime) -> None:
        self.now = now
        self.postgresql = connection.vendor == "postgresql"
        self.rows: list[tuple] = []
        self.stack = contextlib.ExitStack()
        self.copy = None
        self.tail: tuple = ()

    def __enter__(self) -> DayInserter:
        return self

    def add(self, rows: list[tuple]) -> None:
        if not self.postgresql:
            self.rows.extend(rows)
            return
        if self.copy is None:
            self._open()
        write, tail = self.copy.write_row, self.tail
        for row in rows:
            write(row + tail)

    def _open(self) -> None:
        meta = ProcessedAttendance._meta
        names = list(ROW_COLUMNS)
        # Every other column gets its model default (so that a field added later
        # needs nothing here); columns that default to NULL are left out.
        fixed = {**_DUE, "created_at": self.now, "updated_at": self.now}
        tail = []
        for column in meta.concrete_fields:
            if column.primary_key or column.attname in ROW_COLUMNS:
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
                    ProcessedAttendance(**dict(zip(ROW_COLUMNS, row, strict=True)), **_DUE)
                    for row in self.rows
                ],
                batch_size=WRITE_BATCH,
            )


def update_days(changed: list[tuple[int, tuple]], *, now: datetime.datetime) -> None:
    """Overwrites changed rows, given as (pk, row as in ROW_COLUMNS); each is due again.

    On PostgreSQL: COPY into a temporary table, then one UPDATE … FROM, whose
    statement also copies the versions it replaces into the pull feed's
    history (ProcessedAttendanceVersion); elsewhere a database trigger does.
    """
    if connection.vendor != "postgresql":
        ProcessedAttendance.objects.bulk_create(
            [
                ProcessedAttendance(**dict(zip(ROW_COLUMNS, row, strict=True)), **_DUE)
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
    columns = [quote(meta.get_field(name).column) for name in ROW_COLUMNS]
    assignments = [f"{c} = t.{c}" for c in columns[2:]]  # not the (user_id, work_date) key
    assignments += [f"{quote(name)} = %s" for name in (*_DUE, "updated_at")]
    # Numbered here rather than by the row trigger, which leaves a row numbered
    # by its writer alone, so that the versions these rows replace go to the
    # pull feed's history in one INSERT rather than one per row (migration 0011).
    # The statement's lock trigger has run before nextval is called.
    assignments.append("change_seq = nextval('core_processed_change_seq')")
    kept = ", ".join(f"o.{quote(c)}" for c in _VERSION_COLUMNS)
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS processing_changed ON COMMIT DROP AS "
            f"SELECT id, {', '.join(columns)} FROM {table} WITH NO DATA"
        )
        copying, types = _copy(cursor, "processing_changed", ["id", *ROW_COLUMNS])
        with copying as copy:
            copy.set_types(types)
            for pk, row in changed:
                copy.write_row((pk, *row))
        # The FROM list reads each row a second time, as `o`: in the statement's
        # snapshot, so as it was before this UPDATE, which RETURNING hands to
        # the INSERT with the number the row now has.
        day_id, *rest = (quote(c) for c in _VERSION_COLUMNS)
        cursor.execute(
            f"WITH new AS ("
            f"  UPDATE {table} AS p SET {', '.join(assignments)}"
            f"  FROM processing_changed AS t JOIN {table} AS o ON o.id = t.id"
            f"  WHERE p.id = t.id"
            f"  RETURNING p.change_seq AS replaced_by, o.change_seq, {kept}"
            f") INSERT INTO {quote(ProcessedAttendanceVersion._meta.db_table)} "
            f"(seq, replaced_by, day_id, deleted, {', '.join(rest)}, recorded_at) "
            f"SELECT change_seq, replaced_by, {day_id}, false, {', '.join(rest)}, %s "
            f"FROM new WHERE change_seq IS NOT NULL",
            [*_DUE.values(), now, now],
        )
        cursor.execute("TRUNCATE processing_changed")


def remove_days(pks: list[int], *, now: datetime.datetime) -> tuple[int, int]:
    """Rows whose punches now belong to other days: deleted if the CRM never saw them.

    One that has been sent (or whose sending was attempted) stays, emptied, with
    version + 1, so that the CRM receives the correction. The conditions are
    re-checked in the DELETE itself, in case delivery started meanwhile.
    Returns (deleted, emptied).
    """
    deleted, _ = ProcessedAttendance.objects.filter(
        pk__in=pks,
        synced_version__isnull=True,
        sync_attempts=0,
        last_sync_attempt__isnull=True,
    ).delete()
    emptied = ProcessedAttendance.objects.filter(pk__in=pks).update(
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
        updated_at=now,
    )
    return deleted, emptied


def flag_newer_punches(pks: list[int]) -> int:
    """Marks HR-edited rows as having punches newer than the edit; returns how many."""
    return ProcessedAttendance.objects.filter(pk__in=pks).update(has_newer_punches=True)
