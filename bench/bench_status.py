"""Benchmark: the HR status page (the admin's first page) over a year of data.

Loads 2 000 employees × 250 days × 2 punches (1 000 000 punches) on 4
devices, processes them into 500 000 days (with outliers, a few days edited
by HR, a delivery backlog), then prints, side by side:

  (a) core.status.status_read() with every section: its queries and time;
  (b) the whole admin index page for a superuser, rendered by the test
      client: its queries and time;
  (c) a naive page: the same presence and review figures read one employee
      at a time (two queries per employee), as a template looping over
      employees would; measured in this run.

Needs DATABASE_URL pointing at PostgreSQL; uses its own database
(<name>_bench_status), created when missing and emptied before each run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/attendance_bridge \\
        .venv/bin/python bench/bench_status.py [--employees 2000 --days 250]
"""

import argparse
import datetime
import random
import time
from zoneinfo import ZoneInfo

from benchdb import setup_django  # bench/ is on sys.path when run as a script

UTC = datetime.UTC
ZONE = ZoneInfo("Europe/Lisbon")
REPEATS = 5


def local(day: datetime.date, minutes: int) -> datetime.datetime:
    moment = datetime.datetime.combine(day, datetime.time(), tzinfo=ZONE)
    return (moment + datetime.timedelta(minutes=minutes)).astimezone(UTC)


def copy_punches(rows) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        with cursor.cursor.copy(
            "COPY core_rawattendance (device_id, user_id, timestamp, status, punch_state,"
            " verify_type, is_suspect, suspect_reason, received_at) FROM STDIN"
        ) as copy:
            for device_id, user_id, moment in rows:
                copy.write_row((device_id, user_id, moment, 1, 0, 1, False, "", moment))


def timed(function) -> tuple[float, int]:
    """The best of REPEATS runs, in seconds, and the queries of one run."""
    from django.db import connection

    queries = 0

    def count(execute, sql, params, many, context):
        nonlocal queries
        queries += 1
        return execute(sql, params, many, context)

    best = float("inf")
    for _ in range(REPEATS):
        queries = 0
        with connection.execute_wrapper(count):
            started = time.perf_counter()
            function()
            best = min(best, time.perf_counter() - started)
    return best, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--employees", type=int, default=2000)
    parser.add_argument("--days", type=int, default=250)
    args = parser.parse_args()

    setup_django("bench_status")
    import time_machine

    # Midday in the company's zone, so that "today" has punches.
    noon = datetime.datetime.combine(datetime.date.today(), datetime.time(12, 30), tzinfo=ZONE)
    with time_machine.travel(noon, tick=True):
        run(args)


def run(args) -> None:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from core import status
    from core.models import Device, Employee, ProcessedAttendance
    from core.processing import attendance_process

    settings.COMPANY_TIMEZONE = "Europe/Lisbon"
    settings.ALLOWED_HOSTS = ["testserver"]
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE core_rawattendance, core_processedattendance, core_processingstate,"
            " core_employee_devices, core_employee, core_device, auth_user"
            " RESTART IDENTITY CASCADE"
        )

    rng = random.Random(2026)
    now = timezone.now()
    doors = [
        Device.objects.create(
            name=f"Door {n}",
            ip_address="127.0.0.1",
            timezone="Europe/Lisbon",
            last_success_at=now - datetime.timedelta(minutes=2 if n else 300),
            consecutive_failures=0 if n else 4,
            record_count=40_000 * (n + 1),
            record_capacity=200_000,
        )
        for n in range(4)
    ]
    users = [str(10000 + n) for n in range(args.employees)]
    Employee.objects.bulk_create([Employee(user_id=u, name=f"Employee {u}") for u in users])
    today = now.astimezone(ZONE).date()
    days = [today - datetime.timedelta(days=args.days - 1 - n) for n in range(args.days)]
    started = time.perf_counter()

    def punches():
        for day in days:
            for number, user_id in enumerate(users):
                door = doors[number % 4].pk
                start = 8 * 60 + int(rng.gauss(0, 20)) - (170 if rng.random() < 0.02 else 0)
                moment = local(day, start)
                if moment <= now:
                    yield door, user_id, moment
                end = local(day, 17 * 60 + int(rng.gauss(0, 30)))
                if end <= now and rng.random() > 0.01:  # a forgotten clock-out now and then
                    yield door, user_id, end

    copy_punches(punches())
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE core_rawattendance")
    result = attendance_process(full=True)
    # Most days delivered; the last two days' not yet.
    ProcessedAttendance.objects.filter(work_date__lt=today - datetime.timedelta(days=1)).update(
        sync_state="synced", synced_version=1
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE core_processedattendance")
    print(
        f"Loaded and processed {result.punches_read:,} punches into "
        f"{ProcessedAttendance.objects.count():,} days ({args.employees:,} employees, "
        f"{args.days} days) in {time.perf_counter() - started:.1f} s",
        flush=True,
    )

    admin = get_user_model().objects.create_superuser("bench", "bench@example.com", "x")
    client = Client()
    client.force_login(admin)

    def page():
        response = client.get("/admin/")
        assert response.status_code == 200, response.status_code

    def naive():
        figures = {"clocked_in": 0, "to_review": 0}
        for user_id in users:
            rows = ProcessedAttendance.objects.filter(user_id=user_id)
            figures["clocked_in"] += rows.filter(work_date=today).exists()
            figures["to_review"] += rows.filter(is_outlier=True, reviewed_at__isnull=True).count()
        return figures

    read_seconds, read_queries = timed(status.status_read)
    page_seconds, page_queries = timed(page)
    naive_seconds, naive_queries = timed(naive)
    figures = status.status_read()
    print(
        f"today: {figures.presence.clocked_in:,} clocked in, {figures.presence.still_in:,} in; "
        f"review: {figures.review.total:,}; backlog: {figures.backlog.undelivered:,}"
    )
    print(f"{'':44} {'queries':>8} {'best of ' + str(REPEATS):>12}")
    print(f"{'(a) status_read(), every section':44} {read_queries:>8} {read_seconds:>11.3f}s")
    print(f"{'(b) the admin index page':44} {page_queries:>8} {page_seconds:>11.3f}s")
    print(
        f"{'(c) naive: presence and review per employee':44} {naive_queries:>8} "
        f"{naive_seconds:>11.3f}s"
    )


if __name__ == "__main__":
    main()
