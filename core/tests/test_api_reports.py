"""GET /api/reports/timesheet/, GET /api/audit-log/ and the admin's timesheet page:
who may read them, their parameters and their errors."""

import csv
import datetime
import io

import pytest
import time_machine
from auditlog.models import LogEntry
from django.contrib.auth.models import Permission
from django.urls import reverse

from core.audit import AuditEntry, audit_record
from core.csv_export import cell
from core.models import Device, ProcessedAttendance
from core.tests.factories import DeviceFactory, EmployeeFactory

pytestmark = pytest.mark.django_db


UTC = datetime.UTC
TIMESHEET = "/api/reports/timesheet/"
AUDIT_LOG = "/api/audit-log/"


@pytest.fixture
def login(client, django_user_model):
    """`login("core.view_timesheet", staff=False)`: a user with exactly these permissions."""

    def make(*perms: str, username: str = "user", staff: bool = True):
        user = django_user_model.objects.create_user(username, is_staff=staff)
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        client.force_login(user)
        return user

    return make


def make_day(user_id: str, day: int, *, clock_in="08:00", clock_out="17:00", **fields):
    work_date = datetime.date(2026, 11, day)

    def moment(text):
        if text is None:
            return None
        return datetime.datetime.combine(work_date, datetime.time.fromisoformat(text), UTC)

    start, end = moment(clock_in), moment(clock_out)
    return ProcessedAttendance.objects.create(
        user_id=user_id,
        work_date=work_date,
        clock_in=start,
        clock_out=end,
        worked=None if end is None else end - start,
        punch_count=1 if end is None else 2,
        **fields,
    )


@pytest.fixture
def days():
    EmployeeFactory(user_id="2001", name="Ann Lee")
    make_day("2001", 2)
    make_day("2001", 3, clock_out=None, is_outlier=True)
    make_day("2002", 3)


# --- The timesheet in the API ------------------------------------------------------------


@pytest.mark.parametrize(
    "perms, staff",
    [
        ((), True),
        (("core.view_processedattendance", "core.change_processedattendance"), True),
        (("auditlog.view_logentry",), True),
    ],
    ids=["no permission", "daily attendance only", "audit log only"],
)
def test_timesheet_api_refuses_users_without_the_timesheet_permission(login, client, perms, staff):
    login(*perms, staff=staff)
    response = client.get(TIMESHEET, {"start_date": "2026-11-01", "end_date": "2026-11-30"})
    assert response.status_code == 403


def test_timesheet_api_refuses_anonymous_requests(client, days):
    response = client.get(TIMESHEET, {"start_date": "2026-11-01", "end_date": "2026-11-30"})
    assert response.status_code == 401
    assert "results" not in response.json()


