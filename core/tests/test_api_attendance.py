"""The raw and daily attendance endpoints: filters and their 400s, pagination,
CSV export, HR corrections and delivery requests."""

import csv
import datetime
import io

import pytest

from core.csv_export import cell
from core.models import ProcessedAttendance, RawAttendance
from core.tests.factories import DeviceFactory, EmployeeFactory, RawAttendanceFactory

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
State = ProcessedAttendance.SyncState


@pytest.fixture
def hr(api_as):
    return api_as(groups=["HR"])


def at(*args) -> datetime.datetime:
    return datetime.datetime(*args, tzinfo=UTC)


def ids(answer) -> list[int]:
    assert answer.status_code == 200, answer.content
    return sorted(row["id"] for row in answer.json()["results"])


def day(user_id, work_date, **fields) -> ProcessedAttendance:
    clock_in = datetime.datetime.combine(work_date, datetime.time(8), tzinfo=UTC)
    values = {
        "clock_in": clock_in,
        "clock_out": clock_in + datetime.timedelta(hours=9),
        "worked": datetime.timedelta(hours=9),
        "punch_count": 2,
    }
    values.update(fields)
    return ProcessedAttendance.objects.create(user_id=user_id, work_date=work_date, **values)


# --- Raw punches -------------------------------------------------------------------------


def test_raw_dates_are_read_in_each_devices_zone_unless_tz_is_given(hr):
    new_york = DeviceFactory(timezone="America/New_York")
    lisbon = DeviceFactory(timezone="Europe/Lisbon")
    # 21:00 on 2 November in New York; 00:30 on 3 November in Lisbon.
    evening = RawAttendanceFactory(device=new_york, timestamp=at(2026, 11, 3, 2, 0))
    night = RawAttendanceFactory(device=lisbon, timestamp=at(2026, 11, 3, 0, 30))
    url = "/api/raw-attendance/"
    assert ids(hr.get(url, {"start_date": "2026-11-02", "end_date": "2026-11-02"})) == [evening.pk]
    assert ids(hr.get(url, {"start_date": "2026-11-03", "end_date": "2026-11-03"})) == [night.pk]
    in_utc = {"start_date": "2026-11-03", "end_date": "2026-11-03", "tz": "UTC"}
    assert ids(hr.get(url, in_utc)) == sorted([evening.pk, night.pk])
    assert ids(hr.get(url, {"start_date": "2026-11-03", "device": new_york.pk})) == []


def test_raw_filters_by_device_user_punch_state_and_suspect(hr):
    door, gate = DeviceFactory(), DeviceFactory()
    a = RawAttendanceFactory(device=door, user_id="1001", punch_state=0)
    b = RawAttendanceFactory(device=door, user_id="1002", punch_state=1, is_suspect=True)
    c = RawAttendanceFactory(device=gate, user_id="1001", punch_state=1)
    url = "/api/raw-attendance/"
    assert ids(hr.get(url, {"device": door.pk})) == [a.pk, b.pk]
    assert ids(hr.get(url, {"user_id": "1001"})) == [a.pk, c.pk]
    assert ids(hr.get(url, {"punch_state": 1})) == [b.pk, c.pk]
    assert ids(hr.get(url, {"suspect": "true"})) == [b.pk]
    assert ids(hr.get(url, {"suspect": "false", "device": gate.pk})) == [c.pk]
    ordered = hr.get(url, {"ordering": "user_id,timestamp"}).json()["results"]
    assert [row["id"] for row in ordered] == [a.pk, c.pk, b.pk]


@pytest.mark.parametrize(
    "params, named",
    [
        ({"device": "999999"}, "device"),
        ({"device": "door"}, "device"),
        ({"start_date": "2026-13-01"}, "start_date"),
        ({"end_date": "yesterday"}, "end_date"),
        ({"tz": "Mars/Olympus_Mons"}, "tz"),
        ({"punch_state": "9"}, "punch_state"),
        ({"suspect": "maybe"}, "suspect"),
        ({"ordering": "password"}, "ordering"),
        ({"start_date": "2026-11-05", "end_date": "2026-11-01"}, "end_date"),
        ({"start_date": "0001-01-01", "tz": "Asia/Tokyo"}, "start_date"),
        ({"end_date": "9999-12-31"}, "end_date"),
    ],
)
def test_a_bad_raw_filter_value_is_a_400_naming_the_parameter(hr, params, named):
    RawAttendanceFactory()
    answer = hr.get("/api/raw-attendance/", params)
    assert answer.status_code == 400
    assert list(answer.json()) == [named]


def test_an_unknown_id_is_a_404(hr):
    assert hr.get("/api/raw-attendance/999999/").status_code == 404
    assert hr.get("/api/processed-attendance/999999/").status_code == 404
    assert hr.patch("/api/processed-attendance/999999/", {}, format="json").status_code == 404
    assert hr.get("/api/employees/999999/").status_code == 404
    assert hr.get("/api/devices/999999/").status_code == 404


