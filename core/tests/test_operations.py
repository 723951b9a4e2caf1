"""Operations: /health/, /metrics, the heartbeat, the log lines and formats, progress."""

import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from django.test import override_settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from core import crm, health, ingest
from core.demo import ADMIN_USERNAME, DEVICE_NAME, demo_prepare
from core.management.progress import Progress
from core.models import Device, Heartbeat, ProcessedAttendance
from core.processing import attendance_process
from core.tasks import heartbeat
from core.tests.factories import DeviceFactory, RawAttendanceFactory
from core.tests.test_settings import load_settings

PROJECT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def healthy(settings, tmp_path):
    """Everything /health/ checks is fine: a filesystem broker, a fresh heartbeat."""
    queue = tmp_path / "queue"
    queue.mkdir()
    settings.CELERY_BROKER_URL = "filesystem://"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
    }
    heartbeat()
    return settings


# --- /health/ ---------------------------------------------------------------------------


def test_health_is_200_without_a_login_when_every_check_passes(client, healthy):
    DeviceFactory(last_success_at=timezone.now())
    response = client.get("/health/")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["failing"] == []
    assert set(body["checks"]) == {"database", "broker", "cache", "heartbeat", "devices"}


def test_health_is_503_naming_a_missing_heartbeat(client, healthy):
    Heartbeat.objects.all().delete()
    response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["heartbeat"]
    assert "no heartbeat yet" in body["checks"]["heartbeat"]["detail"]


def test_health_is_503_when_the_heartbeat_is_older_than_five_intervals(client, healthy):
    healthy.HEARTBEAT_INTERVAL_SECONDS = 60
    health.heartbeat_record(at=timezone.now() - datetime.timedelta(seconds=301))
    body = client.get("/health/").json()
    assert body["failing"] == ["heartbeat"]
    health.heartbeat_record(at=timezone.now() - datetime.timedelta(seconds=290))
    assert client.get("/health/").status_code == 200


def test_health_is_503_naming_a_device_overdue_for_a_successful_poll(client, healthy):
    healthy.DEVICE_OVERDUE_MINUTES = 15
    now = timezone.now()
    DeviceFactory(name="Fresh", last_success_at=now - datetime.timedelta(minutes=14))
    DeviceFactory(name="Stale", last_success_at=now - datetime.timedelta(minutes=16))
    DeviceFactory(name="Off", enabled=False, last_success_at=now - datetime.timedelta(days=3))
    response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["devices"]
    detail = body["checks"]["devices"]["detail"]
    assert "Stale" in detail and "Fresh" not in detail and "Off" not in detail


def test_a_device_never_polled_is_overdue_only_once_the_time_has_passed_since_it_was_added(
    client, healthy
):
    healthy.DEVICE_OVERDUE_MINUTES = 15
    device = DeviceFactory(name="New")
    assert client.get("/health/").status_code == 200
    Device.objects.filter(pk=device.pk).update(
        created_at=timezone.now() - datetime.timedelta(minutes=16)
    )
    assert client.get("/health/").json()["failing"] == ["devices"]


def test_health_is_503_when_the_broker_cannot_be_reached_and_hides_its_password(client, healthy):
    healthy.CELERY_BROKER_URL = f"redis://:hunter2@127.0.0.1:{free_port()}/2"
    healthy.CELERY_BROKER_TRANSPORT_OPTIONS = {}
    response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["broker"]
    assert "redis broker cannot be reached" in body["checks"]["broker"]["detail"]
    assert "hunter2" not in response.content.decode()


def test_health_reaches_a_running_redis_broker(client, healthy):
    healthy.CELERY_BROKER_URL = "redis://127.0.0.1:6379/2"
    healthy.CELERY_BROKER_TRANSPORT_OPTIONS = {}
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            pass
    except OSError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    assert client.get("/health/").json()["checks"]["broker"]["ok"] is True


def cache_is(backend: str, location, **options):
    """/health/ checks this cache. Undone before the suite's teardown clears the
    default cache: clearing a Redis cache empties its whole database."""
    kind = {
        "redis": "django.core.cache.backends.redis.RedisCache",
        "file": "django.core.cache.backends.filebased.FileBasedCache",
    }[backend]
    return override_settings(
        CACHES={"default": {"BACKEND": kind, "LOCATION": location, "OPTIONS": options}}
    )


