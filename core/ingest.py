"""Raw punches in: poll a device, decode its log, store each punch once as UTC.

A poll downloads first and writes after, in one transaction: a transfer that
fails half way writes nothing, and the next poll simply tries again. Inserts
skip punches already stored (unique device, user_id, timestamp), so polling the
same log twice stores nothing twice.

Device clocks show local wall-clock time with no zone. Here those times become
aware UTC using the device's IANA zone:
- a time that occurs twice (the hour repeated when DST ends) is read as the
  first occurrence, the earlier instant;
- a time that does not exist (the hour skipped when DST starts) is read with
  the UTC offset in force before the change, so 02:30 on a spring-forward night
  becomes 03:30 local, the instant a clock that missed the change meant.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import psycopg
from django.conf import settings
from django.db import OperationalError, ProgrammingError, connection, connections, transaction
from django.db.models import Case, F, Q, QuerySet, Value, When
from django.utils import timezone

from core import metrics
from core.audit import AuditEntry, audit_record
from core.models import Device, Employee, RawAttendance
from core.zk.client import (
    DeviceClient,
    DeviceError,
    DeviceSizes,
    DeviceTimeout,
    DeviceUser,
    Punch,
)

logger = logging.getLogger(__name__)

UTC = datetime.UTC
# Devices reset to their factory date (often 2000-01-01) after losing power.
EARLIEST_PLAUSIBLE = datetime.datetime(2001, 1, 1)
INSERT_BATCH = 20_000


@dataclass
class PollResult:
    device_id: int
    device_name: str
    ok: bool = False
    quick: bool = False
    downloaded: int = 0
    new: int = 0
    duplicates: int = 0
    revised: int = 0
    suspect: int = 0
    users: int = 0
    seconds: float = 0.0
    error: str = ""
    # The device did not answer in time (DeviceTimeout), as opposed to any other failure.
    timed_out: bool = False
    # The poll succeeded but the operator should look: e.g. user names that are
    # not valid in the device's encoding.
    warnings: list[str] = field(default_factory=list)
    # Another worker held the device (device_lease_claim): this poll did nothing;
    # `error` says when to try again (DeviceBusy).
    busy: bool = False

    def line(self) -> str:
        """The summary on one line without the device's name (the log line has
        it), warnings counted (each has its own log line)."""
        text = self.summary().split("\n", 1)[0].removeprefix(f"{self.device_name}: ")
        return text + (f"; {len(self.warnings)} warning(s)" if self.warnings else "")

    def summary(self) -> str:
        if self.busy:
            return f"{self.device_name}: skipped, another worker is polling it"
        if not self.ok:
            line = f"{self.device_name}: FAILED after {self.seconds:.2f}s: {self.error}"
        elif self.quick:
            line = f"{self.device_name}: unchanged, nothing downloaded ({self.seconds:.2f}s)"
        else:
            revised = f"{self.revised} re-judged, " if self.revised else ""
            line = (
                f"{self.device_name}: {self.new} new, {self.duplicates} duplicate, {revised}"
                f"{self.suspect} suspect of {self.downloaded} downloaded ({self.seconds:.2f}s)"
            )
        return line + "".join(f"\n  WARNING: {warning}" for warning in self.warnings)


@dataclass
class DeviceReport:
    """What `test_device` shows: a read-only look at a device."""

    device_name: str
    ok: bool = False
    error: str = ""
    timed_out: bool = False
    # Another worker held the device (DeviceBusy): nothing was sent to it.
    busy: bool = False
    identity: dict[str, str] = field(default_factory=dict)
    sizes: DeviceSizes | None = None
    clock_drift_seconds: float | None = None


# --- Time conversion -------------------------------------------------------------------


def local_to_utc(moment: datetime.datetime, zone: ZoneInfo) -> datetime.datetime:
    """Converts a device-local naive time to aware UTC (see the module docstring)."""
    # fold=0 picks the first of two repeated times, and for a skipped time the
    # offset in force before the gap: the two rules the module docstring states.
    return moment.replace(tzinfo=zone, fold=0).astimezone(UTC)


def latest_plausible(zone: ZoneInfo, *, now: datetime.datetime) -> datetime.datetime:
    """The latest device-local time a punch can plausibly carry: the server's now in
    the device's zone plus SUSPECT_FUTURE_TOLERANCE.

    The server's clock, not the device's: a clock reset to 2000 by a power cut
    must not make the real punches it took before look like the future, and a
    clock set years ahead must not make its future dates look fine.
    """
    return now.astimezone(zone).replace(tzinfo=None) + settings.SUSPECT_FUTURE_TOLERANCE


def suspect_reason(punch: Punch, *, latest: datetime.datetime) -> str:
    """Why a punch's time cannot be right, or "" when it is plausible.

    `latest` comes from latest_plausible(). The wording does not depend on the
    moment of judging, so judging the same punch again gives the same reason.
    """
    if punch.problem:
        return punch.problem
    if punch.timestamp < EARLIEST_PLAUSIBLE:
        return (
            f"recorded {punch.timestamp:%Y-%m-%d %H:%M}, before 2001: the device clock was not set"
        )
    if punch.timestamp > latest:
        return (
            f"recorded {punch.timestamp:%Y-%m-%d %H:%M}, more than "
            f"{_tolerance_text()} ahead of the server's time: the device clock was set wrong"
        )
    return ""


def _tolerance_text() -> str:
    seconds = int(settings.SUSPECT_FUTURE_TOLERANCE.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0 and seconds >= size:
            count = seconds // size
            return f"{count} {unit}" + ("s" if count != 1 else "")
    return f"{seconds} s"


def clock_drift(device_now: datetime.datetime, *, zone: ZoneInfo, now: datetime.datetime) -> float:
    """Device clock minus server time, in seconds, both read in the device's zone."""
    return (local_to_utc(device_now, zone) - now).total_seconds()


