"""Benchmark: daily processing of 1 000 000 raw punches in PostgreSQL.

Loads 2 000 employees × 250 days × 2 punches (a tenth of them night workers,
22:00 → 06:00; some clocking in on one door and out on another; two zones) and
prints, side by side, in the order they run:

  (a) a full run into an empty table: a first load (target < 20 s);
  (b) the next run, nothing new: having no run older than the late-commit
      margin to bound ids by, it scans the whole table for late commits;
  (c) an incremental run after one new day, 4 000 punches (target < 0.5 s),
      an hour after (b), with the run history of a bridge in service;
  (d) the next run, nothing new;
  (e) a full run again, nothing to change;
  (g) a full run after every stored day was made to differ: 500 000 new
      versions, and the versions they replace kept for the pull feed;
  (f) a naive loop (one query per employee-day, update_or_create) over a
      10 000-punch subset, scaled to 1 000 000 punches; measured in this run,
      inside a transaction that is rolled back.

Needs DATABASE_URL pointing at PostgreSQL; uses its own database
(<name>_bench_processing), created when missing and emptied before each run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/attendance_bridge \\
        .venv/bin/python bench/bench_processing.py [--employees 2000 --days 250]
"""

import argparse
import datetime
import gc
import random
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from benchdb import setup_django  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent

UTC = datetime.UTC


def local(day: datetime.date, minutes: int, zone: ZoneInfo) -> datetime.datetime:
    moment = datetime.datetime.combine(day, datetime.time(), tzinfo=zone)
    return (moment + datetime.timedelta(minutes=minutes)).astimezone(UTC)


def punches_for(employee: dict, day: datetime.date, rng: random.Random) -> list[tuple]:
    """The two punches of one employee on one day: (device_id, user_id, utc, received_at)."""
    if employee["night"]:
        start = 22 * 60 + int(rng.gauss(0, 15))
        end = start + 8 * 60 + int(rng.gauss(0, 20))
    else:
        start = 8 * 60 + int(rng.gauss(0, 20))
        if rng.random() < 0.02:
            start -= 170  # an early bird, flagged
        end = 17 * 60 + int(rng.gauss(0, 30))
    devices = employee["devices"]
    rows = []
    for minutes in (start, end):
        moment = local(day, minutes, employee["zone"])
        received = moment + datetime.timedelta(minutes=rng.randint(1, 5))  # polled every 5 min
        rows.append((rng.choice(devices), employee["user_id"], moment, received))
    return rows


def copy_punches(rows: list[tuple]) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        with cursor.cursor.copy(
            "COPY core_rawattendance (device_id, user_id, timestamp, status, punch_state,"
            " verify_type, is_suspect, suspect_reason, received_at) FROM STDIN"
        ) as copy:
            for device_id, user_id, moment, received in rows:
                copy.write_row((device_id, user_id, moment, 1, 0, 1, False, "", received))


