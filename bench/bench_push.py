"""Benchmark: the push receiver (/iclock/) served by gunicorn on PostgreSQL,
fed by emulated pushing clocks (core.zk.emulator.PushClock) over loopback HTTP.

Prints, side by side:

  (a) backlog: one clock uploads a --backlog-punch log from stamp 0 in
      firmware-sized batches (adaptive, up to 150 records), handshake to last
      acknowledgement: punches/s end to end; beside it the baseline, a poll of
      the same log over the binary protocol (ZKEmulator + core.ingest.device_poll).
      Target: at least 10 000 punches/s.
  (b) fleet: --clocks pushing clocks for --seconds, each polling getrequest
      every Delay (10 s, its heartbeat) and someone punching every
      --live-interval s (uploaded at once, Realtime=1): requests/s, p50 and
      p99 latency as the clocks measure them, and punches stored against
      punches made. Target: none lost, none doubled, p99 under 300 ms.

gunicorn runs as start_server.sh runs it (sync workers, --workers), on a
loopback port, against the benchmark's own database <DATABASE_URL's name>_bench_push
(emptied first). The fleet's clocks run in --client-processes processes so
that the measuring side is not one Python interpreter's GIL. Bounded: every
phase has a time limit, and gunicorn and the clocks are always stopped.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ab_pushemu \\
        .venv/bin/python bench/bench_push.py --port 18910
"""

import argparse
import datetime
import logging
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18910, help="loopback port for gunicorn")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument("--backlog", type=int, default=100_000, help="punches in the backlog")
    parser.add_argument("--clocks", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0, help="fleet run time")
    parser.add_argument("--delay", type=int, default=10, help="Delay: seconds between polls")
    parser.add_argument("--live-interval", type=float, default=2.0)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--skip-backlog", action="store_true")
    parser.add_argument("--skip-fleet", action="store_true")
    return parser.parse_args()


ARGS = parse()
sys.path.insert(0, str(ROOT / "bench"))
from benchdb import setup_django  # noqa: E402  (bench/ is on sys.path)

setup_django("bench_push")

from django.db import connection  # noqa: E402
from django.db.models import Count  # noqa: E402

from core.ingest import device_poll  # noqa: E402
from core.models import (  # noqa: E402
    Device,
    DeviceCommand,
    Employee,
    PushRejectedLine,
    RawAttendance,
)
from core.zk.emulator import DeviceState, PushClock, ZKEmulator  # noqa: E402

URL = f"http://127.0.0.1:{ARGS.port}"


def empty_database() -> None:
    for model in (RawAttendance, PushRejectedLine, DeviceCommand, Employee, Device):
        model.objects.all().delete()