# --- Storing ---------------------------------------------------------------------------


def _day_offset(day: datetime.date, zone: ZoneInfo) -> datetime.timedelta | None:
    """The zone's UTC offset on a local day, or None on a day the offset changes."""
    first = datetime.datetime.combine(day, datetime.time.min, tzinfo=zone).utcoffset()
    last = datetime.datetime.combine(day, datetime.time.max, tzinfo=zone).utcoffset()
    return first if first == last else None


def _rows(
    punches: Sequence[Punch], *, zone: ZoneInfo, latest: datetime.datetime
) -> tuple[list[tuple], int]:
    """(user_id, utc, status, punch_state, verify_type, is_suspect, reason) rows, suspect count."""
    # A zone's offset is fixed on all but its DST-change days: convert by
    # subtraction, and through local_to_utc only on the days the offset changes.
    offsets: dict[datetime.date, datetime.timedelta | None] = {}
    rows = []
    suspect = 0
    for punch in punches:
        moment = punch.timestamp
        day = moment.date()
        if day in offsets:
            offset = offsets[day]
        else:
            offset = offsets[day] = _day_offset(day, zone)
        if offset is None:
            utc = local_to_utc(moment, zone)
        else:
            utc = (moment - offset).replace(tzinfo=UTC)
        reason = ""
        # The same tests as suspect_reason, inline: calling it for every punch
        # costs a tenth of a second per 100 000, and nearly all punches pass.
        if punch.problem or moment < EARLIEST_PLAUSIBLE or moment > latest:
            reason = suspect_reason(punch, latest=latest)
            suspect += 1
        # The status byte is the verification method on every firmware we know.
        rows.append(
            (punch.user_id, utc, punch.status, punch.punch, punch.status, bool(reason), reason)
        )
    return rows, suspect


_COLUMNS = (
    "user_id varchar, ts timestamptz, status smallint, punch_state smallint, "
    "verify_type smallint, is_suspect boolean, suspect_reason varchar"
)
_COPY_TYPES = ["varchar", "timestamptz", "int2", "int2", "int2", "bool", "varchar"]

_TABLE = RawAttendance._meta.db_table
_INSERT_COLUMNS = """(device_id, user_id, "timestamp", status, punch_state, verify_type,
         is_suspect, suspect_reason, received_at)"""
# A punch already stored is judged again: its verdict (flag and reason) is
# replaced when it changed, and revised_at tells processing to read it as new.
# An operator's verdict (suspect_override) is never replaced.
_REJUDGE = f"""
    ON CONFLICT (device_id, user_id, "timestamp") DO UPDATE
    SET is_suspect = excluded.is_suspect,
        suspect_reason = excluded.suspect_reason,
        revised_at = excluded.received_at
    WHERE {_TABLE}.suspect_override IS NULL
      AND ({_TABLE}.is_suspect <> excluded.is_suspect
           OR {_TABLE}.suspect_reason <> excluded.suspect_reason)
"""

# xmax = 0 on a row this statement inserted; an updated row has the xmax of
# this transaction. One row of counts comes back, not one row per punch.
_PG_UPSERT = f"""
    WITH written AS (
        INSERT INTO {_TABLE} {_INSERT_COLUMNS}
        SELECT %s, user_id, ts, status, punch_state, verify_type, is_suspect,
               suspect_reason, %s
        FROM {{source}}
        {_REJUDGE}
        RETURNING xmax = 0 AS inserted
    )
    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
    FROM written
"""

