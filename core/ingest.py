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
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection, connections, transaction
from django.db.models import F
from django.utils import timezone

from core.models import Device, Employee, RawAttendance
from core.zk.client import DeviceClient, DeviceError, DeviceSizes, DeviceUser, Punch

logger = logging.getLogger(__name__)

UTC = datetime.UTC
# Devices reset to their factory date (often 2000-01-01) after losing power.
EARLIEST_PLAUSIBLE = datetime.datetime(2001, 1, 1)
MAX_AHEAD_OF_DEVICE_CLOCK = datetime.timedelta(days=1)
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
    suspect: int = 0
    users: int = 0
    seconds: float = 0.0
    error: str = ""
    # The poll succeeded but the operator should look: e.g. user names that are
    # not valid in the device's encoding.
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.ok:
            return f"{self.device_name}: FAILED after {self.seconds:.2f}s: {self.error}"
        if self.quick:
            return f"{self.device_name}: unchanged, nothing downloaded ({self.seconds:.2f}s)"
        return (
            f"{self.device_name}: {self.new} new, {self.duplicates} duplicate, "
            f"{self.suspect} suspect of {self.downloaded} downloaded ({self.seconds:.2f}s)"
        ) + "".join(f"\n  WARNING: {warning}" for warning in self.warnings)


@dataclass
class DeviceReport:
    """What `test_device` shows: a read-only look at a device."""

    device_name: str
    ok: bool = False
    error: str = ""
    identity: dict[str, str] = field(default_factory=dict)
    sizes: DeviceSizes | None = None
    clock_drift_seconds: float | None = None


# --- Time conversion -------------------------------------------------------------------


def local_to_utc(moment: datetime.datetime, zone: ZoneInfo) -> datetime.datetime:
    """Converts a device-local naive time to aware UTC (see the module docstring)."""
    # fold=0 picks the first of two repeated times, and for a skipped time the
    # offset in force before the gap: the two rules the module docstring states.
    return moment.replace(tzinfo=zone, fold=0).astimezone(UTC)


def suspect_reason(punch: Punch, *, device_now: datetime.datetime) -> str:
    """Why a punch's time cannot be right, or "" when it is plausible."""
    if punch.problem:
        return punch.problem
    if punch.timestamp < EARLIEST_PLAUSIBLE:
        return (
            f"recorded {punch.timestamp:%Y-%m-%d %H:%M}, before 2001: the device clock was not set"
        )
    if punch.timestamp > device_now + MAX_AHEAD_OF_DEVICE_CLOCK:
        return (
            f"recorded {punch.timestamp:%Y-%m-%d %H:%M}, more than a day ahead of the device "
            f"clock ({device_now:%Y-%m-%d %H:%M})"
        )
    return ""


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
    punches: Sequence[Punch], *, zone: ZoneInfo, device_now: datetime.datetime
) -> tuple[list[tuple], int]:
    """(user_id, utc, status, punch_state, verify_type, is_suspect, reason) rows, suspect count."""
    # A zone's offset is fixed on all but its DST-change days: convert by
    # subtraction, and through local_to_utc only on the days the offset changes.
    offsets: dict[datetime.date, datetime.timedelta | None] = {}
    rows = []
    suspect = 0
    latest_plausible = device_now + MAX_AHEAD_OF_DEVICE_CLOCK
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
        if punch.problem or moment < EARLIEST_PLAUSIBLE or moment > latest_plausible:
            reason = suspect_reason(punch, device_now=device_now)
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

_PG_INSERT = f"""
    INSERT INTO {RawAttendance._meta.db_table}
        (device_id, user_id, "timestamp", status, punch_state, verify_type,
         is_suspect, suspect_reason, received_at)
    SELECT %s, user_id, ts, status, punch_state, verify_type, is_suspect, suspect_reason, %s
    FROM incoming_punches
    ON CONFLICT (device_id, user_id, "timestamp") DO NOTHING
"""

