"""The HR status page: the admin's first page (core.status, core.admin_status).

"Now" is frozen at 2026-12-05 20:30 UTC, which in the company's zone
(Pacific/Auckland, UTC+13 in December) is 2026-12-06 09:30: the UTC date and
the company's date differ, so a figure that used the wrong one shows it.
"""

import datetime
import re
import subprocess
import sys
from html import unescape
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from core import status
from core.models import Device, Employee, ProcessedAttendance, PunchDelivery, RawAttendance
from core.processing import attendance_mark_reviewed, attendance_process
from core.tests.factories import DeviceFactory
from core.tests.test_settings import PROJECT

pytestmark = pytest.mark.django_db

ZONE = ZoneInfo("Pacific/Auckland")
NOW = datetime.datetime(2026, 12, 5, 20, 30, tzinfo=datetime.UTC)
TODAY = datetime.date(2026, 12, 6)  # in Auckland
UTC_TODAY = datetime.date(2026, 12, 5)


def local(day: datetime.date, hour: int, minute: int = 0) -> datetime.datetime:
    """A moment on the company's clock, as the aware UTC the database holds."""
    return datetime.datetime.combine(day, datetime.time(hour, minute), tzinfo=ZONE).astimezone(
        datetime.UTC
    )


@pytest.fixture(autouse=True)
def company(settings):
    settings.COMPANY_TIMEZONE = "Pacific/Auckland"
    settings.DEVICE_DEFAULT_TIMEZONE = "Pacific/Auckland"
    settings.MAX_SHIFT_HOURS = 16
    settings.POLL_INTERVAL_MINUTES = 5
    settings.DEVICE_OVERDUE_MINUTES = 15
    settings.CLOCK_DRIFT_ALERT_SECONDS = 300
    settings.DEVICE_LOG_FULL_ALERT_PERCENT = 90
    settings.CRM_PUNCHES_URL = ""
    with time_machine.travel(NOW, tick=False):
        yield


def day(user_id: str, work_date: datetime.date, *punches: datetime.datetime, **fields):
    """A daily record as processing writes it: clock-in the first punch, clock-out the last."""
    values = {
        "user_id": user_id,
        "work_date": work_date,
        "clock_in": punches[0] if punches else None,
        "clock_out": punches[-1] if len(punches) > 1 else None,
        "punch_count": len(punches),
        "worked": punches[-1] - punches[0] if len(punches) > 1 else None,
    }
    values.update(fields)
    return ProcessedAttendance.objects.create(**values)


@pytest.fixture
def admin_client(client, django_user_model):
    user = django_user_model.objects.create_superuser("hr", "hr@example.com", "pw")
    client.force_login(user)
    return client


@pytest.fixture
def staff_client(client, django_user_model):
    """`staff_client("core.view_device", ...)`: logged in as staff with exactly these permissions."""

    def login(*perms: str):
        user = django_user_model.objects.create_user(f"staff{len(perms)}", is_staff=True)
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        client.force_login(user)
        return client

    return login


def index(client) -> str:
    response = client.get(reverse("admin:index"))
    assert response.status_code == 200
    return response.content.decode()


def figures(page: str) -> list[tuple[str, str, int]]:
    """(label, link, number) of every figure on the page."""
    rows = re.findall(
        r'<th scope="row">.*?<a href="([^"]+)">(.*?)</a>.*?</th>\s*'
        r'<td class="figure"><a href="([^"]+)">(\d+)</a></td>',
        page,
        flags=re.S,
    )
    found = []
    for label_link, label, figure_link, number in rows:
        assert unescape(label_link) == unescape(figure_link), label
        found.append((re.sub(r"\s+", " ", label).strip(), unescape(figure_link), int(number)))
    return found


def figure(page: str, label_start: str) -> tuple[str, int]:
    matches = [(link, n) for label, link, n in figures(page) if label.startswith(label_start)]
    assert len(matches) == 1, (label_start, figures(page))
    return matches[0]