# Batches up to this size go as arrays in one statement: a temporary table
# (create, COPY, drop) costs more than the rows themselves for a pushing
# clock's 150-record upload. DISTINCT ON takes out a record the firmware
# logged twice in one batch, which ON CONFLICT DO UPDATE could not take.
ARRAY_BATCH = 1000
_PG_ARRAYS = """(SELECT DISTINCT ON (user_id, ts) * FROM unnest(
        %s::varchar[], %s::timestamptz[], %s::int2[], %s::int2[], %s::int2[], %s::bool[],
        %s::varchar[]
    ) AS incoming (user_id, ts, status, punch_state, verify_type, is_suspect, suspect_reason))
    AS incoming"""

_SQLITE_UPSERT = f"""
    INSERT INTO {_TABLE} {_INSERT_COLUMNS}
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
    {_REJUDGE}
"""


@dataclass(frozen=True)
class StoreCounts:
    new: int
    revised: int


def punches_store(
    *, device: Device, rows: Sequence[tuple], received_at: datetime.datetime
) -> StoreCounts:
    """Inserts punch rows and re-judges the ones already stored.

    Idempotent: a punch is stored once (unique device, user_id, timestamp); one
    stored before gets the verdict in `rows` when that differs from its own
    (and no operator set it), with revised_at = received_at. Storing the same
    rows again changes nothing.

    Set-based: on PostgreSQL the rows are written with one INSERT ... ON
    CONFLICT DO UPDATE, from arrays for up to ARRAY_BATCH rows (an upload of a
    pushing clock), otherwise streamed with binary COPY into a temporary table
    first; elsewhere one executemany per INSERT_BATCH rows.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql" and len(rows) <= ARRAY_BATCH:
            columns = [list(column) for column in zip(*rows, strict=True)] or [[]] * 7
            cursor.execute(_PG_UPSERT.format(source=_PG_ARRAYS), [device.pk, received_at, *columns])
            new, revised = cursor.fetchone()
            return StoreCounts(new=new, revised=revised)
        if connection.vendor == "postgresql":
            cursor.execute(f"CREATE TEMPORARY TABLE incoming_punches ({_COLUMNS}) ON COMMIT DROP")
            with cursor.copy("COPY incoming_punches FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_COPY_TYPES)
                for row in rows:
                    copy.write_row(row)
            try:
                with transaction.atomic():
                    cursor.execute(
                        _PG_UPSERT.format(source="incoming_punches"), [device.pk, received_at]
                    )
            except ProgrammingError as exc:
                # ON CONFLICT DO UPDATE may not touch one row twice, and some
                # firmware logs the same record twice: only then pay for a sort.
                if not isinstance(exc.__cause__, psycopg.errors.CardinalityViolation):
                    raise
                source = "(SELECT DISTINCT ON (user_id, ts) * FROM incoming_punches) AS incoming"
                cursor.execute(_PG_UPSERT.format(source=source), [device.pk, received_at])
            new, revised = cursor.fetchone()
            cursor.execute("DROP TABLE incoming_punches")
            return StoreCounts(new=new, revised=revised)

        count = f"SELECT count(*) FROM {_TABLE} WHERE device_id = %s"
        cursor.execute(count, [device.pk])
        (before,) = cursor.fetchone()
        written = 0
        adapt = connection.ops.adapt_datetimefield_value
        stamp = adapt(received_at)
        for start in range(0, len(rows), INSERT_BATCH):
            batch = rows[start : start + INSERT_BATCH]
            cursor.executemany(
                _SQLITE_UPSERT,
                [(device.pk, row[0], adapt(row[1]), *row[2:], stamp) for row in batch],
            )
            written += max(cursor.rowcount, 0)
        cursor.execute(count, [device.pk])
        (after,) = cursor.fetchone()
        return StoreCounts(new=after - before, revised=written - (after - before))


def employees_store(*, device: Device, users: Iterable[DeviceUser]) -> int:
    """Upserts the device's users into Employee and links them to the device."""
    by_user_id = {user.user_id: user for user in users if user.user_id}
    if not by_user_id:
        return 0
    Employee.objects.bulk_create(
        [
            Employee(user_id=u.user_id, name=u.name, card=u.card, privilege=u.privilege)
            for u in by_user_id.values()
        ],
        update_conflicts=True,
        unique_fields=["user_id"],
        update_fields=["name", "card", "privilege", "updated_at"],
        batch_size=2000,
    )
    ids = Employee.objects.filter(user_id__in=list(by_user_id)).values_list("pk", flat=True)
    link = Employee.devices.through
    link.objects.bulk_create(
        [link(employee_id=pk, device_id=device.pk) for pk in ids],
        ignore_conflicts=True,
        batch_size=2000,
    )
    return len(by_user_id)