def test_timesheet_api_returns_a_paginated_list_of_flat_rows(login, client, days):
    # Not staff: the permission alone is enough.
    login("core.view_timesheet", staff=False)
    response = client.get(
        TIMESHEET, {"start_date": "2026-11-01", "end_date": "2026-11-30", "limit": 1}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert body["next"] is not None
    assert body["results"] == [
        {
            "user_id": "2001",
            "name": "Ann Lee",
            "days_worked": 2,
            "worked_hours": 9.0,
            "worked": "9:00",
            "late_clock_ins": 0,
            "early_clock_outs": 0,
            "missing_clock_outs": 1,
            "outlier_days": 1,
            "manual_days": 0,
        }
    ]
    second = client.get(body["next"]).json()
    assert [row["user_id"] for row in second["results"]] == ["2002"]


@pytest.mark.parametrize("url", [TIMESHEET, AUDIT_LOG])
def test_a_limit_past_the_databases_range_is_served_as_the_largest_page(login, client, log, url):
    login("core.view_timesheet", "auditlog.view_logentry")
    response = client.get(
        url, {"start_date": "2026-11-01", "end_date": "2026-11-30", "limit": "9" * 20}
    )
    assert response.status_code == 200
    assert len(response.json()["results"]) == response.json()["count"] >= 1


def test_timesheet_api_filters_by_user_id(login, client, days):
    login("core.view_timesheet")
    response = client.get(
        TIMESHEET, {"start_date": "2026-11-01", "end_date": "2026-11-30", "user_id": "2002"}
    )
    assert [row["user_id"] for row in response.json()["results"]] == ["2002"]


@pytest.mark.parametrize(
    "params, named",
    [
        ({"end_date": "2026-11-30"}, "start_date"),
        ({"start_date": "2026-11-01"}, "end_date"),
        ({"start_date": "2026-11-31", "end_date": "2026-12-01"}, "start_date"),
        ({"start_date": "2026-11-01", "end_date": "yesterday"}, "end_date"),
        ({"start_date": "2026-11-02", "end_date": "2026-11-01"}, "end_date"),
    ],
    ids=["no start", "no end", "impossible date", "not a date", "end before start"],
)
def test_timesheet_api_answers_400_naming_the_bad_parameter(login, client, params, named):
    login("core.view_timesheet")
    response = client.get(TIMESHEET, params)
    assert response.status_code == 400
    assert list(response.json()) == [named]


def test_timesheet_csv_streams_every_row_of_the_period_with_the_jsons_columns_and_values(
    login, client, days
):
    login("core.view_timesheet")
    params = {"start_date": "2026-11-01", "end_date": "2026-11-30"}
    # A page of one row in JSON; the CSV ignores the page and holds the period.
    response = client.get(TIMESHEET, {**params, "limit": 1, "format": "csv"})
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="timesheet_2026-11-01_2026-11-30.csv"' in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))

    api = client.get(TIMESHEET, params).json()["results"]
    assert [list(row) for row in rows] == [list(row) for row in api]
    assert rows == [{key: cell(value) for key, value in row.items()} for row in api]
    assert [row["user_id"] for row in rows] == ["2001", "2002"]


def test_timesheet_csv_through_the_api_neutralises_a_name_a_spreadsheet_would_run(login, client):
    EmployeeFactory(user_id="3001", name="=HYPERLINK(1)")
    make_day("3001", 2)
    login("core.view_timesheet")
    response = client.get(
        TIMESHEET, {"start_date": "2026-11-01", "end_date": "2026-11-30", "format": "csv"}
    )
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0]["name"] == "'=HYPERLINK(1)"
    assert rows[0]["worked"] == "9:00"


def test_timesheet_csv_with_a_bad_date_is_a_400_naming_it(login, client):
    login("core.view_timesheet")
    response = client.get(TIMESHEET, {"start_date": "2026-11-01", "format": "csv"})
    assert response.status_code == 400
    assert not response.streaming
    assert "end_date" in response.content.decode()


def test_timesheet_api_is_read_only(login, client):
    login("core.view_timesheet")
    assert client.post(TIMESHEET, {}).status_code == 405


# --- The audit log in the API ------------------------------------------------------------


@pytest.fixture
def log(django_user_model):
    """Three entries: a device created (by no one), a resend by hr on 2 November,
    a clock set by op on 4 November."""
    hr = django_user_model.objects.create_user("hr")
    op = django_user_model.objects.create_user("op")
    with time_machine.travel(datetime.datetime(2026, 11, 1, 12, tzinfo=UTC), tick=False):
        device = DeviceFactory(name="Dock")
    day = make_day("2001", 2)
    with time_machine.travel(datetime.datetime(2026, 11, 2, 23, 59, tzinfo=UTC), tick=False):
        audit_record(
            actor=hr,
            action="crm_resend",
            model=ProcessedAttendance,
            entries=[AuditEntry.of(day, {"resend_count": [0, 1]})],
        )
    with time_machine.travel(datetime.datetime(2026, 11, 4, 9, tzinfo=UTC), tick=False):
        audit_record(
            actor=op,
            action="device_sync_time",
            model=Device,
            entries=[AuditEntry.of(device, {"clock": [None, "2026-11-04T09:00:00"]})],
        )
    return {"hr": hr, "op": op, "device": device, "day": day}