def test_health_writes_reads_and_deletes_a_key_in_the_file_cache(client, healthy, tmp_path):
    with cache_is("file", tmp_path / "cache"):
        response = client.get("/health/")
    assert response.status_code == 200
    assert response.json()["checks"]["cache"] == {
        "ok": True,
        "detail": "the file cache stores and returns a key",
    }
    # Its key is gone: the folder holds no entry.
    assert list((tmp_path / "cache").iterdir()) == []


def test_health_reaches_a_running_redis_cache(client, healthy):
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    with cache_is("redis", "redis://127.0.0.1:6379/12"):
        response = client.get("/health/")
    assert response.status_code == 200
    assert (
        response.json()["checks"]["cache"]["detail"] == "the redis cache stores and returns a key"
    )
    # Its key is gone.
    assert list(redis.Redis(db=12).scan_iter(match="*health-*")) == []


def test_health_is_503_when_the_redis_cache_cannot_be_reached_and_hides_its_password(
    client, healthy
):
    with cache_is("redis", f"redis://:hunter2@127.0.0.1:{free_port()}/12"):
        response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["cache"]
    assert body["checks"]["cache"]["detail"] == "the redis cache does not work: ConnectionError"
    assert "hunter2" not in response.content.decode()


def test_a_hung_redis_cache_fails_health_within_its_own_short_timeout(client, healthy):
    # Accepts connections (the kernel's backlog) and never answers.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/12"
        with cache_is("redis", url, socket_connect_timeout=30, socket_timeout=30):
            started = time.monotonic()
            body = client.get("/health/").json()
    assert time.monotonic() - started < health.CACHE_TIMEOUT_SECONDS + 5
    assert body["failing"] == ["cache"]
    assert body["checks"]["cache"]["detail"] == "the redis cache does not work: TimeoutError"


@pytest.mark.parametrize(
    ("blocked", "error"),
    [
        ("read-only folder", "PermissionError (Permission denied)"),
        ("file in its place", "FileExistsError (File exists)"),
    ],
)
def test_health_is_503_when_the_cache_folder_cannot_be_written(
    client, healthy, tmp_path, blocked, error
):
    location = tmp_path / "cache"
    if blocked == "read-only folder":
        location.mkdir(mode=0o500)
        if os.access(location, os.W_OK):
            pytest.skip("this user writes to read-only folders (root)")
    else:
        location.write_text("")
    with cache_is("file", location):
        response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["cache"]
    assert body["checks"]["cache"]["detail"] == f"the file cache does not work: {error}"


def test_the_heartbeat_task_records_when_it_ran():
    assert not Heartbeat.objects.exists()
    heartbeat.apply()
    first = Heartbeat.objects.get(name="beat").at
    assert timezone.now() - first < datetime.timedelta(seconds=5)
    heartbeat.apply()
    assert Heartbeat.objects.count() == 1
    assert Heartbeat.objects.get(name="beat").at >= first


def test_the_heartbeat_is_in_the_beat_schedule(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["heartbeat"]
    assert entry["task"] == "core.tasks.heartbeat"
    assert entry["schedule"] == settings.HEARTBEAT_INTERVAL_SECONDS


# --- /metrics ---------------------------------------------------------------------------


def scrape(client, token="scrape-me") -> dict[str, dict[tuple, float]]:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def test_metrics_are_off_with_a_clear_message_when_no_token_is_set(client, settings):
    settings.METRICS_TOKEN = ""
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer ")
    assert response.status_code == 404
    assert "set METRICS_TOKEN" in response.content.decode()


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "Token scrape-me", "scrape-me", "Bearer scrape-me-not"]
)
def test_metrics_refuse_a_missing_or_wrong_token(client, settings, header):
    settings.METRICS_TOKEN = "scrape-me"
    extra = {"HTTP_AUTHORIZATION": header} if header is not None else {}
    response = client.get("/metrics", **extra)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert "attendance_bridge" not in response.content.decode()