# --- Polling ---------------------------------------------------------------------------


# What a poll reports as it goes, for a progress display: ("records", count on
# the device) before a download, ("bytes", size of a chunk) during it,
# ("storing", punches downloaded) after it.
PollProgress = Callable[[str, int], None]


def client_for(device: Device, *, on_bytes: Callable[[int], None] | None = None) -> DeviceClient:
    """Raises DeviceError for a device without an IP address: it pushes (core.adms)."""
    if not device.ip_address:
        raise DeviceError(
            f"{device.name} has no IP address: it pushes its punches (Cloud server) and "
            "cannot be polled or reached from here"
        )
    return DeviceClient(
        host=device.ip_address,
        port=device.port,
        protocol=device.protocol,
        comm_key=device.comm_key,
        timeout=device.timeout_seconds,
        encoding=device.encoding,
        on_bytes=on_bytes,
    )


def _needs_download(
    device: Device, *, serial: str, sizes: DeviceSizes, now: datetime.datetime
) -> bool:
    if device.last_full_download_at is None:
        return True
    if now - device.last_full_download_at >= datetime.timedelta(hours=settings.FULL_POLL_HOURS):
        return True
    return device.last_serial_number != serial or device.last_record_count != sizes.records


def device_poll(
    *, device: Device, force_full: bool = False, progress: PollProgress | None = None
) -> PollResult:
    """Polls one device and stores its new punches.

    Idempotent: a punch already stored is not stored again, only judged again
    (see punches_store), and a device whose serial number and record count are
    unchanged since the last download is not downloaded again (until
    FULL_POLL_HOURS have passed or `force_full`).
    Never raises for a device problem: the failure is recorded on the device
    (last_error, consecutive_failures) and returned in the result. Each poll
    writes one log line and adds to the poll totals of /metrics (core.metrics);
    `progress`, when given, is told how the download goes (PollProgress).
    """
    started = time.monotonic()
    result = PollResult(device_id=device.pk, device_name=device.name)
    now = timezone.now()
    zone = device.zone
    try:
        on_bytes = (lambda size: progress("bytes", size)) if progress else None
        with client_for(device, on_bytes=on_bytes) as client:
            sizes = client.read_sizes()
            identity = client.read_identity()
            device_now = client.get_time()
            download = force_full or _needs_download(
                device, serial=identity["serial_number"], sizes=sizes, now=now
            )
            users: list[DeviceUser] = []
            punches: list[Punch] = []
            if download:
                if progress:
                    progress("records", sizes.records)
                # Disabled for the read: counts and log from one quiet moment.
                log = client.read_log()
                sizes, users, punches = log.sizes, log.users, log.punches
                result.warnings = log.warnings
    except DeviceError as exc:
        result.error = str(exc)
        result.timed_out = isinstance(exc, DeviceTimeout)
        result.seconds = time.monotonic() - started
        device_record_failure(device=device, error=result.error, at=now)
        logger.warning("Poll of device %s (id %s) failed: %s", device.name, device.pk, exc)
        return result

    drift = clock_drift(device_now, zone=zone, now=now)
    facts = {
        **identity,
        "user_count": sizes.users,
        "user_capacity": sizes.users_capacity,
        "record_count": sizes.records,
        "record_capacity": sizes.records_capacity,
        "clock_drift_seconds": drift,
        "last_poll_at": now,
        "last_success_at": now,
        "last_error": "",
        "consecutive_failures": 0,
    }
    if abs(drift) > settings.CLOCK_DRIFT_ALERT_SECONDS:
        warning = drift_warning(drift)
        result.warnings.append(warning)
        logger.warning("Device %s (id %s): %s", device.name, device.pk, warning)
    try:
        if download:
            if progress:
                progress("storing", len(punches))
            rows, result.suspect = _rows(punches, zone=zone, latest=latest_plausible(zone, now=now))
            with transaction.atomic():
                # Stamped as the rows are written, so processing's late-commit
                # margin only has to cover this transaction, not the download.
                received_at = timezone.now()
                counts = punches_store(device=device, rows=rows, received_at=received_at)
                result.users = employees_store(device=device, users=users)
                facts.update(
                    last_full_download_at=now,
                    last_record_count=sizes.records,
                    last_serial_number=identity["serial_number"],
                )
                Device.objects.filter(pk=device.pk).update(**facts)
                metrics.counter_add(
                    counts=[
                        (metrics.POLLS, device.pk, "downloaded", 1),
                        (metrics.PUNCHES_STORED, device.pk, "", counts.new),
                    ]
                )
            result.new, result.revised = counts.new, counts.revised
            result.downloaded = len(rows)
            result.duplicates = len(rows) - result.new
        else:
            result.quick = True
            with transaction.atomic():
                Device.objects.filter(pk=device.pk).update(**facts)
                metrics.counter_add(counts=[(metrics.POLLS, device.pk, "unchanged", 1)])
    except OperationalError as exc:
        if not _database_locked(exc):
            raise
        result.error = _locked_error()
        result.seconds = time.monotonic() - started
        logger.warning("Poll of device %s (id %s) failed: %s", device.name, device.pk, exc)
        try:
            device_record_failure(device=device, error=result.error, at=now)
        except OperationalError:
            logger.warning("Could not record the failure on device %s: still locked", device.pk)
        return result
    for name, value in facts.items():
        setattr(device, name, value)
    for warning in result.warnings:
        logger.warning("Poll of device %s (id %s): %s", device.name, device.pk, warning)
    result.ok = True
    result.seconds = time.monotonic() - started
    logger.info("Poll of device %s (id %s): %s", device.name, device.pk, result.line())
    return result