def listed(client, link: str) -> set:
    """The primary keys the admin list behind a link shows (all pages of it)."""
    response = client.get(link)
    assert response.status_code == 200, link  # an unknown filter redirects with ?e=1
    return set(response.context["cl"].queryset.values_list("pk", flat=True))


# --- Today: who clocked in, who is still in ---------------------------------------------


@pytest.fixture
def presence_days():
    return {
        # Today in Auckland: in at 08:00 and nothing since: still in.
        "in_once": day("1", TODAY, local(TODAY, 8)),
        # In, out for lunch... and in again: still in.
        "back_from_lunch": day("2", TODAY, local(TODAY, 7), local(TODAY, 8), local(TODAY, 9)),
        # In and out already (a very short morning): clocked in today, not in.
        "gone": day("3", TODAY, local(TODAY, 6), local(TODAY, 9)),
        # The night shift that began yesterday at 22:00 (11.5 h ago): in, not today.
        "night": day(
            "4", TODAY - datetime.timedelta(days=1), local(TODAY - datetime.timedelta(days=1), 22)
        ),
        # Yesterday's day shift, in and out: neither.
        "yesterday": day(
            "5",
            TODAY - datetime.timedelta(days=1),
            local(TODAY - datetime.timedelta(days=1), 8),
            local(TODAY - datetime.timedelta(days=1), 17),
        ),
        # Two days ago, one punch: its shift is long over, so not in.
        "forgot": day(
            "6", TODAY - datetime.timedelta(days=2), local(TODAY - datetime.timedelta(days=2), 8)
        ),
        # A day that lost its punches (sent as a correction): not clocked in.
        "emptied": day("7", TODAY, clock_in=None),
    }


def test_presence_counts_today_in_the_company_zone_and_who_is_still_in(presence_days):
    result = status.status_read(sections={status.PRESENCE})
    assert result.today == TODAY != UTC_TODAY
    assert result.presence == status.Presence(clocked_in=3, still_in=3)


def test_presence_links_list_exactly_the_people_counted(admin_client, presence_days):
    page = index(admin_client)
    link, number = figure(page, "Clocked in today")
    assert number == 3
    assert listed(admin_client, link) == {
        presence_days[k].pk for k in ("in_once", "back_from_lunch", "gone")
    }
    link, number = figure(page, "Still in")
    assert number == 3
    assert listed(admin_client, link) == {
        presence_days[k].pk for k in ("in_once", "back_from_lunch", "night")
    }


def test_presence_follows_processing_of_real_punches(admin_client):
    """Punches through processing: the figures read the rows processing writes."""
    device = DeviceFactory(timezone="Pacific/Auckland")
    for user_id, moments in {
        "10": [local(TODAY, 8, 1)],
        "11": [local(TODAY, 7, 55), local(TODAY, 9, 0)],
        # 19:00 UTC on 5 December is 08:00 on the 6th in Auckland: today's.
        "12": [datetime.datetime(2026, 12, 5, 19, 0, tzinfo=datetime.UTC)],
    }.items():
        for moment in moments:
            RawAttendance.objects.create(device=device, user_id=user_id, timestamp=moment)
    attendance_process()
    page = index(admin_client)
    assert figure(page, "Clocked in today")[1] == 3
    assert figure(page, "Still in")[1] == 2


# --- Days waiting for review --------------------------------------------------------------


@pytest.fixture
def review_days(django_user_model):
    yesterday = TODAY - datetime.timedelta(days=1)
    hr = django_user_model.objects.create_user("reviewer")
    rows = {
        "outlier": day("1", yesterday, local(yesterday, 5), local(yesterday, 17), is_outlier=True),
        "outlier_reviewed": day(
            "2",
            yesterday,
            local(yesterday, 5),
            local(yesterday, 17),
            is_outlier=True,
            reviewed_at=NOW,
            reviewed_by=hr,
        ),
        "missing_clock_out": day(
            "3",
            TODAY - datetime.timedelta(days=3),
            local(TODAY - datetime.timedelta(days=3), 8),
            is_outlier=True,
        ),
        # One punch this morning: the person is at work, nothing to review yet.
        "at_work": day("4", TODAY, local(TODAY, 8), is_outlier=True),
        "newer_punches": day(
            "5",
            TODAY - datetime.timedelta(days=5),
            local(TODAY - datetime.timedelta(days=5), 8),
            local(TODAY - datetime.timedelta(days=5), 17),
            is_manual=True,
            has_newer_punches=True,
        ),
        "fine": day("6", yesterday, local(yesterday, 8), local(yesterday, 17)),
    }
    return rows


