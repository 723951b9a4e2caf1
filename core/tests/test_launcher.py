"""The launcher: everything it starts stops with it (real processes, bounded)."""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from core.launcher import Launcher

PROJECT = Path(__file__).resolve().parents[2]

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_for(condition, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@needs_proc
def test_when_one_child_exits_the_launcher_stops_the_others_and_returns_its_code():
    launcher = Launcher(out=io.StringIO(), stop_timeout=10)
    survivor = launcher.start("sleeper", ["sleep", "60"])
    launcher.start("failing", ["sh", "-c", "echo going; exit 3"])
    assert launcher.run_until_stopped() == 3
    assert survivor.process.returncode == -signal.SIGTERM
    assert group_members(survivor.pgid) == []
    assert "failing | going" in launcher.out.getvalue()


@needs_proc
def test_a_child_that_ignores_the_stop_signal_is_killed_with_what_it_started():
    launcher = Launcher(out=io.StringIO(), stop_timeout=1)
    # The shell ignores SIGTERM and has a grandchild of its own.
    stubborn = launcher.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 60 & wait; wait"])
    wait_for(lambda: len(group_members(stubborn.pgid)) == 2, timeout=10, what="the grandchild")
    started = time.monotonic()
    launcher.stop()
    assert time.monotonic() - started < 10
    assert stubborn.process.returncode == -signal.SIGKILL
    assert group_members(stubborn.pgid) == []
    assert "did not stop within 1 s; killing it" in launcher.out.getvalue()


def get(url: str, **headers) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@needs_proc
def test_start_demo_serves_the_admin_runs_worker_and_beat_and_ctrl_c_stops_everything(
    tmp_path,
):
    """The README's first command, on the embedded defaults: web (gunicorn and
    WhiteNoise), worker and beat (the heartbeat goes through both), the emulated
    clock and the fake CRM registered; SIGINT, as Ctrl-C sends it, stops every
    process it started, grandchildren included."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
        "VAR_DIR": str(tmp_path / "var"),
        "SECRET_KEY": "launcher-test",
        "METRICS_TOKEN": "scrape",
        "HEARTBEAT_INTERVAL_SECONDS": "5",
        "WEB_CONCURRENCY": "1",
        "WORKER_CONCURRENCY": "1",
        "PYTHONUNBUFFERED": "1",
    }
    launcher = subprocess.Popen(
        [sys.executable, "manage.py", "launch", "--demo", "--port", str(port)],
        cwd=PROJECT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,
    )
    output: list[str] = []
    children: dict[str, int] = {}
    reader = threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: any("Attendance Bridge is running" in line for line in output),
            timeout=240,
            what="the launcher's banner",
        )
        text = "".join(output)
        assert re.search(r"Password: \S{12,}", text)
        assert f"{base}/admin/" in text
        children.update(
            (name, int(pid)) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", text)
        )
        assert set(children) == {"device", "crm", "web", "worker", "beat"}

        status, kind, body = get(f"{base}/static/admin/css/base.css")
        assert (status, kind.split(";")[0]) == (200, "text/css")
        status, _, _ = get(f"{base}/admin/login/")
        assert status == 200

        # Beat queues the heartbeat, a worker runs it: /health/ turns 200.
        wait_for(lambda: get(f"{base}/health/")[0] == 200, timeout=120, what="a heartbeat")
        checks = json.loads(get(f"{base}/health/")[2])["checks"]
        assert checks["heartbeat"]["ok"] and checks["broker"]["ok"]

        status, _, metrics = get(f"{base}/metrics", Authorization="Bearer scrape")
        assert status == 200
        assert 'attendance_bridge_device_enabled{device="Demo clock"} 1.0' in metrics.decode()
        device_port = int(re.search(r"emulated clock at 127\.0\.0\.1:(\d+)", text).group(1))
        with socket.create_connection(("127.0.0.1", device_port), timeout=5):
            pass
    finally:
        launcher.send_signal(signal.SIGINT)
        try:
            code = launcher.wait(timeout=90)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    assert code == 0, "".join(output[-40:])
    reader.join(timeout=5)
    leftovers = {name: group_members(pid) for name, pid in children.items()}
    assert leftovers == {name: [] for name in children}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert any("stopped" in line for line in output[-5:])


def test_a_worker_does_not_start_on_a_database_without_its_migrations(tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
        "VAR_DIR": str(tmp_path / "var"),
        "SECRET_KEY": "worker-test",
        "MIGRATIONS_WAIT_SECONDS": "0",
    }
    done = subprocess.run(
        [str(PROJECT / "start_worker.sh")],
        cwd=PROJECT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "unapplied migrations after 0 s" in done.stderr
    assert "start_server.sh applies them" in done.stderr
    assert "celery@" not in done.stdout + done.stderr