def _drift_amount(drift_seconds: float) -> str:
    size = abs(drift_seconds)
    if size >= 2 * 86400:
        return f"{size / 86400:.0f} days"
    if size >= 2 * 3600:
        return f"{size / 3600:.0f} hours"
    if size >= 120:
        return f"{size / 60:.0f} minutes"
    return f"{size:.0f} s"


def drift_text(drift_seconds: float) -> str:
    """A clock drift as people say it: "9467 days behind", "3 minutes ahead"."""
    return f"{_drift_amount(drift_seconds)} {'ahead' if drift_seconds > 0 else 'behind'}"


def drift_warning(drift_seconds: float) -> str:
    """The operator's line about a device clock that is off the server's time."""
    side = "ahead of" if drift_seconds > 0 else "behind"
    return (
        f"the device clock is {_drift_amount(drift_seconds)} {side} the server's time "
        "(Sync clock sets it); its punches are judged by the server's time"
    )


def _database_locked(exc: OperationalError) -> bool:
    return connection.vendor == "sqlite" and "locked" in str(exc)


def _busy_timeout() -> float:
    return connection.settings_dict.get("OPTIONS", {}).get("timeout", 5)


def _locked_error() -> str:
    return (
        f"the database was locked by another process for more than {_busy_timeout()} s "
        "(SQLITE_BUSY_TIMEOUT_SECONDS); nothing from this device was stored, the next poll "
        "tries again"
    )


def device_record_failure(*, device: Device, error: str, at: datetime.datetime) -> None:
    with transaction.atomic():
        Device.objects.filter(pk=device.pk).update(
            last_poll_at=at,
            last_error=error,
            consecutive_failures=F("consecutive_failures") + 1,
        )
        metrics.counter_add(counts=[(metrics.POLLS, device.pk, "failed", 1)])
    device.refresh_from_db(fields=["last_poll_at", "last_error", "consecutive_failures"])


def device_poll_guarded(
    *,
    device: Device,
    force_full: bool = False,
    progress: Callable[[Device, str, int], None] | None = None,
) -> PollResult:
    """Polls one device (device_poll) under its lease, as Poll now and
    `?wait=true` do: a device another worker holds is not contacted, its
    result marked `busy`. Never raises: a database locked too long, or a bug,
    becomes the result's error (the bug logged with the device's id)."""
    report = (lambda event, amount: progress(device, event, amount)) if progress else None
    try:
        until = device_lease_claim(device_id=device.pk, lease=poll_lease())
    except OperationalError as exc:
        if not _database_locked(exc):
            raise
        logger.warning("Poll of device %s (id %s) failed: %s", device.name, device.pk, exc)
        return PollResult(device_id=device.pk, device_name=device.name, error=_locked_error())
    if until is None:
        return _busy_result(device)
    try:
        return device_poll(device=device, force_full=force_full, progress=report)
    except Exception as exc:
        # A bug must not stop the other devices' polls; it is logged with the id.
        logger.exception("Unexpected error polling device %s (id %s)", device.name, device.pk)
        error = f"internal error: {exc.__class__.__name__}: {exc}"
        device_record_failure(device=device, error=error, at=timezone.now())
        return PollResult(device_id=device.pk, device_name=device.name, error=error)
    finally:
        device_lease_release(device_id=device.pk, until=until)


def _poll_in_thread(
    device: Device, force_full: bool, progress: Callable[[Device, str, int], None] | None
) -> PollResult:
    try:
        return device_poll_guarded(device=device, force_full=force_full, progress=progress)
    finally:
        connections.close_all()