def test_lists_are_paginated_with_limit_and_offset(hr, settings):
    settings.API_MAX_PAGE_SIZE = 3
    punches = [RawAttendanceFactory().pk for _ in range(5)]
    first = hr.get("/api/raw-attendance/", {"ordering": "id", "limit": 2}).json()
    assert first["count"] == 5 and [r["id"] for r in first["results"]] == punches[:2]
    assert "offset=2" in first["next"]
    capped = hr.get("/api/raw-attendance/", {"limit": 50}).json()
    assert len(capped["results"]) == 3


# --- Daily records -----------------------------------------------------------------------


def test_daily_filters_and_the_unsynced_and_outlier_lists(hr):
    door, gate = DeviceFactory(), DeviceFactory()
    d1 = datetime.date(2026, 11, 2)
    a = day("1001", d1, clock_in_device=door, is_outlier=True, sync_state=State.SYNCED)
    b = day("1002", d1, clock_in_device=gate, clock_out_device=door, sync_state=State.FAILED)
    c = day("1001", d1 + datetime.timedelta(days=1), clock_in_device=gate)
    url = "/api/processed-attendance/"
    assert ids(hr.get(url, {"user_id": "1001"})) == [a.pk, c.pk]
    assert ids(hr.get(url, {"start_date": "2026-11-03"})) == [c.pk]
    assert ids(hr.get(url, {"end_date": "2026-11-02"})) == [a.pk, b.pk]
    assert ids(hr.get(url, {"is_outlier": "true"})) == [a.pk]
    assert ids(hr.get(url, {"sync_state": "failed"})) == [b.pk]
    assert ids(hr.get(url, {"device": door.pk})) == [a.pk, b.pk]
    assert ids(hr.get(url + "unsynced/")) == [b.pk, c.pk]
    assert ids(hr.get(url + "unsynced/", {"user_id": "1001"})) == [c.pk]
    assert ids(hr.get(url + "outliers/")) == [a.pk]


@pytest.mark.parametrize(
    "params, named",
    [
        ({"sync_state": "lost"}, "sync_state"),
        ({"is_outlier": "yes please"}, "is_outlier"),
        ({"device": "0"}, "device"),
        ({"start_date": "02/11/2026"}, "start_date"),
        ({"ordering": "-salary"}, "ordering"),
    ],
)
def test_a_bad_daily_filter_value_is_a_400_naming_the_parameter(hr, params, named):
    answer = hr.get("/api/processed-attendance/", params)
    assert answer.status_code == 400
    assert list(answer.json()) == [named]


def test_an_hr_correction_marks_the_day_manual_and_records_who_and_when(hr):
    employee = EmployeeFactory(user_id="1001")
    row = day("1001", datetime.date(2026, 11, 2), employee=employee, sync_state=State.SYNCED)
    answer = hr.patch(
        f"/api/processed-attendance/{row.pk}/",
        {"clock_in": "2026-11-02T08:15:00+01:00", "clock_out": "2026-11-02T17:00:00Z"},
        format="json",
    )
    assert answer.status_code == 200, answer.content
    row.refresh_from_db()
    assert row.is_manual and row.edited_by == hr.user and row.edited_at is not None
    assert row.clock_in == at(2026, 11, 2, 7, 15) and row.worked == datetime.timedelta(
        hours=9, minutes=45
    )
    assert row.version == 2 and row.sync_state == State.PENDING
    assert answer.json()["edited_by"] == hr.user.username and answer.json()["is_manual"]


@pytest.mark.parametrize(
    "body, named",
    [
        ({"clock_in": "2026-11-02T17:00:00Z", "clock_out": "2026-11-02T08:00:00Z"}, "clock_out"),
        ({"clock_in": "eight o'clock"}, "clock_in"),
        ({"clock_in": "0001-01-01T00:00:00Z"}, "clock_in"),
        ({}, "clock_in"),
    ],
)
def test_a_bad_correction_is_a_400_and_changes_nothing(hr, body, named):
    row = day("1001", datetime.date(2026, 11, 2))
    answer = hr.patch(f"/api/processed-attendance/{row.pk}/", body, format="json")
    assert answer.status_code == 400 and named in answer.json()
    row.refresh_from_db()
    assert not row.is_manual and row.version == 1


