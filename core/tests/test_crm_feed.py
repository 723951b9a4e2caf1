"""The pull feed (core.crm.crm_changes): every version of every day, tombstones
for deleted days, retention, and the order writers commit in."""

import datetime
import threading
import time

import pytest
import time_machine
from django.db import connection, transaction
from django.db.models import F

from core.crm import (
    _RECORD_FIELDS,
    CursorExpired,
    crm_changes,
    crm_feed_prune,
    feed_horizon,
    render_records,
)
from core.models import ProcessedAttendance, ProcessedAttendanceVersion, RawAttendance
from core.processing import attendance_edit, attendance_process
from core.tests.factories import DeviceFactory, EmployeeFactory

pytestmark = pytest.mark.django_db(transaction=True)

UTC = datetime.UTC
FIRST_DAY = datetime.date(2026, 11, 2)
URL = "/api/processed-attendance/changes/"


@pytest.fixture(autouse=True)
def no_versions_left_over():
    """On SQLite the test database is emptied between tests with DELETE, which
    leaves the emptied rows' tombstones behind; PostgreSQL's TRUNCATE does not."""
    ProcessedAttendanceVersion.objects.all().delete()


def make_days(count: int, *, users: int = 10) -> list[int]:
    """`count` daily records over `users` employees; returns their ids in change order."""
    device = DeviceFactory(timezone="Europe/Lisbon")
    employees = [EmployeeFactory(user_id=str(1001 + n)) for n in range(users)]
    rows = []
    for n in range(count):
        employee = employees[n % users]
        day = FIRST_DAY + datetime.timedelta(days=n // users)
        clock_in = datetime.datetime.combine(day, datetime.time(8, 0), tzinfo=UTC)
        rows.append(
            ProcessedAttendance(
                user_id=employee.user_id,
                employee=employee,
                work_date=day,
                clock_in=clock_in,
                clock_out=clock_in + datetime.timedelta(hours=9),
                clock_in_device=device,
                clock_out_device=device,
                punch_count=2,
                worked=datetime.timedelta(hours=9),
            )
        )
    ProcessedAttendance.objects.bulk_create(rows)
    return list(ProcessedAttendance.objects.order_by("change_seq").values_list("pk", flat=True))


def follow(cursor=None, *, limit=100, pages=1000):
    """Follows the feed to its end; returns (records in order, cursor)."""
    records = []
    for _ in range(pages):
        page = crm_changes(cursor=cursor, limit=limit)
        records += page.records
        cursor = page.next_cursor
        if not page.has_more:
            break
    return records, cursor


def seen(records) -> list[tuple]:
    return [(r["external_id"], r["version"], r["deleted"]) for r in records]


def bump(pk: int, **values) -> None:
    ProcessedAttendance.objects.filter(pk=pk).update(version=F("version") + 1, **values)


def external_id(pk: int) -> str:
    row = ProcessedAttendance.objects.get(pk=pk)
    return f"{row.user_id}:{row.work_date}"


def store(device, user_id: str, moment: str) -> None:
    RawAttendance.objects.create(
        device=device,
        user_id=user_id,
        timestamp=datetime.datetime.fromisoformat(moment).replace(tzinfo=UTC),
        status=1,
        verify_type=1,
    )


def server_clock(hours: float):
    start = datetime.datetime(2026, 12, 1, tzinfo=UTC)
    return time_machine.travel(start + datetime.timedelta(hours=hours), tick=False)


# --- Every version ---------------------------------------------------------------------------


def test_a_lagging_consumer_sees_both_versions_of_a_day_changed_twice_between_reads():
    ids = make_days(3)
    _, cursor = follow()
    key = external_id(ids[1])
    bump(ids[1], punch_count=3)
    bump(ids[1], punch_count=4)
    records, cursor = follow(cursor)
    assert seen(records) == [(key, 2, False), (key, 3, False)]
    assert [r["punch_count"] for r in records] == [3, 4]
    assert follow(cursor)[0] == []


def test_an_older_version_is_served_in_the_shape_of_the_push_record_plus_deleted():
    _, cursor = follow()  # an empty feed: this consumer will see every version
    ids = make_days(2)
    live_v1 = render_records(ProcessedAttendance.objects.filter(pk=ids[0]).values(*_RECORD_FIELDS))
    bump(ids[0], clock_out=None, worked=None)
    older, _, current = follow(cursor)[0]
    assert older == {**live_v1[0], "deleted": False}
    assert older["clock_in"] == "2026-11-02T08:00:00+00:00"  # in the device's zone (Lisbon)
    push = render_records(ProcessedAttendance.objects.filter(pk=ids[0]).values(*_RECORD_FIELDS))
    assert current == {**push[0], "deleted": False}
    assert (current["version"], current["clock_out"], current["worked_minutes"]) == (2, None, None)


def test_processing_and_an_hr_edit_between_two_reads_show_every_version_in_order():
    door = DeviceFactory(name="Front door", timezone="UTC")
    _, cursor = follow()  # an empty feed
    with server_clock(0):
        store(door, "1001", "2026-11-02 08:00")
        attendance_process()
    with server_clock(1):
        store(door, "1001", "2026-11-02 17:00")
        attendance_process()
    day = ProcessedAttendance.objects.get(user_id="1001")
    attendance_edit(
        record_id=day.pk,
        clock_in=day.clock_in - datetime.timedelta(hours=1),
        clock_out=day.clock_out,
        user=None,
    )
    records, _ = follow(cursor)
    assert seen(records) == [("1001:2026-11-02", v, False) for v in (1, 2, 3)]
    assert [r["clock_out"] for r in records] == [None] + ["2026-11-02T17:00:00+00:00"] * 2
    assert [r["punch_count"] for r in records] == [1, 2, 2]
    assert [r["is_manual"] for r in records] == [False, False, True]
    assert records[2]["clock_in"] == "2026-11-02T07:00:00+00:00"


def test_bookkeeping_writes_no_older_version():
    ids = make_days(3)
    ProcessedAttendance.objects.filter(pk__in=ids).update(sync_state="synced", synced_version=1)
    assert not ProcessedAttendanceVersion.objects.exists()


def test_a_consumer_starting_without_a_cursor_gets_each_day_once_at_its_current_version():
    ids = make_days(4, users=4)
    bump(ids[0])
    bump(ids[0])
    ProcessedAttendance.objects.filter(pk=ids[1]).delete()  # before it started: nothing to drop
    records, cursor = follow(limit=2)
    assert sorted(seen(records)) == sorted(
        [(external_id(ids[0]), 3, False), (external_id(ids[2]), 1, False)]
        + [(external_id(ids[3]), 1, False)]
    )
    # What changes after it started, it sees version by version.
    bump(ids[2])
    bump(ids[2])
    assert [r["version"] for r in follow(cursor)[0]] == [2, 3]


def test_a_version_replaced_after_a_fresh_consumer_started_is_still_served_to_it():
    ids = make_days(3)
    first = crm_changes(limit=1)  # started: the rest of the days wait on the next pages
    bump(ids[2], punch_count=5)
    records, _ = follow(first.next_cursor)
    assert seen(records)[-2:] == [(external_id(ids[2]), 1, False), (external_id(ids[2]), 2, False)]


# --- Deleted days ----------------------------------------------------------------------------


def test_a_day_processing_deletes_appears_as_a_tombstone():
    # A night shift whose clock-in arrives late: the 06:00 clock-out stood alone as a
    # day of its own, never pushed, so processing deletes that day.
    door = DeviceFactory(name="Front door", timezone="UTC")
    with server_clock(0):
        store(door, "2001", "2026-11-03 06:00")
        attendance_process()
    records, cursor = follow()
    assert seen(records) == [("2001:2026-11-03", 1, False)]
    with server_clock(1):
        store(door, "2001", "2026-11-02 22:00")
        assert attendance_process().rows_deleted == 1
    records, _ = follow(cursor)
    assert seen(records) == [("2001:2026-11-02", 1, False), ("2001:2026-11-03", 1, True)]
    tombstone = records[1]
    assert tombstone["deleted"] and tombstone["user_id"] == "2001"
    assert tombstone["work_date"] == "2026-11-03"
    assert set(tombstone) == set(records[0])


def test_a_day_deleted_by_hand_leaves_a_tombstone_after_the_changes_before_it():
    ids = make_days(3)
    _, cursor = follow()
    key = external_id(ids[0])
    bump(ids[0])
    ProcessedAttendance.objects.filter(pk=ids[0]).delete()
    records, _ = follow(cursor)
    assert seen(records) == [(key, 2, False), (key, 2, True)]


def test_a_day_deleted_then_made_again_comes_after_its_tombstone():
    ids = make_days(2, users=2)
    _, cursor = follow()
    row = ProcessedAttendance.objects.get(pk=ids[1])
    row.delete()
    row.pk = row.change_seq = None
    row.save()  # the same day again, version 1
    records, _ = follow(cursor)
    key = f"{row.user_id}:{row.work_date}"
    assert seen(records) == [(key, 1, True), (key, 1, False)]
    assert ProcessedAttendance.objects.get(pk=row.pk).change_seq > max(
        ProcessedAttendanceVersion.objects.values_list("seq", flat=True)
    )


# --- Retention -------------------------------------------------------------------------------


def age(days: float) -> None:
    ProcessedAttendanceVersion.objects.update(
        recorded_at=datetime.datetime.now(UTC) - datetime.timedelta(days=days)
    )


def test_prune_drops_versions_past_retention_and_keeps_the_newest_and_recent_ones(settings):
    settings.CRM_FEED_RETENTION_DAYS = 7
    ids = make_days(4, users=4)
    for pk in ids[:3]:
        bump(pk)
    age(8)
    bump(ids[3])  # recent
    assert crm_feed_prune() == 3
    kept = list(ProcessedAttendanceVersion.objects.order_by("seq").values_list("day_id", flat=True))
    assert kept == [ids[3]]
    assert crm_feed_prune() == 0
    age(8)
    assert crm_feed_prune() == 0  # the newest is kept whatever its age


def test_a_cursor_older_than_retention_is_answered_410_and_a_fresh_start_works(
    settings, client, django_user_model
):
    from django.contrib.auth.models import Permission

    settings.CRM_FEED_RETENTION_DAYS = 7
    ids = make_days(3)
    _, stale = follow()
    bump(ids[0])
    bump(ids[1])
    age(8)
    assert crm_feed_prune() == 1  # the version 1 of ids[0]; ids[1]'s is the newest
    assert feed_horizon() > 0
    with pytest.raises(CursorExpired, match="CRM_FEED_RETENTION_DAYS=7"):
        crm_changes(cursor=stale)

    user = django_user_model.objects.create_user("feed", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_processedattendance"))
    client.force_login(user)
    gone = client.get(URL, {"cursor": stale})
    assert gone.status_code == 410
    assert "Start again without a cursor" in gone.json()["cursor"]

    fresh = client.get(URL).json()
    assert sorted((r["external_id"], r["version"]) for r in fresh["results"]) == sorted(
        (external_id(pk), v) for pk, v in zip(ids, (2, 2, 1), strict=True)
    )
    assert client.get(URL, {"cursor": fresh["next_cursor"]}).json()["results"] == []


def test_a_consumer_that_reads_within_retention_never_meets_410(settings):
    settings.CRM_FEED_RETENTION_DAYS = 7
    ids = make_days(3)
    _, cursor = follow()
    bump(ids[0])
    records, cursor = follow(cursor)
    age(8)  # read before the prune: the cursor is past everything dropped
    bump(ids[1])
    crm_feed_prune()
    records, _ = follow(cursor)
    assert seen(records) == [(external_id(ids[1]), 2, False)]


def test_a_processing_run_prunes_the_feed(settings):
    settings.CRM_FEED_RETENTION_DAYS = 7
    ids = make_days(3)
    bump(ids[0])
    bump(ids[1])
    age(8)
    attendance_process()
    assert ProcessedAttendanceVersion.objects.count() == 1


def test_the_endpoint_serves_tombstones_as_json(client, django_user_model):
    from django.contrib.auth.models import Permission

    ids = make_days(2)
    user = django_user_model.objects.create_user("feed", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_processedattendance"))
    client.force_login(user)
    cursor = client.get(URL).json()["next_cursor"]
    ProcessedAttendance.objects.filter(pk=ids[0]).delete()
    (tombstone,) = client.get(URL, {"cursor": cursor}).json()["results"]
    assert tombstone["deleted"] is True and tombstone["version"] == 1
    assert tombstone["external_id"] == "1001:2026-11-02"


# --- Concurrent writers ----------------------------------------------------------------------


def test_a_follower_sees_every_version_and_deletion_committed_while_it_reads():
    # Each row gets two new versions, and some are then deleted, by two writers whose
    # transactions overlap; a follower reading all the while must see each version
    # and each tombstone. Without the lock that makes writers commit in change_seq
    # order, a page read past a number whose transaction had not committed yet, and
    # that change never came back.
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip("needs PostgreSQL or a SQLite file, not the in-memory test database")
    ids = make_days(120, users=20)
    doomed = set(ids[::7])
    seen_versions = {(external_id(pk), 1, False) for pk in ids}
    _, cursor = follow()
    keys = {pk: external_id(pk) for pk in ids}
    errors = []

    def write(share):
        try:
            for pk in share:
                for _ in range(2):
                    with transaction.atomic():
                        bump(pk)
                        time.sleep(0.003)  # commit late, while the other writer commits
                if pk in doomed:
                    with transaction.atomic():
                        ProcessedAttendance.objects.filter(pk=pk).delete()
                        time.sleep(0.002)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    writers = [threading.Thread(target=write, args=(ids[n::2],)) for n in range(2)]
    for writer in writers:
        writer.start()
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        records, cursor = follow(cursor, limit=7)
        seen_versions.update(seen(records))
    for writer in writers:
        writer.join(timeout=10)
    seen_versions.update(seen(follow(cursor)[0]))
    assert not errors
    expected = {(keys[pk], v, False) for pk in ids for v in (1, 2, 3)}
    expected |= {(keys[pk], 3, True) for pk in doomed}
    assert expected - seen_versions == set()