def devices_poll(
    *,
    devices: Iterable[Device] | None = None,
    force_full: bool = False,
    workers: int = 4,
    progress: Callable[[Device, str, int], None] | None = None,
) -> list[PollResult]:
    """Polls several devices side by side; a slow or failing one does not hold up the rest.

    Each under its lease (device_poll_guarded): a device a worker is polling
    right now is skipped, its result marked `busy`. Devices without an IP
    address push their punches (core.adms) and are skipped. Idempotent as
    device_poll is; never raises for a device problem. `progress` is told each
    device's PollProgress events, possibly from several threads.
    """
    if devices is None:
        devices = Device.objects.filter(enabled=True)
    devices = [device for device in devices if device.ip_address]
    if not devices:
        return []
    if len(devices) == 1 or workers <= 1 or connection.vendor == "sqlite":
        # SQLite allows one writer at a time; threads would only queue on its lock.
        return [
            device_poll_guarded(device=device, force_full=force_full, progress=progress)
            for device in devices
        ]
    with ThreadPoolExecutor(max_workers=min(workers, len(devices))) as pool:
        return list(pool.map(lambda d: _poll_in_thread(d, force_full, progress), devices))


# --- One worker per device ---------------------------------------------------------------


# A device's lease (Device.poll_lease_until) is held by whatever talks to it:
# a poll, a log clear, a connection test, a clock set, a read or write of its
# users. ZK clocks serve one session at a time; a second connection opened
# mid-download can break the first.

# How long to wait before trying a busy device again: most polls end within
# seconds, well before their lease would (poll_lease is the worst case).
DEVICE_BUSY_RETRY_SECONDS = 30


class DeviceBusy(DeviceError):
    """Another worker holds the device's lease (a poll in progress): nothing
    was sent to the device. `retry_in` is when to try again, in seconds."""

    def __init__(self, retry_in: int):
        self.retry_in = retry_in
        super().__init__(
            f"device busy: a poll is in progress (or another session with the device), "
            f"try again in {retry_in} s"
        )


def device_busy(*, device_id: int) -> DeviceBusy:
    """The DeviceBusy for a device whose lease another worker holds: try again
    in DEVICE_BUSY_RETRY_SECONDS, or sooner when the lease ends sooner."""
    until = Device.objects.filter(pk=device_id).values_list("poll_lease_until", flat=True).first()
    left = (until - timezone.now()).total_seconds() if until else 0
    return DeviceBusy(retry_in=max(1, min(DEVICE_BUSY_RETRY_SECONDS, math.ceil(left))))


def _busy_result(device: Device) -> PollResult:
    logger.info("Device %s (id %s) is held by another worker; not polled.", device.name, device.pk)
    return PollResult(
        device_id=device.pk,
        device_name=device.name,
        busy=True,
        error=str(device_busy(device_id=device.pk)),
    )


def poll_lease() -> datetime.timedelta:
    """How long a poll, or any other session, holds its device: longer than a
    task may run (its hard time limit), so a lease is never taken from a poll
    still running."""
    return datetime.timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 30)


def device_lease_claim(*, device_id: int, lease: datetime.timedelta) -> datetime.datetime | None:
    """Claims the right to talk to one device for `lease`; returns the lease's
    end (the caller's token for device_lease_release), or None when another
    worker holds it or the device is gone.

    One conditional UPDATE (claimed when free or expired), so workers on any
    number of machines sharing the database never hold one device together.
    A worker that dies leaves the lease to expire: `lease` must outlast the
    longest poll (the task's hard time limit). Idempotent per holder; raises
    nothing for a missing device.
    """
    now = timezone.now()
    until = now + lease
    claimed = (
        Device.objects.filter(pk=device_id)
        .filter(Q(poll_lease_until__isnull=True) | Q(poll_lease_until__lte=now))
        .update(poll_lease_until=until)
    )
    return until if claimed else None


def device_lease_release(*, device_id: int, until: datetime.datetime) -> bool:
    """Gives the lease back, only if it is still the caller's (the same end);
    returns whether it was. Idempotent; raises nothing."""
    return bool(
        Device.objects.filter(pk=device_id, poll_lease_until=until).update(poll_lease_until=None)
    )


