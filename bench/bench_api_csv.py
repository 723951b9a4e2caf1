"""Benchmark: the API's CSV export of raw punches against rendering them as one JSON list.

Prints, side by side:

  (a) GET /api/raw-attendance/?format=csv for every punch, read to the end as
      a client would: rows per second, and in a second run the peak memory
      Python allocated while serving it (tracemalloc);
  (b) the baseline: the same rows through the same serializer, rendered as
      one JSON document in memory, as an export without streaming would.

The export streams, so its peak memory stays flat whatever the row count,
where the baseline's grows with it. Needs DATABASE_URL pointing at
PostgreSQL; uses its own database (<name>_bench_api), filled once.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/attendance_bridge \\
        .venv/bin/python bench/bench_api_csv.py [--punches 100000]
"""

import argparse
import datetime
import time
import tracemalloc

from benchdb import setup_django  # bench/ is on sys.path when run as a script

UTC = datetime.UTC


def fill(count: int) -> None:
    from django.db import connection

    from core.ingest import punches_store
    from core.models import Device, RawAttendance

    device, _ = Device.objects.get_or_create(
        name="Bench door", defaults={"ip_address": "127.0.0.1", "timezone": "Europe/Lisbon"}
    )
    have = RawAttendance.objects.filter(device=device).count()
    if have < count:
        start = datetime.datetime(2025, 1, 1, tzinfo=UTC)
        rows = [
            (str(1000 + n % 300), start + datetime.timedelta(minutes=n), 1, n % 2, 1, False, "")
            for n in range(have, count)
        ]
        punches_store(device=device, rows=rows, received_at=start)
    # Fresh statistics, as a table in use has: without them the first export's
    # plan is a guess.
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {RawAttendance._meta.db_table}")


def measure(label: str, work) -> None:
    """Times one run, then measures the peak memory of a second: tracemalloc
    slows Python several times over, so it is off while timing."""
    started = time.perf_counter()
    rows = work()
    seconds = time.perf_counter() - started
    tracemalloc.start()
    work()
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rate = rows / seconds
    print(f"{label:<44} {rows:>7} rows {rate:>7,.0f} rows/s  peak {peak / 2**20:6.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--punches", type=int, default=100_000)
    args = parser.parse_args()
    setup_django("bench_api")

    from django.contrib.auth.models import User
    from django.test.utils import setup_test_environment
    from rest_framework.renderers import JSONRenderer
    from rest_framework.test import APIClient

    from core.api.serializers import RawAttendanceSerializer
    from core.models import RawAttendance

    setup_test_environment()
    fill(args.punches)
    user, _ = User.objects.get_or_create(username="bench", defaults={"is_superuser": True})
    client = APIClient()
    client.force_authenticate(user)

    def export() -> int:
        answer = client.get("/api/raw-attendance/", {"format": "csv"})
        lines = 0
        for chunk in answer.streaming_content:
            lines += chunk.count(b"\n")
        return lines - 1  # the header

    def baseline() -> int:
        rows = RawAttendance.objects.select_related("device").order_by("-timestamp", "-id")
        data = RawAttendanceSerializer(rows, many=True).data
        JSONRenderer().render(data)
        return len(data)

    print(f"{args.punches} punches on PostgreSQL")
    measure("(a) CSV export, streamed (?format=csv)", export)
    measure("(b) baseline: one JSON document in memory", baseline)


if __name__ == "__main__":
    main()
