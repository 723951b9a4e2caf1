"""Benchmark: a fleet of emulated devices polled through the fan-out by real
Celery workers, and the time a punch takes from a device to the CRM.

The fleet (in-process ZKEmulator instances on free loopback ports): healthy
devices, dead ones (nothing listens: connection refused), slow ones (every
reply delayed --delay-ms) and hanging ones (stop answering mid-transfer,
keeping the connection open, until the device timeout ends the read). Two
`celery worker` processes (thread pool, --concurrency threads each) consume
every queue from Redis; the fake CRM runs in this process.

Prints, side by side:

  (a) the cycle time: poll_all_devices queued → every device polled (its
      last_poll_at past the start, its lease given back);
  (b) the baseline: the sum of the single-device times, one device of each
      kind polled alone in this run (its time × the number of that kind);
  (c) punch → CRM: after the first cycle's punches are delivered, someone
      punches on a healthy device and the next cycle is queued at once (a
      beat tick); the time until the fake CRM holds the raw punch, and the
      daily record it makes.

Needs DATABASE_URL pointing at PostgreSQL (uses <name>_bench_fleet, emptied
first) and a Redis database it may empty (--broker). Bounded by --bound seconds;
the workers and emulators are always stopped.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/attendance_bridge \\
        .venv/bin/python bench/bench_fleet.py --broker redis://127.0.0.1:6379/7
"""

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--dead", type=int, default=20)
    parser.add_argument("--slow", type=int, default=20)
    parser.add_argument("--hanging", type=int, default=10)
    parser.add_argument("--delay-ms", type=int, default=100, help="reply delay of a slow device")
    parser.add_argument("--timeout", type=int, default=3, help="device timeout, seconds")
    parser.add_argument("--punches", type=int, default=50, help="punches per device")
    parser.add_argument("--concurrency", type=int, default=24, help="threads per worker")
    parser.add_argument("--broker", required=True, help="a Redis URL this run may empty")
    parser.add_argument("--bound", type=float, default=300, help="give up after this many s")
    args = parser.parse_args()
    if args.dead + args.slow + args.hanging > args.devices:
        parser.error("--dead + --slow + --hanging must not exceed --devices")
    return args


ARGS = parse()
os.environ["CELERY_BROKER_URL"] = ARGS.broker
# The worker's follow-ups must reach the fake CRM; set before Django starts.
sys.path.insert(0, str(ROOT / "bench"))
from benchdb import setup_django  # noqa: E402  (bench/ is on sys.path)

setup_django("bench_fleet")

import redis  # noqa: E402
from django.db.models import Q  # noqa: E402
from django.utils import timezone  # noqa: E402

from core import ingest  # noqa: E402
from core.fake_crm import FakeCrm  # noqa: E402
from core.models import (  # noqa: E402
    DeliveryLog,
    Device,
    Employee,
    ProcessedAttendance,
    ProcessingState,
    PunchDelivery,
    RawAttendance,
    RunRequest,
)
from core.tasks import poll_all_devices  # noqa: E402
from core.zk.emulator import DeviceState, ZKEmulator  # noqa: E402

TOKEN = "bench-token"
STARTED = time.monotonic()


def left() -> float:
    return ARGS.bound - (time.monotonic() - STARTED)