def device_poll_leased(
    *, device_id: int, lease: datetime.timedelta, force_full: bool = False
) -> PollResult | None:
    """Polls one device (device_poll) under its lease, as the scheduled polls do.

    Returns None when the device is gone or disabled, a result with `busy`
    when another worker holds the device (nothing is done), else the poll's
    result. Idempotent like device_poll; raises what device_poll raises (a
    database failure), after giving the lease back.
    """
    device = Device.objects.filter(pk=device_id, enabled=True).first()
    if device is None:
        logger.info("Device %s is gone or disabled; not polled.", device_id)
        return None
    until = device_lease_claim(device_id=device_id, lease=lease)
    if until is None:
        return _busy_result(device)
    try:
        return device_poll(device=device, force_full=force_full)
    finally:
        device_lease_release(device_id=device_id, until=until)


@contextmanager
def device_session(device: Device) -> Iterator[DeviceClient]:
    """A connection to the device under its lease (device_lease_claim), for
    everything but polls and log clears, which hold the lease themselves.

    Raises DeviceBusy before connecting when another worker holds the lease
    (a poll in progress), and DeviceError as client_for and the client do.
    The lease is given back when the block ends, error or not.
    """
    client = client_for(device)
    until = device_lease_claim(device_id=device.pk, lease=poll_lease())
    if until is None:
        raise device_busy(device_id=device.pk)
    try:
        with client:
            yield client
    finally:
        device_lease_release(device_id=device.pk, until=until)


# --- Clearing a device's log -----------------------------------------------------------


@dataclass
class ClearResult:
    device_id: int
    device_name: str
    cleared: bool = False
    records: int = 0
    fill_percent: float | None = None
    # Why the log was kept, or why the device could not be reached.
    reason: str = ""
    error: str = ""


def devices_log_clear_due(*, at_percent: float) -> list[int]:
    """Ids of enabled, polled devices whose log was fuller than `at_percent` at
    their last poll: those worth connecting to for device_clear_log. A pushing
    clock (no IP address) cannot be reached to be cleared. Reads only."""
    return [
        device.pk
        for device in Device.objects.filter(
            enabled=True,
            ip_address__isnull=False,
            record_count__isnull=False,
            record_capacity__gt=0,
        ).only("pk", "record_count", "record_capacity")
        if device.log_fill_percent is not None and device.log_fill_percent > at_percent
    ]


def _unstored_reason(device: Device, log) -> str:
    """ "" when every record of the device's log is stored, else what is missing.

    Count and newest record: the records found stored must be as many as the
    log holds (each distinct one), and the newest must be among them. One
    query for the stored keys in the log's time span, none per punch.
    """
    if not log.punches:
        return "the log is empty"
    zone = device.zone
    rows, _ = _rows(log.punches, zone=zone, latest=latest_plausible(zone, now=timezone.now()))
    keys = {(row[0], row[1]) for row in rows}
    stored = set(
        RawAttendance.objects.filter(
            device=device,
            timestamp__gte=min(key[1] for key in keys),
            timestamp__lte=max(key[1] for key in keys),
        ).values_list("user_id", "timestamp")
    )
    found = len(keys & stored)
    newest = max(keys, key=lambda key: key[1])
    if found != len(keys) or newest not in stored:
        return (
            f"{len(keys) - found} of its {len(keys)} records are not stored yet "
            f"(newest stored: {'yes' if newest in stored else 'no'}); the next poll stores them"
        )
    return ""


def _record_device_clear(*, device: Device, records: int, fill_percent: float | None) -> None:
    """The one place a device log clear is recorded: the application log and
    the audit log (no actor: the daily cleanup clears, not a person)."""
    audit_record(
        actor=None,
        action="device_clear_log",
        model=Device,
        entries=[AuditEntry.of(device, {"record_count": [records, 0]}, fill_percent=fill_percent)],
    )
    logger.warning(
        "Cleared the attendance log of device %s (id %s): %s records, all verified stored; "
        "the log was %s%% full",
        device.name,
        device.pk,
        records,
        fill_percent,
    )