def test_review_counts_unreviewed_outliers_missing_clock_outs_and_newer_punches(review_days):
    review = status.status_read(sections={status.REVIEW}).review
    assert review == status.Review(
        outliers=1,
        missing_clock_outs=1,
        newer_punches=1,
        total=3,
        oldest=TODAY - datetime.timedelta(days=5),
    )


def test_review_links_list_exactly_the_days_counted(admin_client, review_days):
    page = index(admin_client)
    expected = {
        "Outliers not reviewed": {"outlier"},
        "Missing clock-outs": {"missing_clock_out"},
        "Edited days with newer punches": {"newer_punches"},
        "All days to review": {"outlier", "missing_clock_out", "newer_punches"},
    }
    for label, keys in expected.items():
        link, number = figure(page, label)
        assert number == len(keys), label
        assert listed(admin_client, link) == {review_days[k].pk for k in keys}, label


def test_marking_days_reviewed_takes_them_off_the_page(review_days, django_user_model):
    hr = django_user_model.objects.get(username="reviewer")
    attendance_mark_reviewed(
        ids=[review_days[k].pk for k in ("outlier", "missing_clock_out", "newer_punches")], user=hr
    )
    review = status.status_read(sections={status.REVIEW}).review
    assert review == status.Review(
        outliers=0, missing_clock_outs=0, newer_punches=0, total=0, oldest=None
    )


# --- Devices ---------------------------------------------------------------------------


def added(name: str, *, minutes_ago: float, **fields):
    """A device added to the bridge this long ago (created_at is set on save, so set it after)."""
    device = DeviceFactory(name=name, **fields)
    Device.objects.filter(pk=device.pk).update(
        created_at=NOW - datetime.timedelta(minutes=minutes_ago)
    )
    return device


@pytest.fixture
def devices():
    recent = NOW - datetime.timedelta(minutes=4)
    return {
        "healthy": DeviceFactory(
            name="Healthy", last_success_at=recent, record_count=10, record_capacity=100
        ),
        "down": DeviceFactory(
            name="Down",
            last_success_at=recent,
            consecutive_failures=2,
            last_error="did not answer within 5 s",
        ),
        # DEVICE_OVERDUE_MINUTES is 15: 15 minutes and a second ago.
        "overdue": DeviceFactory(
            name="Overdue", last_success_at=NOW - datetime.timedelta(minutes=15, seconds=1)
        ),
        "just_in_time": DeviceFactory(
            name="Just in time", last_success_at=NOW - datetime.timedelta(minutes=15)
        ),
        # Never polled: overdue once added longer ago than DEVICE_OVERDUE_MINUTES.
        "never_polled": added("Never polled", minutes_ago=16),
        "just_added": added("Just added", minutes_ago=14),
        "full": DeviceFactory(
            name="Full", last_success_at=recent, record_count=90_000, record_capacity=100_000
        ),
        "nearly_full": DeviceFactory(
            name="Nearly full", last_success_at=recent, record_count=89_999, record_capacity=100_000
        ),
        "fast": DeviceFactory(name="Fast clock", last_success_at=recent, clock_drift_seconds=301),
        "slow": DeviceFactory(name="Slow clock", last_success_at=recent, clock_drift_seconds=-3600),
        "close": DeviceFactory(
            name="Close clock", last_success_at=recent, clock_drift_seconds=-300
        ),
        # Everything wrong, but switched off on purpose: not counted.
        "disabled": DeviceFactory(
            name="Disabled",
            enabled=False,
            consecutive_failures=9,
            record_count=100,
            record_capacity=100,
            clock_drift_seconds=9999,
        ),
    }


