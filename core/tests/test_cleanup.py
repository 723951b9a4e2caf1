"""The daily cleanup: retention never deletes what is not delivered, and a
device's log is cleared only when every record on it is verified stored."""

import datetime
import logging

import pytest
from auditlog.models import LogEntry
from django.db.models import F
from django.utils import timezone

from attendance_bridge.celery import app
from core import crm, ingest, tasks
from core.crm import crm_changes
from core.models import (
    Device,
    ProcessedAttendance,
    ProcessedAttendanceVersion,
    ProcessingState,
    PunchDelivery,
    RawAttendance,
)
from core.processing import attendance_process
from core.retention import records_prune
from core.tests.factories import DeviceFactory, RawAttendanceFactory
from core.zk.emulator import DeviceState

pytestmark = pytest.mark.django_db

DAY = datetime.timedelta(days=1)
LEASE = datetime.timedelta(minutes=5)
Synced = ProcessedAttendance.SyncState.SYNCED


@pytest.fixture
def retention(settings):
    settings.RETENTION_DAYS = 30
    settings.CRM_API_URL = "https://crm.example.com/records"  # push on; nothing is sent here
    settings.CRM_PUNCHES_URL = ""
    return settings


def shift(user_id: str, start: datetime.datetime, *, device, received_at=None) -> list:
    received_at = received_at or start
    return [
        RawAttendanceFactory(
            device=device, user_id=user_id, timestamp=moment, received_at=received_at
        )
        for moment in (start, start + datetime.timedelta(hours=9))
    ]


def deliver(user_id: str) -> None:
    """Books a day as the CRM acknowledging its current version would."""
    day = ProcessedAttendance.objects.get(user_id=user_id)
    ProcessedAttendance.objects.filter(pk=day.pk).update(
        sync_state=Synced, synced_version=day.version
    )


def old_moment(days: int = 100) -> datetime.datetime:
    return (timezone.now() - days * DAY).replace(hour=8, minute=0, second=0, microsecond=0)


# --- Retention ------------------------------------------------------------------------


def test_delivered_old_days_and_their_punches_are_deleted_undelivered_ones_kept(retention):
    device = DeviceFactory()
    old = old_moment()
    delivered = shift("1001", old, device=device)
    pending = shift("2001", old, device=device)
    recent = shift("3001", timezone.now() - 2 * DAY, device=device)
    attendance_process()
    deliver("1001")
    deliver("3001")

    result = records_prune()

    assert result.punches_deleted == 2 and result.days_deleted == 1
    remaining = set(RawAttendance.objects.values_list("pk", flat=True))
    assert remaining == {p.pk for p in pending + recent}
    assert set(ProcessedAttendance.objects.values_list("user_id", flat=True)) == {"2001", "3001"}
    assert not {p.pk for p in delivered} & remaining


def test_a_day_retention_deletes_leaves_no_tombstone_in_the_changes_feed(retention):
    # A consumer of the feed that started before the days were made, and has
    # read nothing since.
    lagging = crm_changes().next_cursor
    device = DeviceFactory()
    shift("1001", old_moment(), device=device)
    shift("2001", old_moment(), device=device)
    attendance_process()
    deliver("1001")
    assert records_prune().days_deleted == 1

    served = []
    cursor = lagging
    while True:
        page = crm_changes(cursor=cursor, limit=1000)
        served += [(r["user_id"], r["version"], r["deleted"]) for r in page.records]
        cursor = page.next_cursor
        if not page.has_more:
            break
    # The deleted day's last version is still served to the consumer that had
    # not read it; no record says it was deleted.
    assert ("1001", 1, False) in served
    assert not [record for record in served if record[2]]
    assert not ProcessedAttendanceVersion.objects.filter(deleted=True).exists()
    # A deletion by processing still leaves its tombstone.
    ProcessedAttendance.objects.filter(user_id="2001").delete()
    assert ProcessedAttendanceVersion.objects.filter(deleted=True, user_id="2001").count() == 1


def test_a_day_synced_at_an_older_version_is_not_deleted(retention):
    device = DeviceFactory()
    shift("1001", old_moment(), device=device)
    attendance_process()
    day = ProcessedAttendance.objects.get()
    # The CRM holds version 1; processing or HR wrote version 2 since.
    ProcessedAttendance.objects.filter(pk=day.pk).update(
        sync_state=Synced, synced_version=day.version, version=day.version + 1
    )

    result = records_prune()

    assert (result.days_deleted, result.punches_deleted) == (0, 0)
    assert ProcessedAttendance.objects.count() == 1
    assert RawAttendance.objects.count() == 2


def test_a_day_in_flight_to_the_crm_is_not_deleted(retention):
    shift("1001", old_moment(), device=DeviceFactory())
    attendance_process()
    deliver("1001")
    ProcessedAttendance.objects.update(delivery_key="k" * 64)

    assert records_prune().days_deleted == 0
    assert ProcessedAttendance.objects.count() == 1