def device_clear_log(
    *, device_id: int, at_percent: float, lease: datetime.timedelta
) -> ClearResult | None:
    """Clears a device's attendance log when it is fuller than `at_percent` and
    every record on it is verified stored (count and newest record match).

    Under the device's lease (no poll runs meanwhile) and with the device
    disabled from the read to the clear, so no punch can be taken between the
    check and the clear (see DeviceClient.clear_log_if). Idempotent: a log
    that was cleared is empty, under any threshold, and is left alone.
    Returns None when the device is gone or disabled, a result with `reason`
    when the log was kept; never raises for a device problem (`error`).
    """
    device = Device.objects.filter(pk=device_id, enabled=True).first()
    if device is None:
        logger.info("Device %s is gone or disabled; its log is not cleared.", device_id)
        return None
    result = ClearResult(device_id=device_id, device_name=device.name)
    until = device_lease_claim(device_id=device_id, lease=lease)
    if until is None:
        result.reason = "another worker is polling the device; the next cleanup tries again"
        return result

    def check(log) -> str:
        sizes = log.sizes
        if sizes.records_capacity:
            result.fill_percent = round(100.0 * sizes.records / sizes.records_capacity, 1)
        if result.fill_percent is None or result.fill_percent <= at_percent:
            return f"the log is {result.fill_percent}% full, not more than {at_percent:g}%"
        return _unstored_reason(device, log)

    try:
        with client_for(device) as client:
            log, result.reason = client.clear_log_if(check)
    except DeviceError as exc:
        result.error = str(exc)
        logger.warning("Log clear of device %s (id %s) failed: %s", device.name, device.pk, exc)
        return result
    finally:
        device_lease_release(device_id=device_id, until=until)
    result.records = len(log.punches)
    if result.reason:
        logger.info("Log of device %s (id %s) kept: %s", device.name, device.pk, result.reason)
        return result
    result.cleared = True
    # The next poll compares the device's count with this: an empty log is nothing new.
    Device.objects.filter(pk=device.pk).update(record_count=0, last_record_count=0)
    _record_device_clear(device=device, records=result.records, fill_percent=result.fill_percent)
    return result


def device_sync_time(*, device: Device) -> datetime.datetime:
    """Sets the device clock to the current time in its zone, under the
    device's lease (device_session); returns what was set.

    Raises DeviceBusy when another worker holds the device (nothing is sent),
    DeviceError when the device cannot be reached.
    """
    local_now = timezone.now().astimezone(device.zone).replace(tzinfo=None, microsecond=0)
    with device_session(device) as client:
        client.set_time(local_now)
        device_now = client.get_time()
    Device.objects.filter(pk=device.pk).update(
        clock_drift_seconds=clock_drift(device_now, zone=device.zone, now=timezone.now())
    )
    return local_now


def device_test(*, device: Device) -> DeviceReport:
    """Connects and reads identity, counts and clock, changing nothing, under
    the device's lease (device_session): a device another worker holds is not
    contacted, its report marked `busy`. Never raises for a device problem."""
    report = DeviceReport(device_name=device.name)
    try:
        with device_session(device) as client:
            report.identity = client.read_identity()
            report.sizes = client.read_sizes()
            device_now = client.get_time()
    except DeviceError as exc:
        report.error = str(exc)
        report.timed_out = isinstance(exc, DeviceTimeout)
        report.busy = isinstance(exc, DeviceBusy)
        return report
    report.clock_drift_seconds = clock_drift(device_now, zone=device.zone, now=timezone.now())
    report.ok = True
    return report


# --- Operator verdicts -----------------------------------------------------------------


def punches_judge(*, ids: Iterable[int], suspect: bool, reason: str, user) -> int:
    """Sets an operator's verdict on punches: suspect (skipped by processing) or not.

    The verdict goes into suspect_override, which later downloads never
    overwrite, and into is_suspect, which processing reads; suspect_reason
    records who and why. One set-based UPDATE; `ids` may be a queryset of
    primary keys, used as a subquery. Idempotent: only punches whose verdict
    changes, or that had no operator verdict yet, are written, so judging the
    same punches the same way again writes nothing; revised_at is stamped only
    where is_suspect flips, which is what makes processing recompute the day.
    Returns how many punches were written.

    Raises ValueError when the reason is blank or too long to record.
    """
    reason = " ".join(reason.split())
    if not reason:
        raise ValueError("Give a reason: it is recorded with the verdict.")
    verb = "marked suspect" if suspect else "cleared"
    prefix = f"{verb} by {user.get_username()}: "
    limit = RawAttendance._meta.get_field("suspect_reason").max_length
    if len(prefix) + len(reason) > limit:
        raise ValueError(
            f"The reason is {len(reason)} characters long; at most "
            f"{max(limit - len(prefix), 0)} fit beside {prefix.strip()!r}."
        )
    if not isinstance(ids, QuerySet):
        ids = list(ids)
    now = timezone.now()
    changes = (
        Q(suspect_override__isnull=True) | ~Q(suspect_override=suspect) | ~Q(is_suspect=suspect)
    )
    # SET expressions read the row as it was, so the Case sees the old is_suspect.
    return (
        RawAttendance.objects.filter(pk__in=ids)
        .filter(changes)
        .update(
            revised_at=Case(When(~Q(is_suspect=suspect), then=Value(now)), default=F("revised_at")),
            is_suspect=suspect,
            suspect_override=suspect,
            suspect_reason=prefix + reason,
            suspect_override_by=user.get_username(),
            suspect_override_at=now,
        )
    )