def test_audit_log_api_refuses_users_without_the_log_permission(login, client, log):
    login("core.view_device", "core.view_processedattendance", "core.view_timesheet")
    assert client.get(AUDIT_LOG).status_code == 403


def test_audit_log_api_refuses_anonymous_requests(client, log):
    response = client.get(AUDIT_LOG)
    assert response.status_code == 401


def test_audit_log_api_lists_entries_newest_first_with_who_what_and_the_changes(login, client, log):
    login("auditlog.view_logentry", staff=False)
    body = client.get(AUDIT_LOG).json()
    assert body["count"] == 3
    newest, middle, oldest = body["results"]
    assert newest["actor"] == "op"
    assert newest["actor_id"] == log["op"].pk
    assert newest["model"] == "core.device"
    assert newest["object_pk"] == str(log["device"].pk)
    assert newest["object_repr"] == "Dock"
    assert newest["action"] == "update"
    assert newest["operation"] == "device_sync_time"
    assert newest["changes"] == {"clock": [None, "2026-11-04T09:00:00"]}
    assert newest["timestamp"].startswith("2026-11-04T09:00:00")
    assert (middle["operation"], middle["model"]) == ("crm_resend", "core.processedattendance")
    assert (oldest["action"], oldest["operation"], oldest["actor"]) == ("create", "", None)


@pytest.mark.parametrize(
    "params, operations",
    [
        ({"actor_username": "hr"}, ["crm_resend"]),
        ({"model": "core.device"}, ["device_sync_time", ""]),
        ({"model": "core.processedattendance"}, ["crm_resend"]),
        ({"action": "create"}, [""]),
        ({"operation": "device_sync_time"}, ["device_sync_time"]),
        ({"start_date": "2026-11-02", "end_date": "2026-11-02"}, ["crm_resend"]),
        ({"start_date": "2026-11-03"}, ["device_sync_time"]),
        ({"end_date": "2026-11-01"}, [""]),
    ],
)
def test_audit_log_api_filters(login, client, log, params, operations):
    login("auditlog.view_logentry")
    results = client.get(AUDIT_LOG, params).json()["results"]
    assert [entry["operation"] for entry in results] == operations


def test_audit_log_api_filters_by_actor_id_and_object(login, client, log):
    login("auditlog.view_logentry")
    by_actor = client.get(AUDIT_LOG, {"actor": log["op"].pk}).json()["results"]
    assert [entry["operation"] for entry in by_actor] == ["device_sync_time"]
    by_object = client.get(
        AUDIT_LOG, {"model": "core.processedattendance", "object_pk": log["day"].pk}
    ).json()["results"]
    assert [entry["operation"] for entry in by_object] == ["crm_resend"]


@pytest.mark.parametrize(
    "params, named",
    [
        ({"model": "core.nothing"}, "model"),
        ({"action": "explode"}, "action"),
        ({"start_date": "2026-13-01"}, "start_date"),
        ({"actor": "op"}, "actor"),
        ({"actor": "1.5"}, "actor"),
        # Past the id column's range: found by the property-based run (a 500 on SQLite).
        ({"actor": "9223372036854775808"}, "actor"),
    ],
)
def test_audit_log_api_answers_400_naming_the_bad_filter(login, client, log, params, named):
    login("auditlog.view_logentry")
    response = client.get(AUDIT_LOG, params)
    assert response.status_code == 400
    assert named in response.json()


def test_audit_log_api_is_read_only(login, client, log):
    login("auditlog.view_logentry")
    assert client.post(AUDIT_LOG, {}).status_code == 405
    assert client.delete(AUDIT_LOG).status_code == 405
    assert LogEntry.objects.count() == 3


