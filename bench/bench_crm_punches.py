"""Benchmark: the first registration of raw punches for the CRM export.

A bridge that has stored years of punches before CRM_PUNCHES_URL is set (and
no CRM_SYNC_FROM) registers all of them at its first sync_to_crm run. This
loads that many punches (default 1 000 000, four devices) and times that
registration, printing the punches registered, the seconds, the peak Python
memory of the run, and the peak private memory of the PostgreSQL backend
doing the work (sampled from /proc every 10 ms; "n/a" when PostgreSQL runs
elsewhere or /proc is not readable).

Needs DATABASE_URL pointing at PostgreSQL; uses its own database
(<name>_bench_crm_punches), emptied before each run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/attendance_bridge \\
        .venv/bin/python bench/bench_crm_punches.py [--punches 1000000]
"""

import argparse
import threading
import time
import tracemalloc
from pathlib import Path

from benchdb import setup_django  # bench/ is on sys.path when run as a script


def load(punches: int) -> None:
    from django.db import connection

    from core.models import Device, ProcessingState, PunchDelivery, RawAttendance

    PunchDelivery.objects.all().delete()
    RawAttendance.objects.all().delete()
    ProcessingState.objects.all().delete()
    Device.objects.all().delete()
    devices = [
        Device.objects.create(name=f"Door {n}", ip_address=f"127.0.0.{n + 1}") for n in range(4)
    ]
    first = min(device.pk for device in devices)
    with connection.cursor() as cursor:
        # Straight SQL: loading a million punches through the ORM would take longer
        # than what is measured.
        cursor.execute(
            "INSERT INTO core_rawattendance (device_id, user_id, timestamp, status, "
            "punch_state, verify_type, is_suspect, suspect_reason, suspect_override_by, "
            "received_at) "
            "SELECT %s + n %% 4, (1000 + n %% 500)::text, "
            "TIMESTAMPTZ '2020-01-01' + n * INTERVAL '1 minute', 1, n %% 2, 1, false, '', '', "
            "now() - INTERVAL '1 day' FROM generate_series(1, %s) AS n",
            [first, punches],
        )
        cursor.execute("VACUUM ANALYZE core_rawattendance")


def backend_peak_kib(pid: int, stop: threading.Event, peak: list[int]) -> None:
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        except OSError:
            peak[0] = -1
            return
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--punches", type=int, default=1_000_000)
    args = parser.parse_args()
    setup_django("bench_crm_punches")
    from django.db import connection

    from core.crm import _punches_register
    from core.models import PunchDelivery

    load(args.punches)
    # A backend of its own: the load's VACUUM leaves memory behind in this one.
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    peak = [0]
    stop = threading.Event()
    sampler = threading.Thread(target=backend_peak_kib, args=(pid, stop, peak))
    sampler.start()
    tracemalloc.start()
    started = time.perf_counter()
    registered = _punches_register(sync_from=None)
    seconds = time.perf_counter() - started
    _, python_peak = tracemalloc.get_traced_memory()
    stop.set()
    sampler.join()
    assert registered == args.punches == PunchDelivery.objects.count(), registered
    backend = "n/a" if peak[0] <= 0 else f"{peak[0] / 1024:.0f} MiB"
    print(
        f"first registration of {registered} punches: {seconds:.1f} s "
        f"({registered / seconds:,.0f} punches/s); peak Python memory "
        f"{python_peak / 2**20:.1f} MiB; PostgreSQL backend peak private memory {backend}"
    )


if __name__ == "__main__":
    main()
