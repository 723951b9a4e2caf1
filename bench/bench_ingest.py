"""Benchmark: polling a 100 000-punch device log into PostgreSQL.

Starts the project's ZK emulator (in a subprocess, so the poll's memory is
measured alone) with 100 000 punches of 500 users and prints, side by side:

  (a) pyzk's own ZK.get_attendance() on that emulator (the baseline);
  (b) the project's poll of the same log into an empty table (download, decode, store);
  (c) a re-poll with nothing new;
  (d) a poll after 1 000 new punches;
  and the peak Python memory of (b), measured in a separate run of (b).

Needs DATABASE_URL pointing at PostgreSQL; uses its own database
(<name>_bench_ingest), created when missing and emptied before each run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/attendance_bridge \
        .venv/bin/python bench/bench_ingest.py [--punches 100000 --users 500]
"""

import argparse
import datetime
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchdb import setup_django  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_emulator(data: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "manage.py", "zk_emulator", "--port", str(port), "--data", str(data)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the emulator exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    sys.exit("the emulator did not start listening within 60 s")


def stop_emulator(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--punches", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--new", type=int, default=1_000)
    args = parser.parse_args()

    setup_django("bench_ingest")
    from django.db import connection
    from zk import ZK

    from core.ingest import device_poll
    from core.models import Device, Employee, RawAttendance
    from core.zk.emulator import DeviceState

    print(f"Generating {args.punches} punches of {args.users} users ...", flush=True)
    state = DeviceState.generate(users=args.users, punches=args.punches, days=250, seed=7)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    before, after = workdir / "log.json", workdir / "log-plus.json"
    state.to_json(before)
    rng = random.Random(7)
    last = max(record.timestamp for record in state.attendance)
    for i in range(args.new):
        user = rng.choice(state.users)
        moment = last + datetime.timedelta(minutes=1 + i)
        state.add_punch(user_id=user.user_id, timestamp=moment, status=1, punch=i % 2)
    state.to_json(after)
    del state

    def reset() -> Device:
        # TRUNCATE, not DELETE: deleted rows leave dead index entries behind that
        # the next run's inserts would wade through; "empty" means empty.
        tables = [model._meta.db_table for model in (RawAttendance, Employee, Device)]
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
        return Device.objects.create(
            name="bench", ip_address="127.0.0.1", port=port, timeout_seconds=120
        )

    port = free_port()
    emulator = start_emulator(before, port)
    try:
        print("(a) pyzk get_attendance ...", flush=True)
        started = time.perf_counter()
        zk = ZK("127.0.0.1", port=port, timeout=120, ommit_ping=True)
        zk.connect()
        baseline_count = len(zk.get_attendance())
        zk.disconnect()
        baseline = time.perf_counter() - started

        print("(b) first poll into an empty table ...", flush=True)
        device = reset()
        started = time.perf_counter()
        first = device_poll(device=device)
        first_seconds = time.perf_counter() - started
        assert first.ok, first.error

        print("(c) re-poll, nothing new ...", flush=True)
        started = time.perf_counter()
        again = device_poll(device=device)
        again_seconds = time.perf_counter() - started
        assert again.ok and again.quick, again

        print("(b') first poll again, with tracemalloc ...", flush=True)
        device = reset()
        tracemalloc.start()
        measured = device_poll(device=device)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert measured.ok, measured.error
    finally:
        stop_emulator(emulator)

    emulator = start_emulator(after, port)
    try:
        print(f"(d) poll after {args.new} new punches ...", flush=True)
        started = time.perf_counter()
        grown = device_poll(device=device)
        grown_seconds = time.perf_counter() - started
        assert grown.ok, grown.error
    finally:
        stop_emulator(emulator)

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        ("(a) pyzk ZK.get_attendance()", baseline, baseline_count, "baseline"),
        ("(b) poll into empty table", first_seconds, first.new, "≤ 0.3 × (a)"),
        ("(c) re-poll, nothing new", again_seconds, again.new, "< 0.05 s"),
        (f"(d) poll after {args.new} new", grown_seconds, grown.new, "≤ (b)"),
    ]
    print()
    print(f"{'step':34} {'seconds':>9} {'punches':>9} {'× (a)':>7}  target")
    for label, seconds, count, target in rows:
        print(f"{label:34} {seconds:9.3f} {count:9d} {seconds / baseline:7.3f}  {target}")
    print()
    print(f"peak Python memory during (b): {peak / 2**20:.1f} MB (target < 300 MB)")
    print(f"peak RSS of this process:      {rss_mb:.1f} MB")
    print(f"(d) downloaded {grown.downloaded}, stored {grown.new} new, skipped {grown.duplicates}")


if __name__ == "__main__":
    main()