def naive_loop(employees: list[dict], days: list[datetime.date]) -> tuple[float, int]:
    """One query per employee-day and update_or_create: the loop this stage replaces."""
    from django.db import transaction

    from core.models import ProcessedAttendance, RawAttendance

    punches = 0
    started = time.perf_counter()
    with transaction.atomic():
        for employee in employees:
            for day in days:
                since = local(day, 0, employee["zone"])
                found = list(
                    RawAttendance.objects.filter(
                        user_id=employee["user_id"],
                        timestamp__gte=since,
                        timestamp__lt=since + datetime.timedelta(days=1),
                    ).order_by("timestamp")
                )
                if not found:
                    continue
                punches += len(found)
                first, last = found[0], found[-1]
                clock_out = last.timestamp if len(found) > 1 else None
                ProcessedAttendance.objects.update_or_create(
                    user_id=employee["user_id"],
                    work_date=day,
                    defaults={
                        "clock_in": first.timestamp,
                        "clock_out": clock_out,
                        "clock_in_device_id": first.device_id,
                        "clock_out_device_id": last.device_id if clock_out else None,
                        "punch_count": len(found),
                        "worked": clock_out - first.timestamp if clock_out else None,
                    },
                )
        transaction.set_rollback(True)
    return time.perf_counter() - started, punches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--employees", type=int, default=2000)
    parser.add_argument("--days", type=int, default=250)
    parser.add_argument("--subset", type=int, default=10_000, help="punches for the naive loop")
    args = parser.parse_args()

    setup_django("bench_processing")
    import time_machine
    from django.db import connection

    from core.models import Device, Employee, ProcessedAttendance
    from core.processing import attendance_process

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE core_rawattendance, core_processedattendance, core_processingstate,"
            " core_processedattendanceversion,"
            " core_employee_devices, core_employee, core_device RESTART IDENTITY CASCADE"
        )

    rng = random.Random(2026)
    lisbon, madrid = ZoneInfo("Europe/Lisbon"), ZoneInfo("Europe/Madrid")
    doors = [
        Device.objects.create(name=name, ip_address="127.0.0.1", timezone=zone)
        for name, zone in [
            ("Lisbon front", "Europe/Lisbon"),
            ("Lisbon back", "Europe/Lisbon"),
            ("Lisbon warehouse", "Europe/Lisbon"),
            ("Madrid", "Europe/Madrid"),
        ]
    ]
    employees = []
    for number in range(args.employees):
        in_madrid = number % 10 == 9
        night = number % 10 == 3
        employees.append(
            {
                "user_id": str(10000 + number),
                "night": night,
                "zone": madrid if in_madrid else lisbon,
                # Most use one door; some come in by one and leave by another.
                "devices": [doors[3].pk]
                if in_madrid
                else [doors[number % 3].pk] * 4 + [doors[(number + 1) % 3].pk],
            }
        )
    Employee.objects.bulk_create(
        [
            Employee(
                user_id=e["user_id"],
                name=f"Employee {e['user_id']}",
                work_start_time=datetime.time(22) if e["night"] else None,
                work_end_time=datetime.time(6) if e["night"] else None,
            )
            for e in employees
        ]
    )
    today = datetime.date.today()
    days = [today - datetime.timedelta(days=args.days + 2 - n) for n in range(args.days)]
    new_day = today - datetime.timedelta(days=2)

    started = time.perf_counter()
    rows = [p for day in days for e in employees for p in punches_for(e, day, rng)]
    copy_punches(rows)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE core_rawattendance")
    load_seconds = time.perf_counter() - started
    total = len(rows)
    # Let go of the generated million before measuring: Python's full garbage
    # collections walk every live object, and a bridge in service holds none of these.
    del rows
    gc.collect()
    print(
        f"Loaded {total:,} punches ({args.employees:,} employees, {args.days} days) "
        f"in {load_seconds:.1f} s",
        flush=True,
    )

    subset_size = max(1, args.subset // (2 * args.days))
    print(f"(f) naive loop over {subset_size} employees ...", flush=True)
    naive_seconds, naive_punches = naive_loop(employees[:subset_size], days)

    now = datetime.datetime.now(UTC)
    results = {}

    def run(label: str, hours_ago: int = 0, **kwargs) -> None:
        # The first two runs happen hours ago, so that the later ones have the run
        # history of a bridge in service. Those run at the real time: time-machine's
        # patched clock adds a tenth of a second to a run.
        print(f"{label} ...", flush=True)
        if hours_ago:
            with time_machine.travel(now - datetime.timedelta(hours=hours_ago), tick=True):
                results[label] = attendance_process(**kwargs)
        else:
            results[label] = attendance_process(**kwargs)

    run("(a) full run, empty table", hours_ago=2, full=True)
    run("(b) next run, nothing new", hours_ago=1)
    new_rows = [p for e in employees for p in punches_for(e, new_day, rng)]
    copy_punches(new_rows)
    run(f"(c) incremental, one new day ({len(new_rows):,})")
    run("(d) next run, nothing new")
    run("(e) full run, nothing to change", full=True)
    # Every stored day made to differ from its punches (not timed), so that the
    # next full run writes a new version of each: the path that also copies the
    # versions it replaces into the pull feed's history.
    with connection.cursor() as cursor:
        cursor.execute("UPDATE core_processedattendance SET punch_count = punch_count + 1")
        cursor.execute("VACUUM ANALYZE core_processedattendance")
    run("(g) full run, every day changed", full=True)
    rows_stored = ProcessedAttendance.objects.count()

    targets = {"(a)": "< 20 s", "(c)": "< 0.5 s"}
    print()
    print(
        f"{'step':44} {'seconds':>8} {'punches/s':>10} {'groups':>7} {'created':>8} "
        f"{'changed':>8} {'outliers':>8}  target"
    )
    for label, result in results.items():
        punches = result.punches_read or result.new_punches
        rate = f"{punches / result.seconds:10,.0f}" if punches else f"{'—':>10}"
        print(
            f"{label:44} {result.seconds:8.2f} {rate} {result.groups_recomputed:7,} "
            f"{result.rows_created:8,} {result.rows_changed:8,} {result.outliers:8,}  "
            f"{targets.get(label[:3], '')}"
        )
    scaled = naive_seconds * total / naive_punches
    print(
        f"{'(f) naive loop, ' + f'{naive_punches:,} punches':44} {naive_seconds:8.2f} "
        f"{naive_punches / naive_seconds:10,.0f}  → scaled to {total:,} punches: "
        f"{scaled:,.0f} s ({scaled / results['(a) full run, empty table'].seconds:.0f}× (a))"
    )
    print()
    print(f"{rows_stored:,} daily rows stored; load {load_seconds:.1f} s (COPY).")


if __name__ == "__main__":
    main()