_SQLITE_INSERT = f"""
    INSERT OR IGNORE INTO {RawAttendance._meta.db_table}
        (device_id, user_id, "timestamp", status, punch_state, verify_type,
         is_suspect, suspect_reason, received_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def punches_store(*, device: Device, rows: Sequence[tuple], received_at: datetime.datetime) -> int:
    """Inserts punch rows, skipping ones already stored. Returns how many were new.

    Set-based: on PostgreSQL the rows are streamed with binary COPY into a
    temporary table and inserted with one INSERT ... ON CONFLICT DO NOTHING;
    elsewhere one executemany per INSERT_BATCH rows with INSERT OR IGNORE.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"CREATE TEMPORARY TABLE incoming_punches ({_COLUMNS}) ON COMMIT DROP")
            with cursor.copy("COPY incoming_punches FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_COPY_TYPES)
                for row in rows:
                    copy.write_row(row)
            cursor.execute(_PG_INSERT, [device.pk, received_at])
            new = cursor.rowcount
            cursor.execute("DROP TABLE incoming_punches")
            return new
        new = 0
        adapt = connection.ops.adapt_datetimefield_value
        stamp = adapt(received_at)
        for start in range(0, len(rows), INSERT_BATCH):
            batch = rows[start : start + INSERT_BATCH]
            cursor.executemany(
                _SQLITE_INSERT,
                [(device.pk, row[0], adapt(row[1]), *row[2:], stamp) for row in batch],
            )
            new += max(cursor.rowcount, 0)
        return new


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


def client_for(device: Device) -> DeviceClient:
    return DeviceClient(
        host=device.ip_address,
        port=device.port,
        protocol=device.protocol,
        comm_key=device.comm_key,
        timeout=device.timeout_seconds,
        encoding=device.encoding,
    )


def _needs_download(
    device: Device, *, serial: str, sizes: DeviceSizes, now: datetime.datetime
) -> bool:
    if device.last_full_download_at is None:
        return True
    if now - device.last_full_download_at >= datetime.timedelta(hours=settings.FULL_POLL_HOURS):
        return True
    return device.last_serial_number != serial or device.last_record_count != sizes.records


def device_poll(*, device: Device, force_full: bool = False) -> PollResult:
    """Polls one device and stores its new punches.

    Idempotent: punches already stored are skipped, and a device whose serial
    number and record count are unchanged since the last download is not
    downloaded again (until FULL_POLL_HOURS have passed or `force_full`).
    Never raises for a device problem: the failure is recorded on the device
    (last_error, consecutive_failures) and returned in the result.
    """
    started = time.monotonic()
    result = PollResult(device_id=device.pk, device_name=device.name)
    now = timezone.now()
    zone = device.zone
    try:
        with client_for(device) as client:
            sizes = client.read_sizes()
            identity = client.read_identity()
            device_now = client.get_time()
            download = force_full or _needs_download(
                device, serial=identity["serial_number"], sizes=sizes, now=now
            )
            users: list[DeviceUser] = []
            punches: list[Punch] = []
            if download:
                # Disabled for the read: counts and log from one quiet moment.
                log = client.read_log()
                sizes, users, punches = log.sizes, log.users, log.punches
                result.warnings = log.warnings
    except DeviceError as exc:
        result.error = str(exc)
        result.seconds = time.monotonic() - started
        device_record_failure(device=device, error=result.error, at=now)
        logger.warning("Poll of device %s (id %s) failed: %s", device.name, device.pk, exc)
        return result

    facts = {
        **identity,
        "user_count": sizes.users,
        "user_capacity": sizes.users_capacity,
        "record_count": sizes.records,
        "record_capacity": sizes.records_capacity,
        "clock_drift_seconds": clock_drift(device_now, zone=zone, now=now),
        "last_poll_at": now,
        "last_success_at": now,
        "last_error": "",
        "consecutive_failures": 0,
    }
    if download:
        rows, result.suspect = _rows(punches, zone=zone, device_now=device_now)
        with transaction.atomic():
            result.new = punches_store(device=device, rows=rows, received_at=now)
            result.users = employees_store(device=device, users=users)
            facts.update(
                last_full_download_at=now,
                last_record_count=sizes.records,
                last_serial_number=identity["serial_number"],
            )
            Device.objects.filter(pk=device.pk).update(**facts)
        result.downloaded = len(rows)
        result.duplicates = len(rows) - result.new
    else:
        result.quick = True
        Device.objects.filter(pk=device.pk).update(**facts)
    for name, value in facts.items():
        setattr(device, name, value)
    for warning in result.warnings:
        logger.warning("Poll of device %s (id %s): %s", device.name, device.pk, warning)
    result.ok = True
    result.seconds = time.monotonic() - started
    return result


def device_record_failure(*, device: Device, error: str, at: datetime.datetime) -> None:
    Device.objects.filter(pk=device.pk).update(
        last_poll_at=at,
        last_error=error,
        consecutive_failures=F("consecutive_failures") + 1,
    )
    device.refresh_from_db(fields=["last_poll_at", "last_error", "consecutive_failures"])


def _poll_guarded(device: Device, force_full: bool) -> PollResult:
    try:
        return device_poll(device=device, force_full=force_full)
    except Exception as exc:
        # A bug must not stop the other devices' polls; it is logged with the id.
        logger.exception("Unexpected error polling device %s (id %s)", device.name, device.pk)
        error = f"internal error: {exc.__class__.__name__}: {exc}"
        device_record_failure(device=device, error=error, at=timezone.now())
        return PollResult(device_id=device.pk, device_name=device.name, error=error)


def _poll_in_thread(device: Device, force_full: bool) -> PollResult:
    try:
        return _poll_guarded(device, force_full)
    finally:
        connections.close_all()


def devices_poll(
    *, devices: Iterable[Device] | None = None, force_full: bool = False, workers: int = 4
) -> list[PollResult]:
    """Polls several devices side by side; a slow or failing one does not hold up the rest."""
    devices = list(Device.objects.filter(enabled=True) if devices is None else devices)
    if not devices:
        return []
    if len(devices) == 1 or workers <= 1 or connection.vendor == "sqlite":
        # SQLite allows one writer at a time; threads would only queue on its lock.
        return [_poll_guarded(device, force_full) for device in devices]
    with ThreadPoolExecutor(max_workers=min(workers, len(devices))) as pool:
        return list(pool.map(lambda d: _poll_in_thread(d, force_full), devices))


def device_sync_time(*, device: Device) -> datetime.datetime:
    """Sets the device clock to the current time in its zone; returns what was set.

    Raises DeviceError when the device cannot be reached.
    """
    local_now = timezone.now().astimezone(device.zone).replace(tzinfo=None, microsecond=0)
    with client_for(device) as client:
        client.set_time(local_now)
        device_now = client.get_time()
    Device.objects.filter(pk=device.pk).update(
        clock_drift_seconds=clock_drift(device_now, zone=device.zone, now=timezone.now())
    )
    return local_now


def device_test(*, device: Device) -> DeviceReport:
    """Connects and reads identity, counts and clock, changing nothing."""
    report = DeviceReport(device_name=device.name)
    try:
        with client_for(device) as client:
            report.identity = client.read_identity()
            report.sizes = client.read_sizes()
            device_now = client.get_time()
    except DeviceError as exc:
        report.error = str(exc)
        return report
    report.clock_drift_seconds = clock_drift(device_now, zone=device.zone, now=timezone.now())
    report.ok = True
    return report