def test_an_old_punch_processing_has_not_read_yet_is_kept(retention):
    device = DeviceFactory()
    attendance_process()  # the last run happened before the punch arrived
    # A device polled for the first time today, holding months-old punches.
    shift("1001", old_moment(), device=device, received_at=timezone.now())

    assert records_prune().punches_deleted == 0
    assert RawAttendance.objects.count() == 2


def test_punches_of_an_undelivered_later_day_are_kept_with_the_days_before_it(retention):
    device = DeviceFactory()
    old = old_moment(60)
    earlier = shift("1001", old - DAY, device=device)
    shift("1001", old, device=device)
    attendance_process()
    first, second = ProcessedAttendance.objects.order_by("work_date")
    ProcessedAttendance.objects.filter(pk=first.pk).update(
        sync_state=Synced, synced_version=first.version
    )

    records_prune()

    # The delivered day is gone, but its punches are within a day of the
    # undelivered one's start, which a recomputation re-chains from.
    assert not ProcessedAttendance.objects.filter(pk=first.pk).exists()
    assert RawAttendance.objects.filter(pk__in=[p.pk for p in earlier]).count() == 2


def test_a_punch_whose_export_is_not_delivered_is_kept(retention):
    retention.CRM_PUNCHES_URL = "https://crm.example.com/punches"
    device = DeviceFactory()
    sent = shift("1001", old_moment(), device=device)
    waiting = shift("2001", old_moment(), device=device)
    attendance_process()
    deliver("1001")
    deliver("2001")
    ProcessingState.objects.create(name=crm.PUNCH_STATE_NAME, last_run_at=timezone.now())
    PunchDelivery.objects.create(raw=sent[0], sync_state=PunchDelivery.SyncState.SYNCED)
    # sent[1] has no delivery row: delivered, and its row dropped since.
    PunchDelivery.objects.create(raw=waiting[0], sync_state=PunchDelivery.SyncState.PENDING)
    PunchDelivery.objects.create(raw=waiting[1], sync_state=PunchDelivery.SyncState.HELD)

    records_prune()

    assert set(RawAttendance.objects.values_list("pk", flat=True)) == {p.pk for p in waiting}
    assert PunchDelivery.objects.count() == 2


def test_with_the_punch_export_on_nothing_is_deleted_before_its_first_run(retention):
    retention.CRM_PUNCHES_URL = "https://crm.example.com/punches"
    shift("1001", old_moment(), device=DeviceFactory())
    attendance_process()
    deliver("1001")

    assert records_prune().punches_deleted == 0


def test_without_push_no_day_counts_as_delivered(retention):
    retention.CRM_API_URL = ""
    shift("1001", old_moment(), device=DeviceFactory())
    attendance_process()
    deliver("1001")

    result = records_prune()

    assert (result.days_deleted, result.punches_deleted) == (0, 0)


def test_retention_days_zero_keeps_everything(retention):
    retention.RETENTION_DAYS = 0
    shift("1001", old_moment(), device=DeviceFactory())
    attendance_process()
    deliver("1001")

    assert records_prune().summary() == "RETENTION_DAYS is 0: everything is kept"
    assert RawAttendance.objects.count() == 2
    assert ProcessedAttendance.objects.count() == 1


def delivered_old_days(users: int, *, first: int = 2000) -> None:
    device = DeviceFactory()
    for index in range(users):
        shift(f"{first + index}", old_moment(), device=device)
    attendance_process()
    ProcessedAttendance.objects.update(sync_state=Synced, synced_version=F("version"))


def test_cleanup_queries_do_not_grow_with_the_rows_it_deletes(retention, django_assert_num_queries):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    delivered_old_days(5)
    with CaptureQueriesContext(connection) as few:
        assert records_prune().punches_deleted == 10
    delivered_old_days(200, first=5000)

    with django_assert_num_queries(len(few)):
        assert records_prune().punches_deleted == 400


def test_cleanup_deletes_in_batches_until_nothing_is_left(retention, monkeypatch):
    delivered_old_days(40)
    monkeypatch.setattr("core.retention.DELETE_BATCH", 25)
    monkeypatch.setattr("core.retention.SQLITE_DELETE_BATCH", 25)

    result = records_prune()

    assert (result.punches_deleted, result.days_deleted) == (80, 40)
    assert not RawAttendance.objects.exists() and not ProcessedAttendance.objects.exists()


def test_a_second_cleanup_deletes_nothing_more(retention):
    shift("1001", old_moment(), device=DeviceFactory())
    attendance_process()
    deliver("1001")
    records_prune()

    result = records_prune()

    assert (result.punches_deleted, result.days_deleted) == (0, 0)


# --- Clearing a device's log (through the emulator) ----------------------------------------


def emulated(zk_emulator, **options):
    state = DeviceState.generate(users=10, punches=300, days=20, seed=5)
    emu = zk_emulator(state, **options)
    device = DeviceFactory(ip_address=emu.host, port=emu.port)
    return emu, device