def test_sync_queues_a_delivery_and_makes_the_ids_given_due_again_first(api_as, celery_sent):
    operator = api_as(groups=["Operators"])
    row = day("1001", datetime.date(2026, 11, 2))
    answer = operator.post("/api/processed-attendance/sync/", {}, format="json")
    assert answer.status_code == 202
    assert celery_sent[-1][:3] == ("core.tasks.sync_to_crm", (None,), {})
    assert answer.json()["task_id"] == celery_sent[-1][3]
    ProcessedAttendance.objects.filter(pk=row.pk).update(sync_state="synced")
    answer = operator.post("/api/processed-attendance/sync/", {"ids": [row.pk]}, format="json")
    assert answer.status_code == 202 and celery_sent[-1][1] == (None,)
    row.refresh_from_db()
    assert (row.sync_state, row.resend_count) == ("pending", 1)
    unknown = operator.post(
        "/api/processed-attendance/sync/", {"ids": [row.pk, 999999]}, format="json"
    )
    assert unknown.status_code == 400 and "999999" in unknown.json()["ids"]
    assert len(celery_sent) == 2
    row.refresh_from_db()
    assert row.resend_count == 1


def test_process_queues_a_run_or_with_wait_builds_the_days_now(api_as, celery_sent):
    operator = api_as(groups=["Operators"])
    answer = operator.post("/api/processed-attendance/process/")
    assert answer.status_code == 202
    assert celery_sent == [("core.tasks.process_attendance", (), {}, answer.json()["task_id"])]
    door = DeviceFactory()
    RawAttendanceFactory(device=door, user_id="1001", timestamp=at(2026, 11, 2, 8, 0))
    RawAttendanceFactory(device=door, user_id="1001", timestamp=at(2026, 11, 2, 17, 0))
    ran = operator.post("/api/processed-attendance/process/?wait=true")
    assert ran.status_code == 200 and ran.json()["rows_created"] == 1
    assert ProcessedAttendance.objects.get().worked == datetime.timedelta(hours=9)
    again = operator.post("/api/processed-attendance/process/?wait=true")
    assert again.json()["rows_created"] == 0 and again.json()["rows_changed"] == 0
    assert len(celery_sent) == 1


# --- CSV ---------------------------------------------------------------------------------


def csv_rows(answer) -> list[dict]:
    assert answer.status_code == 200 and answer.streaming
    assert answer["Content-Type"].startswith("text/csv")
    text = b"".join(answer.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def as_csv(rows: list[dict]) -> list[dict]:
    return [{key: cell(value) for key, value in row.items()} for row in rows]


def test_raw_csv_holds_the_same_rows_and_columns_as_the_json_with_the_same_filters(hr):
    door = DeviceFactory(timezone="Europe/Lisbon")
    for minute in range(7):
        RawAttendanceFactory(device=door, user_id="1001" if minute % 2 else "1002")
    RawAttendanceFactory(user_id="1001")  # another device
    params = {"device": door.pk, "user_id": "1001", "ordering": "timestamp"}
    json_rows = hr.get("/api/raw-attendance/", params).json()["results"]
    rows = csv_rows(hr.get("/api/raw-attendance/", {**params, "format": "csv"}))
    assert len(rows) == 3
    assert rows == as_csv(json_rows)
    assert list(rows[0]) == list(json_rows[0])


def test_daily_csv_streams_every_row_not_a_page(hr, settings):
    settings.API_MAX_PAGE_SIZE = 2
    for offset in range(5):
        day("1001", datetime.date(2026, 11, 2) + datetime.timedelta(days=offset), is_outlier=True)
    rows = csv_rows(hr.get("/api/processed-attendance/outliers/", {"format": "csv"}))
    assert len(rows) == 5
    first = hr.get("/api/processed-attendance/outliers/", {"limit": 1}).json()["results"][0]
    assert rows[0] == as_csv([first])[0]
    assert rows[0]["worked"] == "09:00:00" and rows[0]["is_outlier"] == "true"


def test_a_bad_filter_with_csv_is_still_a_400_naming_the_parameter(hr):
    answer = hr.get("/api/raw-attendance/", {"format": "csv", "start_date": "soon"})
    assert answer.status_code == 400
    assert b"start_date" in answer.content


def test_the_changes_feed_is_served_under_the_processed_attendance_routes(api_as):
    crm = api_as(groups=["CRM"])
    day("1001", datetime.date(2026, 11, 2))
    page = crm.get("/api/processed-attendance/changes/", {"limit": 1}).json()
    assert [r["external_id"] for r in page["results"]] == ["1001:2026-11-02"]
    assert crm.get("/api/processed-attendance/changes/", {"limit": "x"}).status_code == 400


def test_raw_punches_cannot_be_written(api_as):
    punch = RawAttendanceFactory()
    superuser = api_as()
    superuser.user.is_superuser = True
    superuser.user.save()
    assert superuser.delete(f"/api/raw-attendance/{punch.pk}/").status_code == 405
    assert superuser.post("/api/raw-attendance/", {}, format="json").status_code == 405
    assert RawAttendance.objects.filter(pk=punch.pk).exists()