def test_device_figures_count_down_overdue_full_and_drifting_enabled_devices(devices):
    health = status.status_read(sections={status.DEVICES}).devices
    assert (health.enabled, health.down, health.overdue, health.log_full, health.drift) == (
        11,
        1,
        2,
        1,
        2,
    )
    problems = {alert.name: alert.problems for alert in health.alerts}
    assert problems == {
        "Down": ["last poll failed"],
        "Overdue": ["overdue"],
        "Never polled": ["overdue"],
        "Full": ["log nearly full"],
        "Fast clock": ["clock drifting"],
        "Slow clock": ["clock drifting"],
    }


def test_device_links_list_exactly_the_devices_counted(admin_client, devices):
    page = index(admin_client)
    expected = {
        "Enabled": set(devices) - {"disabled"},
        "Down": {"down"},
        "Overdue": {"overdue", "never_polled"},
        "Log nearly full": {"full"},
        "Clock drifting": {"fast", "slow"},
    }
    for label, keys in expected.items():
        link, number = figure(page, label)
        assert number == len(keys), label
        assert listed(admin_client, link) == {devices[k].pk for k in keys}, label
    assert "did not answer" not in page  # the list says what is wrong, the device page why
    assert "clock 60 minutes behind" in page
    assert "clock 5 minutes ahead" in page
    assert reverse("admin:core_device_change", args=[devices["full"].pk]) in page


def test_the_status_page_and_health_count_the_same_overdue_devices(admin_client, settings):
    # Three poll intervals would be 15 minutes; the operator asked for 40.
    settings.DEVICE_OVERDUE_MINUTES = 40
    minutes = datetime.timedelta(minutes=1)
    expected = {
        added("Stale", minutes_ago=600, last_success_at=NOW - 41 * minutes),
        added("Never polled, added long ago", minutes_ago=41),
    }
    added("Late but within 40 minutes", minutes_ago=600, last_success_at=NOW - 39 * minutes)
    added("Never polled, added recently", minutes_ago=39)
    added("Just added", minutes_ago=0)
    added("Switched off", minutes_ago=600, enabled=False, last_success_at=NOW - 600 * minutes)

    page = index(admin_client)
    link, number = figure(page, "Overdue for a successful poll")
    assert number == len(expected)
    assert "(over 40 min)" in page
    assert listed(admin_client, link) == {device.pk for device in expected}
    detail = admin_client.get("/health/").json()["checks"]["devices"]["detail"]
    assert detail == (
        "2 device(s) without a successful poll for more than 40 minutes: "
        "Never polled, added long ago, Stale"
    )


def test_the_log_alert_follows_its_setting(devices, settings):
    settings.DEVICE_LOG_FULL_ALERT_PERCENT = 10
    health = status.status_read(sections={status.DEVICES}).devices
    assert {a.name for a in health.alerts if "log nearly full" in a.problems} == {
        "Healthy",
        "Full",
        "Nearly full",
    }


# --- The CRM backlog ---------------------------------------------------------------------


@pytest.fixture
def deliveries():
    yesterday = TODAY - datetime.timedelta(days=1)
    rows = {}
    for n, state in enumerate(["pending", "pending", "failed", "rejected", "synced", "synced"]):
        rows[f"{state}{n}"] = day(
            str(100 + n), yesterday, local(yesterday, 8), local(yesterday, 17), sync_state=state
        )
    # The longest waiting: updated_at is set on save, so set it after.
    ProcessedAttendance.objects.filter(pk=rows["failed2"].pk).update(
        updated_at=NOW - datetime.timedelta(hours=30)
    )
    return rows


def test_backlog_counts_undelivered_days_and_names_the_oldest(deliveries):
    backlog = status.status_read(sections={status.BACKLOG}).backlog
    assert (backlog.undelivered, backlog.pending, backlog.failed, backlog.rejected) == (3, 2, 1, 1)
    assert backlog.oldest["user_id"] == "102"