# --- The timesheet page in the admin -------------------------------------------------


def timesheet_page(client, **params):
    return client.get(reverse("admin:core_timesheet_changelist"), params)


def test_timesheet_page_sends_anonymous_users_to_the_login(client):
    response = timesheet_page(client)
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_timesheet_page_refuses_staff_without_the_timesheet_permission(login, client, days):
    login("core.view_processedattendance")
    assert timesheet_page(client, start_date="2026-11-01", end_date="2026-11-30").status_code == 403
    index = client.get(reverse("admin:index")).content.decode()
    assert "Timesheets" not in index


def test_timesheet_page_shows_the_period_and_is_linked_from_the_admin_index(login, client, days):
    login("core.view_timesheet")
    index = client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:core_timesheet_changelist") in index

    page = timesheet_page(client, start_date="2026-11-01", end_date="2026-11-30")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Ann Lee" in html and "2002" in html
    assert "Download CSV" in html


def test_timesheet_permission_opens_no_page_of_a_single_day(login, client, days):
    login("core.view_timesheet")
    day = ProcessedAttendance.objects.first()
    assert client.get(f"/admin/core/timesheet/{day.pk}/change/").status_code == 404
    assert client.get(f"/admin/core/processedattendance/{day.pk}/change/").status_code == 403


def test_timesheet_page_opens_on_this_month_in_the_company_zone(login, client, days, settings):
    settings.COMPANY_TIMEZONE = "America/Los_Angeles"
    # 1 December 03:00 UTC is still 30 November, 19:00, in Los Angeles.
    with time_machine.travel(datetime.datetime(2026, 12, 1, 3, tzinfo=UTC), tick=False):
        login("core.view_timesheet")
        page = timesheet_page(client)
    assert page.status_code == 200
    period = page.context["form"].cleaned_data
    assert (period["start_date"], period["end_date"]) == (
        datetime.date(2026, 11, 1),
        datetime.date(2026, 11, 30),
    )
    assert "Ann Lee" in page.content.decode()


def test_timesheet_page_names_a_bad_date_and_shows_no_figures(login, client, days):
    login("core.view_timesheet")
    page = timesheet_page(client, start_date="2026-11-30", end_date="2026-11-01")
    assert page.status_code == 200
    assert "must not be before the start date" in page.content.decode()
    assert page.context["page"] is None


def test_timesheet_csv_download_streams_the_same_rows_as_the_api(login, client, days):
    login("core.view_timesheet")
    params = {"start_date": "2026-11-01", "end_date": "2026-11-30"}
    response = timesheet_page(client, **params, download="csv")
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert "timesheet_2026-11-01_2026-11-30.csv" in response["Content-Disposition"]
    text = b"".join(response.streaming_content).decode()
    rows = list(csv.DictReader(io.StringIO(text)))

    api = client.get(TIMESHEET, params).json()["results"]
    assert [list(row) for row in rows] == [list(row) for row in api]
    assert [row["user_id"] for row in rows] == ["2001", "2002"]
    assert rows[0]["missing_clock_outs"] == "1" and rows[0]["worked"] == "9:00"
    api_csv = client.get(TIMESHEET, {**params, "format": "csv"})
    assert text == b"".join(api_csv.streaming_content).decode()


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_timesheet_csv_download_neutralises_a_name_a_spreadsheet_would_run(login, client, start):
    EmployeeFactory(user_id="3001", name=f"{start}HYPERLINK(1)")
    make_day("3001", 2)
    make_day("3002", 2)  # no employee row: no name
    login("core.view_timesheet")
    response = timesheet_page(
        client, start_date="2026-11-01", end_date="2026-11-30", download="csv"
    )
    text = b"".join(response.streaming_content).decode()
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [row["name"] for row in rows] == [f"'{start}HYPERLINK(1)", ""]
    assert rows[0]["worked"] == "9:00"