def clear(device, at_percent=0.1):
    return ingest.device_clear_log(device_id=device.pk, at_percent=at_percent, lease=LEASE)


def test_a_full_log_whose_records_are_all_stored_is_cleared_and_logged(zk_emulator, caplog):
    emu, device = emulated(zk_emulator)
    assert ingest.device_poll(device=device).new == 300

    with caplog.at_level(logging.WARNING, logger="core.ingest"):
        result = clear(device)

    assert result.cleared and result.records == 300 and result.fill_percent == 0.3
    assert emu.state.attendance == []
    assert emu.enabled  # enabled again after the clear
    assert RawAttendance.objects.filter(device=device).count() == 300
    assert "Cleared the attendance log of device" in caplog.text
    entry = LogEntry.objects.get(additional_data__action="device_clear_log")
    assert (entry.object_pk, entry.actor, entry.changes) == (
        str(device.pk),
        None,
        {"record_count": [300, 0]},
    )
    device.refresh_from_db()
    assert (device.record_count, device.last_record_count, device.poll_lease_until) == (0, 0, None)
    # The next punch is the only thing the next poll stores.
    emu.push_punch("1001")
    assert ingest.device_poll(device=device).new == 1


def test_a_clear_checks_the_whole_log_in_a_fixed_number_of_queries(
    zk_emulator, django_assert_max_num_queries
):
    state = DeviceState.generate(users=50, punches=2000, days=30, seed=8)
    emu = zk_emulator(state)
    device = DeviceFactory(ip_address=emu.host, port=emu.port)
    ingest.device_poll(device=device)

    # Device, lease, the stored keys, release, counts: none per punch.
    with django_assert_max_num_queries(6):
        assert clear(device).cleared
    assert emu.state.attendance == []


def test_a_log_with_a_record_not_stored_yet_is_kept(zk_emulator):
    emu, device = emulated(zk_emulator)
    ingest.device_poll(device=device)
    emu.push_punch("1002")  # after the poll: on the device only

    result = clear(device)

    assert not result.cleared
    assert "1 of its 301 records are not stored yet" in result.reason
    assert len(emu.state.attendance) == 301


def test_a_log_never_polled_is_kept(zk_emulator):
    emu, device = emulated(zk_emulator)

    result = clear(device)

    assert not result.cleared and "300 of its 300 records are not stored" in result.reason
    assert len(emu.state.attendance) == 300


def test_a_log_not_fuller_than_the_threshold_is_kept(zk_emulator):
    emu, device = emulated(zk_emulator)
    ingest.device_poll(device=device)

    result = clear(device, at_percent=0.3)  # 300 of 100 000 is 0.3 %, not more

    assert not result.cleared and "not more than 0.3%" in result.reason
    assert len(emu.state.attendance) == 300


def test_firmware_recording_while_disabled_never_loses_a_punch_to_a_clear(zk_emulator):
    emu, device = emulated(zk_emulator, punch_during_read=True, ignore_disable=True)
    ingest.device_poll(device=device)

    result = clear(device)

    assert not result.cleared
    stored = RawAttendance.objects.filter(device=device).count()
    assert len(emu.state.attendance) > stored


def test_a_device_being_polled_is_not_cleared(zk_emulator):
    emu, device = emulated(zk_emulator)
    ingest.device_poll(device=device)
    ingest.device_lease_claim(device_id=device.pk, lease=LEASE)

    result = clear(device)

    assert not result.cleared and "another worker" in result.reason
    assert emu.enable_log.count("disable") == 1  # the poll's read only


def test_an_unreachable_device_is_reported_not_raised(zk_emulator):
    emu, device = emulated(zk_emulator)
    Device.objects.filter(pk=device.pk).update(timeout_seconds=1)
    emu.stop()

    result = clear(device)

    assert not result.cleared and "refused the connection" in result.error
    assert Device.objects.get(pk=device.pk).poll_lease_until is None


@pytest.fixture
def eager():
    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = previous


def test_daily_cleanup_clears_only_logs_over_the_threshold_when_enabled(
    zk_emulator, settings, eager
):
    settings.RETENTION_DAYS = 0
    settings.CLEAR_DEVICE_LOGS_AT_PERCENT = 0.2
    full_emu, full = emulated(zk_emulator)
    small_state = DeviceState.generate(users=5, punches=100, days=5, seed=6)
    small_emu = zk_emulator(small_state)
    small = DeviceFactory(ip_address=small_emu.host, port=small_emu.port)
    ingest.device_poll(device=full)
    ingest.device_poll(device=small)

    settings.CLEAR_DEVICE_LOGS = False
    assert tasks.daily_cleanup()["log_clears_queued"] == []
    assert len(full_emu.state.attendance) == 300

    settings.CLEAR_DEVICE_LOGS = True
    assert tasks.daily_cleanup()["log_clears_queued"] == [full.pk]
    assert full_emu.state.attendance == []
    assert len(small_emu.state.attendance) == 100