def test_backlog_links_list_exactly_the_days_counted(admin_client, deliveries):
    page = index(admin_client)
    expected = {
        "Days not delivered yet": {"pending0", "pending1", "failed2"},
        "of which failed": {"failed2"},
        "Days the CRM rejected": {"rejected3"},
    }
    for label, keys in expected.items():
        link, number = figure(page, label)
        assert number == len(keys), label
        assert listed(admin_client, link) == {deliveries[k].pk for k in keys}, label
    oldest = re.search(r'<a href="([^"]+)">Oldest undelivered: 102 on 5 Dec 2026, waiting 1', page)
    assert oldest, page
    assert listed(admin_client, unescape(oldest.group(1))) == {deliveries["failed2"].pk}


def test_the_punch_backlog_shows_only_when_punches_are_exported(admin_client, settings):
    device = DeviceFactory(name="Gate")
    punches = [
        RawAttendance.objects.create(device=device, user_id="9", timestamp=local(TODAY, 7, n))
        for n in range(5)
    ]
    for punch, state in zip(
        punches, ["pending", "failed", "held", "rejected", "synced"], strict=True
    ):
        PunchDelivery.objects.create(raw=punch, sync_state=state)
    PunchDelivery.objects.filter(raw=punches[1]).update(created_at=NOW - datetime.timedelta(days=2))
    assert "Raw punches not delivered" not in index(admin_client)

    settings.CRM_PUNCHES_URL = "http://127.0.0.1:9/punches"
    page = index(admin_client)
    expected = {
        "Raw punches not delivered yet": {0, 1},
        "Raw punches held back": {2},
        "Raw punches the CRM rejected": {3},
    }
    for label, indexes in expected.items():
        link, number = figure(page, label)
        assert number == len(indexes), label
        assert listed(admin_client, link) == {punches[i].pk for i in indexes}, label
    oldest = re.search(r'<a href="([^"]+)">Oldest undelivered punch: 9 on Gate, waiting 2', page)
    assert oldest, page
    assert listed(admin_client, unescape(oldest.group(1))) == {punches[1].pk}


# --- Punches per hour ------------------------------------------------------------------


@pytest.fixture
def hourly_punches():
    device = DeviceFactory(name="Hall")
    moments = (
        # Today in Auckland: three at 08:0x and one at 09:05, all on 5 December in UTC.
        [local(TODAY, 8, m) for m in (1, 2, 3)]
        + [local(TODAY, 9, 5)]
        # The last seven days: 14 punches at 08:xx spread over them, 7 at 17:xx.
        + [local(TODAY - datetime.timedelta(days=d), 8, m) for d in range(1, 8) for m in (10, 20)]
        + [local(TODAY - datetime.timedelta(days=d), 17, 30) for d in range(1, 8)]
        # Eight days ago: outside the average.
        + [local(TODAY - datetime.timedelta(days=8), 8, m) for m in range(30)]
    )
    for n, moment in enumerate(moments):
        RawAttendance.objects.create(device=device, user_id=str(n), timestamp=moment)
    return moments


def test_punches_per_hour_compares_today_with_the_last_seven_days(hourly_punches):
    chart = status.status_read(sections={status.PUNCHES_PER_HOUR}).punches_per_hour
    by_hour = {bar.hour: (bar.today, bar.average) for bar in chart.bars}
    assert [bar.hour for bar in chart.bars] == list(range(24))
    assert by_hour[8] == (3, 2.0)
    assert by_hour[9] == (1, 0.0)
    assert by_hour[17] == (0, 1.0)
    assert sum(today for today, _ in by_hour.values()) == chart.total_today == 4
    assert chart.average_day == 3.0
    assert chart.bars[8].start == local(TODAY, 8)