def test_metrics_count_polls_punches_and_show_each_device(client, settings, zk_emulator):
    settings.METRICS_TOKEN = "scrape-me"
    emulator = zk_emulator()
    good = DeviceFactory(name="Front", port=emulator.port)
    dead = DeviceFactory(name="Back", port=free_port(), timeout_seconds=1)
    ingest.device_poll(device=good)
    ingest.device_poll(device=good)  # unchanged: nothing downloaded
    ingest.device_poll(device=dead)
    samples = scrape(client)

    polls = samples["attendance_bridge_polls_total"]
    assert polls[(("device", "Front"), ("outcome", "downloaded"))] == 1
    assert polls[(("device", "Front"), ("outcome", "unchanged"))] == 1
    assert polls[(("device", "Back"), ("outcome", "failed"))] == 1
    punches = samples["attendance_bridge_punches_ingested_total"]
    assert punches[(("device", "Front"),)] == 300
    assert samples["attendance_bridge_device_up"] == {
        (("device", "Front"),): 1.0,
        (("device", "Back"),): 0.0,
    }
    fill = samples["attendance_bridge_device_log_fill_ratio"][(("device", "Front"),)]
    good.refresh_from_db()
    assert fill == pytest.approx(300 / good.record_capacity)
    assert abs(samples["attendance_bridge_device_clock_drift_seconds"][(("device", "Front"),)]) < 5
    ages = samples["attendance_bridge_device_last_success_age_seconds"]
    assert 0 <= ages[(("device", "Front"),)] < 60
    assert (("device", "Back"),) not in ages


@pytest.mark.django_db(transaction=True)
def test_metrics_count_processing_runs_and_deliveries_and_show_the_backlog(
    client, settings, fake_crm
):
    settings.METRICS_TOKEN = "scrape-me"
    server = fake_crm(token="t", reject_user_ids=("2002",))
    settings.CRM_API_URL = server.url
    settings.CRM_API_TOKEN = "t"
    settings.CRM_RETRY_BACKOFF_SECONDS = 0.001
    device = DeviceFactory()
    start = datetime.datetime(2026, 11, 2, 8, 0, tzinfo=datetime.UTC)
    for user_id in ("1001", "2002", "3003"):
        RawAttendanceFactory(device=device, user_id=user_id, timestamp=start)
        RawAttendanceFactory(
            device=device, user_id=user_id, timestamp=start + datetime.timedelta(hours=9)
        )
    attendance_process()
    before = scrape(client)
    assert before["attendance_bridge_processing_runs_total"][(("mode", "incremental"),)] == 1
    assert before["attendance_bridge_processing_rows_total"][(("change", "created"),)] == 3
    assert before["attendance_bridge_undelivered"][(("kind", "daily"),)] == 3
    assert before["attendance_bridge_undelivered_oldest_age_seconds"][(("kind", "daily"),)] >= 0

    crm.crm_sync()
    after = scrape(client)
    delivered = after["attendance_bridge_delivered_records_total"]
    assert delivered[(("kind", "daily"), ("outcome", "sent"))] == 2
    assert delivered[(("kind", "daily"), ("outcome", "rejected"))] == 1
    assert after["attendance_bridge_undelivered"][(("kind", "daily"),)] == 0
    rows = after["attendance_bridge_delivery_rows"]
    assert rows[(("kind", "daily"), ("state", "synced"))] == 2
    assert rows[(("kind", "daily"), ("state", "rejected"))] == 1


def test_metrics_show_the_heartbeat_age(client, settings):
    settings.METRICS_TOKEN = "scrape-me"
    assert "attendance_bridge_heartbeat_age_seconds" not in scrape(client)
    health.heartbeat_record(at=timezone.now() - datetime.timedelta(seconds=30))
    age = scrape(client)["attendance_bridge_heartbeat_age_seconds"][()]
    assert 30 <= age < 60


def test_a_scrape_costs_a_handful_of_queries_whatever_the_number_of_devices(
    client, settings, django_assert_max_num_queries
):
    settings.METRICS_TOKEN = "scrape-me"
    for index in range(30):
        DeviceFactory(name=f"Door {index}", record_count=10, record_capacity=100)
    with django_assert_max_num_queries(6):
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").status_code == 200


# --- Log lines --------------------------------------------------------------------------


def test_a_poll_writes_one_line_with_the_device_and_its_counts(zk_emulator, caplog):
    emulator = zk_emulator()
    device = DeviceFactory(name="Front", port=emulator.port)
    with caplog.at_level(logging.INFO, logger="core.ingest"):
        ingest.device_poll(device=device)
    lines = [r.getMessage() for r in caplog.records if r.name == "core.ingest"]
    assert len(lines) == 1
    assert f"Poll of device Front (id {device.pk})" in lines[0]
    assert "300 new" in lines[0] and "300 downloaded" in lines[0]


@pytest.mark.django_db(transaction=True)
def test_a_delivery_batch_writes_one_line_with_its_counts(settings, fake_crm, caplog):
    server = fake_crm()
    settings.CRM_API_URL = server.url
    device = DeviceFactory()
    RawAttendanceFactory(device=device, user_id="1001")
    attendance_process()
    with caplog.at_level(logging.INFO, logger="core.crm"):
        crm.crm_sync()
    lines = [r.getMessage() for r in caplog.records if r.name == "core.crm"]
    assert len(lines) == 1
    assert "daily batch" in lines[0] and "1 records, 1 sent, 0 failed, 0 rejected" in lines[0]