def wait_for(what: str, done, *, step: float = 0.1) -> float:
    """Seconds until done() is true; exits when the bound is reached."""
    start = time.monotonic()
    while not done():
        if left() <= 0:
            raise TimeoutError(f"gave up after {ARGS.bound:.0f} s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def emulator(kind: str, seed: int) -> ZKEmulator:
    state = DeviceState.generate(users=5, punches=ARGS.punches, days=3, seed=seed)
    state.serial_number = f"FLEET{seed:04d}"
    options = {}
    if kind == "slow":
        options["delay_ms"] = ARGS.delay_ms
    elif kind == "hanging":
        # Past the handshake and counts, inside the user list or the log.
        options["stall_after_bytes"] = 600
    return ZKEmulator(state, host="127.0.0.1", port=0, **options).start()


def kinds() -> list[str]:
    healthy = ARGS.devices - ARGS.dead - ARGS.slow - ARGS.hanging
    return (
        ["dead"] * ARGS.dead
        + ["slow"] * ARGS.slow
        + ["hanging"] * ARGS.hanging
        + ["healthy"] * healthy
    )


def empty_tables() -> None:
    for model in (
        PunchDelivery,
        ProcessedAttendance,
        RawAttendance,
        DeliveryLog,
        RunRequest,
        ProcessingState,
    ):
        model.objects.all().delete()
    Employee.devices.through.objects.all().delete()
    Employee.objects.all().delete()
    Device.objects.all().delete()


def register(kind: str, seed: int, emu: ZKEmulator | None) -> Device:
    return Device.objects.create(
        name=f"{kind} {seed}",
        ip_address="127.0.0.1",
        port=emu.port if emu else free_port(),
        timezone="UTC",
        timeout_seconds=ARGS.timeout,
    )


def single_times(running: list[ZKEmulator]) -> dict[str, float]:
    """One device of each kind polled alone, in this process: its poll time."""
    times = {}
    for index, kind in enumerate(("healthy", "slow", "hanging", "dead")):
        emu = None if kind == "dead" else emulator(kind, 9000 + index)
        if emu:
            running.append(emu)
        device = register(f"single {kind}", 9000 + index, emu)
        started = time.monotonic()
        ingest.device_poll(device=device)
        times[kind] = time.monotonic() - started
        RawAttendance.objects.filter(device=device).delete()
        Employee.devices.through.objects.filter(device=device).delete()
        device.delete()
    return times


def start_worker(index: int, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "attendance_bridge",
            "worker",
            "--hostname",
            f"fleet{index}@%h",
            "--queues",
            "devices,processing,crm",
            "--pool",
            "threads",
            "--concurrency",
            str(ARGS.concurrency),
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def cycle(devices: list[int]) -> float:
    """Queues poll_all_devices and waits until every device was polled."""
    since = timezone.now()
    poll_all_devices.delay()
    return wait_for(
        "a poll cycle",
        lambda: (
            not Device.objects.filter(pk__in=devices)
            .filter(
                Q(last_poll_at__isnull=True)
                | Q(last_poll_at__lt=since)
                | Q(poll_lease_until__isnull=False)
            )
            .exists()
        ),
    )


def stopped_from_outside(signum, frame):
    # Unwind on SIGTERM too, so `finally` stops the workers (own process groups).
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, stopped_from_outside)
    # Each hanging device logs its stall with a traceback; the figures are what counts here.
    logging.getLogger("core.zk.emulator").setLevel(logging.CRITICAL)
    broker = redis.Redis.from_url(ARGS.broker)
    broker.flushdb()
    empty_tables()
    crm = FakeCrm(host="127.0.0.1", port=0, token=TOKEN).start()
    running: list[ZKEmulator] = []
    workers: list[subprocess.Popen] = []
    logs = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        singles = single_times(running)
        fleet = []
        healthy = []
        for seed, kind in enumerate(kinds()):
            emu = None if kind == "dead" else emulator(kind, seed)
            if emu:
                running.append(emu)
            device = register(kind, seed, emu)
            fleet.append(device.pk)
            if kind == "healthy":
                healthy.append((device, emu))
        counts = {kind: kinds().count(kind) for kind in ("healthy", "slow", "hanging", "dead")}
        baseline = sum(singles[kind] * count for kind, count in counts.items())

        env = {
            **os.environ,
            "VAR_DIR": str(logs),
            "CRM_API_URL": crm.url,
            "CRM_PUNCHES_URL": crm.punches_url,
            "CRM_API_TOKEN": TOKEN,
            "CRM_API_TOKEN_FILE": "",
            "CRM_SIGNING_SECRET": "",
            "CRM_SYNC_FROM": "",
            "PYTHONUNBUFFERED": "1",
        }
        for index in range(2):
            workers.append(start_worker(index, env, logs / f"worker{index}.log"))
        time.sleep(3)  # let both workers connect before the first cycle
        for worker in workers:
            if worker.poll() is not None:
                sys.exit(f"a worker died at start; see {logs}")

        first = cycle(fleet)
        punches_total = RawAttendance.objects.count()
        settle = wait_for(
            "the first cycle's punches and days to reach the CRM",
            lambda: (
                RawAttendance.objects.count() == len(crm.punches())
                and not ProcessedAttendance.objects.exclude(
                    sync_state=ProcessedAttendance.SyncState.SYNCED
                ).exists()
            ),
            step=0.5,
        )

        device, emu = healthy[0]
        record = emu.push_punch("99999")
        since = timezone.now()
        poll_all_devices.delay()
        key_day = f"99999:{record.timestamp.date().isoformat()}"
        to_punch = wait_for(
            "the new punch at the CRM",
            lambda: any(key[1] == "99999" for key in crm.punches()),
            step=0.05,
        )
        to_day = wait_for("its daily record at the CRM", lambda: key_day in crm.held(), step=0.05)
        to_day += to_punch
        wait_for(
            "the second cycle",
            lambda: (
                not Device.objects.filter(pk__in=fleet)
                .filter(Q(last_poll_at__lt=since) | Q(poll_lease_until__isnull=False))
                .exists()
            ),
        )

        failed = Device.objects.filter(pk__in=fleet, consecutive_failures__gt=0).count()
        print(
            f"fleet: {ARGS.devices} devices ({counts['healthy']} healthy, {counts['slow']} slow "
            f"at {ARGS.delay_ms} ms a reply, {counts['hanging']} hanging mid-transfer, "
            f"{counts['dead']} dead), device timeout {ARGS.timeout} s, {ARGS.punches} punches "
            f"each; 2 workers × {ARGS.concurrency} threads"
        )
        print(
            "single-device poll times: "
            + ", ".join(f"{kind} {seconds:.2f} s" for kind, seconds in singles.items())
        )
        print(f"(a) cycle time, first cycle (full downloads): {first:6.2f} s")
        print(f"(b) sum of single-device times:              {baseline:6.2f} s")
        print(f"    slowest single device:                    {max(singles.values()):6.2f} s")
        print(f"    devices failed in the cycle: {failed}; punches stored: {punches_total}")
        print(f"    first cycle's punches and days at the CRM {settle:.1f} s after the cycle")
        print(f"(c) punch → CRM, raw punch:    {to_punch:6.2f} s (next cycle queued at once)")
        print(f"    punch → CRM, daily record: {to_day:6.2f} s")
    finally:
        for worker in workers:
            stop(worker)
        for emu in running:
            emu.stop()
        crm.stop()
        broker.flushdb()
        print(f"worker logs: {logs}")


if __name__ == "__main__":
    main()
