"""End to end with two real Celery workers and beat on Redis and PostgreSQL: an
emulated device where people punch, the fake CRM, and nobody touching
anything. Beat's poll finds the punches; the chain (poll → process → deliver)
takes them to the CRM as raw punches and as daily records.

Runs when E2E_BROKER_URL names a Redis database this test may empty
(.ci/run sets it); skipped otherwise. Bounded: fails after E2E_TIMEOUT_SECONDS
(120 s), and the worker and beat are always stopped.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.db import connection

from core.models import Device
from core.zk.emulator import DeviceState

PROJECT = Path(__file__).resolve().parents[2]
BROKER = os.environ.get("E2E_BROKER_URL", "")
TIMEOUT = float(os.environ.get("E2E_TIMEOUT_SECONDS", "120"))
TOKEN = "e2e-token"
LIVE_PUNCHES = 3

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not BROKER, reason="set E2E_BROKER_URL (a Redis database) to run"),
    pytest.mark.django_db(transaction=True),
]


def database_url() -> str:
    db = connection.settings_dict
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "attendance_bridge", *args],
        cwd=PROJECT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        # Its own process group: stopping it stops the worker's children too.
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return f"--- {path.name} ---\n" + "\n".join(text[-lines:])


def test_live_punches_reach_the_fake_crm_with_a_real_worker_and_beat(
    zk_emulator, fake_crm, tmp_path
):
    assert connection.vendor == "postgresql", "the end-to-end test runs on PostgreSQL"
    import redis

    redis.Redis.from_url(BROKER).flushdb()  # no message of an earlier run
    state = DeviceState.generate(users=4, punches=12, days=2, seed=21)
    emu = zk_emulator(state)
    crm = fake_crm(token=TOKEN)
    device = Device.objects.create(
        name="E2E door", ip_address=emu.host, port=emu.port, timezone="UTC", timeout_seconds=5
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SECRET_KEY": "e2e-only",
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": BROKER,
        "VAR_DIR": str(tmp_path),
        "DEVICE_DEFAULT_TIMEZONE": "UTC",
        # Beat polls every 6 s; processing and delivery are scheduled only
        # hourly, so what reaches the CRM within the bound came by the chain.
        "POLL_INTERVAL_MINUTES": "0.1",
        "PROCESS_INTERVAL_MINUTES": "60",
        "SYNC_INTERVAL_MINUTES": "60",
        "CRM_API_URL": crm.url,
        "CRM_PUNCHES_URL": crm.punches_url,
        "CRM_API_TOKEN": TOKEN,
        "CRM_API_TOKEN_FILE": "",
        "CRM_SIGNING_SECRET": "",
        "CRM_SYNC_FROM": "",
        "LOG_LEVEL": "INFO",
    }
    worker_logs = [tmp_path / "worker1.log", tmp_path / "worker2.log"]
    beat_log = tmp_path / "beat.log"
    processes = []
    stop_punching = threading.Event()
    live = []

    def punch() -> None:
        # People punch every 2 s while the bridge runs, whoever listens.
        for user in ("1001", "1002", "1003")[:LIVE_PUNCHES]:
            if stop_punching.wait(2):
                return
            live.append(emu.push_punch(user))

    def stopped_from_outside(signum, frame):
        # CI's last-resort `timeout` sends SIGTERM: unwind, so `finally` stops
        # the worker and beat (they run in their own process groups).
        raise SystemExit(f"stopped by signal {signum}")

    previous_handler = signal.signal(signal.SIGTERM, stopped_from_outside)

    def logs() -> str:
        return "\n".join(tail(path) for path in [*worker_logs, beat_log])

    puncher = threading.Thread(target=punch, daemon=True)
    started = time.monotonic()
    try:
        # Two workers, as on two machines: they share only Redis and PostgreSQL.
        for index, log in enumerate(worker_logs, start=1):
            processes.append(
                start(
                    [
                        "worker",
                        "--hostname",
                        f"e2e{index}@%h",
                        "--concurrency",
                        "1",
                        "--without-gossip",
                        "--without-mingle",
                        "--loglevel",
                        "INFO",
                    ],
                    env,
                    log,
                )
            )
        processes.append(
            start(["beat", "--schedule", str(tmp_path / "beat-schedule")], env, beat_log)
        )
        puncher.start()
        arrived = False
        while time.monotonic() - started < TIMEOUT:
            for process in processes:
                assert process.poll() is None, "a Celery process died\n" + logs()
            if len(live) == LIVE_PUNCHES and _all_arrived(crm, device, live):
                arrived = True
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        assert arrived, (
            f"after {elapsed:.0f} s the fake CRM holds {len(crm.punches())} punches and "
            f"{len(crm.held())} daily records, not yet every live punch\n" + logs()
        )
    finally:
        stop_punching.set()
        puncher.join(timeout=5)
        for process in processes:
            stop(process)
        signal.signal(signal.SIGTERM, previous_handler)
    # Every punch of the device, history and live, went once.
    assert len(crm.punches()) == 12 + LIVE_PUNCHES
    assert crm.state.stats.punches_duplicated == 0
    print(f"E2E: {LIVE_PUNCHES} live punches reached the fake CRM in {elapsed:.1f} s")


def _all_arrived(crm, device, live) -> bool:
    punches = crm.punches()
    held = crm.held()
    for record in live:
        moment = record.timestamp.isoformat()
        found = any(key[1] == record.user_id and key[2].startswith(moment[:19]) for key in punches)
        if not found:
            return False
        if f"{record.user_id}:{record.timestamp.date().isoformat()}" not in held:
            return False
    return True