def test_each_hour_of_the_chart_links_to_its_punches(admin_client, hourly_punches):
    page = index(admin_client)
    bars = re.findall(
        r'<a href="([^"]+)">\s*<title>(\d\d):00: (\d+) today, ([\d.]+) on average</title>', page
    )
    assert len(bars) == 24
    for link, hour, today, _average in bars:
        assert len(listed(admin_client, unescape(link))) == int(today), hour
    assert ("08", "3", "2.0") in [(h, t, a) for _, h, t, a in bars]
    link, number = figure(page, "Today so far")
    assert number == 4
    assert len(listed(admin_client, link)) == 4


def test_the_hour_a_clock_repeats_when_dst_ends_is_one_bar_with_both_hours(admin_client, settings):
    """Lisbon falls back from 02:00 WEST to 01:00 WET on 25 October 2026."""
    settings.COMPANY_TIMEZONE = "Europe/Lisbon"
    device = DeviceFactory(name="Lisbon")
    first = datetime.datetime(2026, 10, 25, 0, 30, tzinfo=datetime.UTC)  # 01:30 WEST
    second = datetime.datetime(2026, 10, 25, 1, 30, tzinfo=datetime.UTC)  # 01:30 WET
    later = datetime.datetime(2026, 10, 25, 2, 30, tzinfo=datetime.UTC)  # 02:30 WET
    for n, moment in enumerate([first, second, later]):
        RawAttendance.objects.create(device=device, user_id=str(n), timestamp=moment)
    with time_machine.travel(datetime.datetime(2026, 10, 25, 12, tzinfo=datetime.UTC), tick=False):
        chart = status.status_read(sections={status.PUNCHES_PER_HOUR}).punches_per_hour
        page = index(admin_client)
    assert (chart.bars[1].today, chart.bars[2].today, chart.total_today) == (2, 1, 3)
    bars = dict(
        (hour, unescape(link))
        for link, hour in re.findall(r'<a href="([^"]+)">\s*<title>(\d\d):00:', page)
    )
    assert len(listed(admin_client, bars["01"])) == 2
    assert len(listed(admin_client, bars["02"])) == 1


# --- Who sees what ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("perms", "shown"),
    [
        ((), set()),
        (("core.view_device",), {"hr-devices"}),
        (("core.view_processedattendance",), {"hr-presence", "hr-review", "hr-backlog"}),
        (("core.change_processedattendance",), {"hr-presence", "hr-review", "hr-backlog"}),
        (("core.view_rawattendance",), {"hr-punches-per-hour"}),
    ],
)
def test_a_user_sees_only_the_panels_of_models_they_may_view(staff_client, perms, shown):
    DeviceFactory(name="Door", consecutive_failures=1)
    page = index(staff_client(*perms))
    panels = {
        "hr-presence",
        "hr-review",
        "hr-devices",
        "hr-backlog",
        "hr-punches-per-hour",
    }
    assert {p for p in panels if f'id="{p}"' in page} == shown
    if "hr-devices" not in shown:
        assert "Door" not in page


def test_a_view_only_user_follows_the_links_and_sees_the_same_rows(staff_client, review_days):
    client = staff_client("core.view_processedattendance")
    link, number = figure(index(client), "All days to review")
    assert len(listed(client, link)) == number == 3


def test_panels_a_user_may_not_see_cost_no_query(staff_client):
    client = staff_client("core.view_device")
    index(client)  # the session and permissions cached as on any later page
    with CaptureQueriesContext(connection) as queries:
        index(client)
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    assert "core_device" in sql
    assert "core_processedattendance" not in sql
    assert "core_rawattendance" not in sql


def test_unknown_sections_are_refused():
    with pytest.raises(ValueError, match="unknown status sections: weather"):
        status.status_read(sections={"weather"})


# --- A handful of queries, whatever the number of employees ---------------------------------