def run_logging(tmp_path, **env) -> subprocess.CompletedProcess:
    code = (
        "import django, logging; django.setup(); "
        "logging.getLogger('core.ingest').info('Poll of device %s: %d new', 'Front', 3)"
    )
    environment = {
        "SECRET_KEY": "x",
        "PATH": "/usr/bin:/bin",
        "VAR_DIR": str(tmp_path / "var"),
        "DJANGO_SETTINGS_MODULE": "attendance_bridge.settings",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_log_format_json_writes_one_json_object_per_line(tmp_path):
    done = run_logging(tmp_path, LOG_FORMAT="json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stderr.strip().splitlines()[-1])
    assert record["message"] == "Poll of device Front: 3 new"
    assert record["level"] == "INFO" and record["logger"] == "core.ingest"
    assert "time" in record


def test_log_file_gets_every_line_too(tmp_path):
    done = run_logging(tmp_path, LOG_FILE=str(tmp_path / "logs" / "bridge.log"))
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "logs" / "bridge.log").read_text()
    assert "INFO core.ingest: Poll of device Front: 3 new" in written
    assert "Poll of device Front: 3 new" in done.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be plain or json, got 'xml'"),
        ("HEARTBEAT_INTERVAL_SECONDS", "1", "HEARTBEAT_INTERVAL_SECONDS must be at least 5"),
        ("DEVICE_OVERDUE_MINUTES", "soon", "DEVICE_OVERDUE_MINUTES must be a number"),
        ("LOG_FILE_MAX_MB", "0", "LOG_FILE_MAX_MB must be at least 1, got 0"),
    ],
)
def test_operations_settings_fail_fast_naming_the_variable(variable, value, message):
    done = load_settings(**{variable: value})
    assert done.returncode != 0
    assert message in done.stderr


# --- Progress ---------------------------------------------------------------------------


class Terminal:
    """A stream that says it is a terminal, keeping what was drawn."""

    def __init__(self, tty: bool):
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_processing_reports_progress_to_a_terminal_and_nothing_to_a_pipe():
    device = DeviceFactory()
    for user_id in ("1001", "1002", "1003"):
        RawAttendanceFactory(device=device, user_id=user_id)
    pipe = Progress(desc="processing", unit="employees", stream=Terminal(False))
    assert pipe.callback is None
    seen = []
    attendance_process(full=True, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    screen = Terminal(True)
    with Progress(desc="processing", unit="employees", stream=screen) as bar:
        attendance_process(full=True, progress=bar.callback)
    assert "processing" in screen.text and "3/3" in screen.text


@pytest.mark.django_db(transaction=True)
def test_a_big_sync_reports_records_done_out_of_records_due(settings, fake_crm):
    server = fake_crm()
    settings.CRM_API_URL = server.url
    settings.CRM_BATCH_SIZE = 2
    device = DeviceFactory()
    for user_id in ("1001", "1002", "1003", "1004", "1005"):
        RawAttendanceFactory(device=device, user_id=user_id)
    attendance_process()
    seen = []
    crm.crm_sync(progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert ProcessedAttendance.objects.filter(sync_state="synced").count() == 5


def test_a_chunked_download_reports_its_records_bytes_and_storing(zk_emulator):
    emulator = zk_emulator(chunked=True)
    device = DeviceFactory(port=emulator.port)
    events = []
    ingest.device_poll(device=device, progress=lambda event, amount: events.append((event, amount)))
    assert events[0] == ("records", 300)
    assert events[-1] == ("storing", 300)
    assert sum(amount for event, amount in events if event == "bytes") >= 300 * 40


# --- The demo's registrations -----------------------------------------------------------


def test_demo_prepare_registers_the_clock_and_an_admin_and_a_second_run_updates_them():
    first = demo_prepare(device_host="127.0.0.1", device_port=40001)
    second = demo_prepare(device_host="127.0.0.1", device_port=40002)
    device = Device.objects.get(name=DEVICE_NAME)
    assert Device.objects.count() == 1
    assert (device.port, device.timezone, device.enabled) == (40002, "UTC", True)
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username=ADMIN_USERNAME)
    assert user.is_superuser and user.is_staff
    assert first.password != second.password
    assert user.check_password(second.password) and not user.check_password(first.password)