def start_gunicorn() -> subprocess.Popen:
    env = {
        **os.environ,
        "ADMS_DELAY_SECONDS": str(ARGS.delay),
        "ADMS_ERROR_DELAY_SECONDS": "5",
        "ADMS_AUTO_APPROVE": "false",
        "LOG_LEVEL": "WARNING",
    }
    command = [
        str(Path(sys.executable).parent / "gunicorn"),
        "attendance_bridge.wsgi:application",
        "--bind",
        f"127.0.0.1:{ARGS.port}",
        "--workers",
        str(ARGS.workers),
        "--timeout",
        "60",
        "--no-control-socket",
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{URL}/health/", timeout=2):
                return server
        except urllib.error.HTTPError:
            return server  # answering (unhealthy only because no worker runs here)
        except OSError:
            if server.poll() is not None:
                sys.exit(f"gunicorn exited with {server.returncode}; is port {ARGS.port} free?")
            time.sleep(0.2)
    stop(server)
    sys.exit("gunicorn did not answer /health/ within 30 s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)


def pushing_device(serial: str) -> Device:
    return Device.objects.create(
        name=f"Push {serial}",
        serial_number=serial,
        timezone="UTC",
        first_seen_at=datetime.datetime.now(datetime.UTC),
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- (a) the backlog -------------------------------------------------------------------


def backlog() -> tuple[str, str]:
    state = DeviceState.generate(users=300, punches=ARGS.backlog, days=120, seed=7)
    unique = len({(r.user_id, r.timestamp) for r in state.attendance})
    state.serial_number = "BENCHPUSH"
    device = pushing_device(state.serial_number)
    clock = PushClock(state, URL, timeout=60)
    started = time.monotonic()
    if not clock.handshake():
        raise SystemExit("the handshake was refused")
    # As the clock's own loop does after a handshake, timed from here.
    complete = clock.upload_log()
    seconds = time.monotonic() - started
    stored = RawAttendance.objects.filter(device=device).count()
    uploads = [s for kind, s in clock.stats.latencies if kind == "upload"]
    push = (
        f"push  {ARGS.backlog} punches in {len(uploads)} uploads of <= 150: {seconds:.1f} s, "
        f"{ARGS.backlog / seconds:,.0f} punches/s; upload p50 {statistics.median(uploads) * 1000:.0f} ms, "
        f"p99 {percentile(uploads, 0.99) * 1000:.0f} ms; stored {stored} of {unique} distinct"
        + ("" if complete else " (INCOMPLETE)")
    )

    # The baseline: the same log polled over the binary protocol, in this process.
    state.serial_number = "BENCHPOLL"
    with ZKEmulator(state, host="127.0.0.1", port=0) as emulator:
        polled = Device.objects.create(
            name="Poll BENCHPOLL",
            ip_address="127.0.0.1",
            port=emulator.port,
            timezone="UTC",
        )
        started = time.monotonic()
        result = device_poll(device=polled)
        seconds = time.monotonic() - started
    stored = RawAttendance.objects.filter(device=polled).count()
    poll = (
        f"poll  {ARGS.backlog} punches over TCP (one download): {seconds:.1f} s, "
        f"{ARGS.backlog / seconds:,.0f} punches/s; stored {stored} of {unique} distinct"
        + (f" (error: {result.error})" if result.error else "")
    )
    return push, poll


# --- (b) the fleet ---------------------------------------------------------------------


def run_clocks(serials: list[str], seconds: float, live_interval: float, queue) -> None:
    """In a child process: pushing clocks for `seconds`, then until they have
    uploaded everything (at most 30 s more). Puts their figures on `queue`."""
    clocks = []
    for index, serial in enumerate(serials):
        state = DeviceState.generate(users=20, punches=0, days=1, seed=index + 1)
        state.serial_number = serial
        clocks.append(PushClock(state, URL, live_interval=live_interval, seed=index, timeout=30))
    started = time.monotonic()
    for clock in clocks:
        clock.start()
        time.sleep(live_interval / len(clocks))  # real clocks are not in step
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    for clock in clocks:
        clock.stop_punching()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(c.caught_up() for c in clocks):
        time.sleep(0.2)
    for clock in clocks:
        clock.stop()
    queue.put(
        {
            "made": {c.serial: len(c.state.attendance) for c in clocks},
            "acknowledged": sum(c.stats.punches_acknowledged for c in clocks),
            "requests": sum(c.stats.requests for c in clocks),
            "failures": sum(c.stats.failures for c in clocks),
            "latencies": [item for c in clocks for item in c.stats.latencies],
            "elapsed": time.monotonic() - started,
        }
    )


def fleet() -> list[str]:
    serials = [f"FLEET{i:04d}" for i in range(ARGS.clocks)]
    for serial in serials:
        pushing_device(serial)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    groups = [serials[i :: ARGS.client_processes] for i in range(ARGS.client_processes)]
    connection.close()  # not shared with the children
    children = [
        context.Process(target=run_clocks, args=(group, ARGS.seconds, ARGS.live_interval, queue))
        for group in groups
        if group
    ]
    for child in children:
        child.start()
    results = [queue.get(timeout=ARGS.seconds + 120) for _ in children]
    for child in children:
        child.join(10)
    made = {serial: n for r in results for serial, n in r["made"].items()}
    latencies = [s for r in results for _, s in r["latencies"]]
    by_kind: dict[str, list[float]] = {}
    for r in results:
        for kind, s in r["latencies"]:
            by_kind.setdefault(kind, []).append(s)
    requests = sum(r["requests"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    stored = dict(
        RawAttendance.objects.filter(device__serial_number__in=serials)
        .values_list("device__serial_number")
        .annotate(n=Count("id"))
    )
    sent = sum(made.values())
    total_stored = sum(stored.values())
    lost = sum(max(0, made[s] - stored.get(s, 0)) for s in serials)
    extra = sum(max(0, stored.get(s, 0) - made[s]) for s in serials)
    lines = [
        f"fleet {ARGS.clocks} clocks, {ARGS.seconds:.0f} s (+ catch-up), poll every "
        f"{ARGS.delay} s, a punch every {ARGS.live_interval} s each: {requests} requests in "
        f"{elapsed:.1f} s = {requests / elapsed:.1f} requests/s, "
        f"{sum(r['failures'] for r in results)} failed",
        f"      latency all: p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.0f} ms",
    ]
    for kind, values in sorted(by_kind.items()):
        lines.append(
            f"      {kind:9} n={len(values):6}: p50 {statistics.median(values) * 1000:.1f} ms, "
            f"p99 {percentile(values, 0.99) * 1000:.1f} ms"
        )
    lines.append(
        f"      punches made {sent}, acknowledged {sum(r['acknowledged'] for r in results)}, "
        f"stored {total_stored}: lost {lost}, doubled {extra}"
    )
    return lines


def main() -> None:
    # The per-request lines of the emulator and the poll would drown the figures.
    for name in ("core.zk.emulator", "core.ingest", "core.adms"):
        logging.getLogger(name).setLevel(logging.WARNING)
    empty_database()
    server = start_gunicorn()
    try:
        print(
            f"gunicorn {ARGS.workers} sync workers on {URL}, PostgreSQL "
            f"{connection.settings_dict['NAME']}",
            flush=True,
        )
        if not ARGS.skip_backlog:
            push, poll = backlog()
            print("(a) backlog", flush=True)
            print("    " + push)
            print("    " + poll + "   <- baseline", flush=True)
        if not ARGS.skip_fleet:
            print("(b) " + "\n".join(fleet()), flush=True)
    finally:
        stop(server)


if __name__ == "__main__":
    main()