def populate(employees: int, offset: int = 0) -> None:
    devices = [DeviceFactory(last_success_at=NOW) for _ in range(3)]
    yesterday = TODAY - datetime.timedelta(days=1)
    days, punches = [], []
    for n in range(offset, offset + employees):
        user_id = str(5000 + n)
        device = devices[n % 3]
        Employee.objects.create(user_id=user_id, name=f"Person {n}")
        days.append(
            ProcessedAttendance(
                user_id=user_id,
                work_date=TODAY,
                clock_in=local(TODAY, 8),
                punch_count=1,
                clock_in_device=device,
                sync_state="pending",
            )
        )
        days.append(
            ProcessedAttendance(
                user_id=user_id,
                work_date=yesterday,
                clock_in=local(yesterday, 5),
                clock_out=local(yesterday, 17),
                punch_count=2,
                is_outlier=n % 2 == 0,
                sync_state="failed" if n % 5 == 0 else "synced",
            )
        )
        punches += [
            RawAttendance(device=device, user_id=user_id, timestamp=local(TODAY, 8)),
            RawAttendance(device=device, user_id=user_id, timestamp=local(yesterday, 5)),
            RawAttendance(device=device, user_id=user_id, timestamp=local(yesterday, 17)),
        ]
    ProcessedAttendance.objects.bulk_create(days)
    RawAttendance.objects.bulk_create(punches)
    PunchDelivery.objects.bulk_create(
        PunchDelivery(raw=p) for p in RawAttendance.objects.filter(delivery__isnull=True)
    )


def index_queries(client) -> int:
    with CaptureQueriesContext(connection) as queries:
        index(client)
    return len(queries.captured_queries)


def test_the_page_costs_a_handful_of_queries_whatever_the_number_of_employees(
    admin_client, settings, django_assert_max_num_queries
):
    settings.CRM_PUNCHES_URL = "http://127.0.0.1:9/punches"
    populate(5)
    few = index_queries(admin_client)
    populate(400, offset=5)
    with django_assert_max_num_queries(few):
        page = index(admin_client)
    assert figure(page, "Clocked in today")[1] == 405
    assert figure(page, "Outliers not reviewed")[1] == 203
    # Session and user, then presence and review (1), devices (1), two backlogs
    # (3 each), the chart (1), and the admin's recent actions (1).
    assert few <= 12


# --- The rest of the admin keeps working ----------------------------------------------------


def test_the_page_still_lists_the_models_for_a_superuser(admin_client):
    page = index(admin_client)
    assert "hr-status" in page
    assert reverse("admin:core_device_changelist") in page
    assert reverse("admin:auth_user_changelist") in page


def test_an_unknown_filter_value_leaves_the_list_whole(admin_client, review_days):
    response = admin_client.get(reverse("admin:core_processedattendance_changelist") + "?review=x")
    assert response.status_code == 200
    assert response.context["cl"].result_count == len(review_days)


# --- Settings --------------------------------------------------------------------------------


def load(script: str, **env) -> subprocess.CompletedProcess:
    environment = {"SECRET_KEY": "x", "PATH": "/usr/bin:/bin", "VAR_DIR": "/tmp/ab-settings-test"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", f"from attendance_bridge import settings as s; {script}"],
        cwd=PROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_company_zone_defaults_to_the_device_zone_and_is_checked():
    shown = "print(s.COMPANY_TIMEZONE)"
    assert load(shown, DEVICE_DEFAULT_TIMEZONE="Europe/Lisbon").stdout.strip() == "Europe/Lisbon"
    assert (
        load(shown, COMPANY_TIMEZONE="", DEVICE_DEFAULT_TIMEZONE="Asia/Tokyo").stdout.strip()
        == "Asia/Tokyo"
    )
    assert load(shown, COMPANY_TIMEZONE="America/Chicago").stdout.strip() == "America/Chicago"
    bad = load(shown, COMPANY_TIMEZONE="Lisbon")
    assert "COMPANY_TIMEZONE must be an IANA time zone name" in bad.stderr


@pytest.mark.parametrize("value", ["0", "101", "most"])
def test_a_bad_log_alert_percent_stops_start_up(value):
    result = load("", DEVICE_LOG_FULL_ALERT_PERCENT=value)
    assert "ImproperlyConfigured" in result.stderr
    assert "DEVICE_LOG_FULL_ALERT_PERCENT" in result.stderr
