"""Celery tasks: fan-out, the per-device lease, the poll → process → deliver
chain, tasks whose device is gone, and the schedule built from settings.

Tasks run eagerly here (no worker): the chain's follow-ups are queued after
commit, so django_capture_on_commit_callbacks shows and runs them. The real
worker and beat run in test_e2e.py."""

import datetime
import io
import json
import math
import subprocess
import sys
import threading
import time

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from attendance_bridge.celery import app
from core import ingest, pipeline, tasks
from core.models import Device, ProcessedAttendance, RawAttendance, RunRequest
from core.tests.factories import DeviceFactory
from core.tests.test_settings import PROJECT, load_settings
from core.zk.emulator import DeviceState

pytestmark = pytest.mark.django_db

LEASE = datetime.timedelta(minutes=5)


@pytest.fixture
def eager():
    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = previous


@pytest.fixture
def crm_on(settings, fake_crm):
    crm = fake_crm(token="t0ken")
    settings.CRM_API_URL = crm.url
    settings.CRM_API_TOKEN = "t0ken"
    settings.CRM_RETRY_BACKOFF_SECONDS = 0
    return crm


def small_state(serial: str, punches: int = 20, seed: int = 3) -> DeviceState:
    state = DeviceState.generate(users=4, punches=punches, days=3, seed=seed)
    state.serial_number = serial
    return state


def device_for(emu, **fields) -> Device:
    return DeviceFactory(ip_address=emu.host, port=emu.port, **fields)


# --- Fan-out -------------------------------------------------------------------------


def test_poll_all_devices_queues_one_poll_per_enabled_device(zk_emulator, eager):
    first = device_for(zk_emulator(small_state("FAN1", seed=1)))
    second = device_for(zk_emulator(small_state("FAN2", seed=2)))
    off = device_for(zk_emulator(small_state("FAN3", seed=3)), enabled=False)

    queued = tasks.poll_all_devices()

    assert queued == [first.pk, second.pk]
    assert RawAttendance.objects.filter(device=first).count() == 20
    assert RawAttendance.objects.filter(device=second).count() == 20
    assert not RawAttendance.objects.filter(device=off).exists()


def test_a_dead_device_in_the_fan_out_does_not_stop_the_others(zk_emulator, eager):
    alive = device_for(zk_emulator(small_state("ALIVE")))
    dead_emu = zk_emulator(small_state("DEAD"))
    dead = device_for(dead_emu, timeout_seconds=1)
    dead_emu.stop()

    tasks.poll_all_devices()

    assert RawAttendance.objects.filter(device=alive).count() == 20
    dead.refresh_from_db()
    assert dead.consecutive_failures == 1
    assert dead.last_error


# --- One worker per device -----------------------------------------------------------


def test_a_device_leased_by_another_worker_is_skipped_without_contacting_it(zk_emulator):
    emu = zk_emulator(small_state("LEASED"))
    device = device_for(emu)
    until = ingest.device_lease_claim(device_id=device.pk, lease=LEASE)
    assert until is not None

    result = tasks.poll_device(device.pk)

    assert result["busy"] is True
    assert not RawAttendance.objects.exists()
    assert emu.enable_log == []  # never connected: nothing disabled or enabled
    assert ingest.device_lease_release(device_id=device.pk, until=until)
    assert tasks.poll_device(device.pk)["new"] == 20


def test_an_expired_lease_of_a_dead_worker_is_taken_over(zk_emulator):
    device = device_for(zk_emulator(small_state("EXPIRED")))
    Device.objects.filter(pk=device.pk).update(
        poll_lease_until=timezone.now() - datetime.timedelta(seconds=1)
    )

    assert tasks.poll_device(device.pk)["new"] == 20
    device.refresh_from_db()
    assert device.poll_lease_until is None


def test_a_release_with_a_stale_token_leaves_the_new_holders_lease_alone(zk_emulator):
    device = device_for(zk_emulator(small_state("TOKEN")))
    stale = timezone.now() - datetime.timedelta(seconds=5)
    current = ingest.device_lease_claim(device_id=device.pk, lease=LEASE)

    assert not ingest.device_lease_release(device_id=device.pk, until=stale)
    assert ingest.device_lease_claim(device_id=device.pk, lease=LEASE) is None
    assert ingest.device_lease_release(device_id=device.pk, until=current)


@pytest.mark.django_db(transaction=True)
def test_poll_devices_command_skips_a_device_a_worker_is_polling(zk_emulator):
    # Committed: on PostgreSQL the command polls devices from threads of its own.
    busy = device_for(zk_emulator(small_state("CMDBUSY", seed=1)), name="Busy door")
    free = device_for(zk_emulator(small_state("CMDFREE", seed=2)), name="Free door")
    ingest.device_lease_claim(device_id=busy.pk, lease=LEASE)
    out = io.StringIO()

    call_command("poll_devices", stdout=out)  # no CommandError: a skip is no failure

    assert "Busy door: skipped, another worker is polling it" in out.getvalue()
    assert "Free door: 20 new" in out.getvalue()
    assert not RawAttendance.objects.filter(device=busy).exists()
    free.refresh_from_db()
    assert free.poll_lease_until is None


def test_poll_now_in_the_admin_skips_a_device_a_worker_is_polling(admin_client, zk_emulator):
    emu = zk_emulator(small_state("ADMBUSY"))
    device = device_for(emu, name="Lobby")
    ingest.device_lease_claim(device_id=device.pk, lease=LEASE)

    response = admin_client.post(
        reverse("admin:core_device_changelist"),
        {"action": "poll_now", "_selected_action": [device.pk]},
        follow=True,
    )

    (message,) = list(response.context["messages"])
    assert message.level_tag == "warning"
    assert "Lobby: skipped, another worker is polling it" in message.message
    assert emu.enable_log == []


def test_the_lease_is_given_back_when_a_poll_fails_unexpectedly(zk_emulator, monkeypatch):
    # A database failure mid-poll cannot be made real here; the poll is replaced.
    device = device_for(zk_emulator(small_state("BROKEN")))

    def broken_poll(**kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(ingest, "device_poll", broken_poll)

    with pytest.raises(RuntimeError):
        tasks.poll_device(device.pk)

    device.refresh_from_db()
    assert device.poll_lease_until is None


def in_thread(results: dict, key: str, work) -> threading.Thread:
    """Runs `work` on a thread of its own, as another worker would, into results[key]."""

    def run():
        try:
            results[key] = work()
        finally:
            from django.db import connection

            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_polls_of_one_device_one_polls_and_one_skips(zk_emulator):
    # Slow replies keep the first poll inside its lease while the second starts.
    emu = zk_emulator(small_state("TWICE"), delay_ms=150)
    device = device_for(emu)
    results = {}

    thread = in_thread(results, "first", lambda: tasks.poll_device(device.pk))
    leased = Device.objects.filter(pk=device.pk, poll_lease_until__isnull=False)
    wait_until(leased.exists, "the first poll never took the lease")
    results["second"] = tasks.poll_device(device.pk)
    thread.join(timeout=30)

    assert not thread.is_alive()
    assert results["second"]["busy"] is True
    assert results["first"]["ok"] is True and results["first"]["new"] == 20
    assert emu.enable_log.count("disable") == 1  # one download, by one worker
    assert RawAttendance.objects.filter(device=device).count() == 20


@pytest.fixture
def retries():
    """The retries tasks ask for (celery's task_retry signal): (task name, countdown)."""
    from celery.signals import task_retry

    seen = []

    def record(sender=None, reason=None, **_):
        seen.append((sender.name, reason.when))

    task_retry.connect(record, weak=False)
    yield seen
    task_retry.disconnect(record)


@pytest.mark.parametrize("task", [tasks.test_device, tasks.sync_device_time])
def test_test_and_sync_time_tasks_retry_while_a_poll_holds_the_device(zk_emulator, retries, task):
    emu = zk_emulator(small_state("HELD"), clock_offset=-3600)
    device = device_for(emu)
    ingest.device_lease_claim(device_id=device.pk, lease=LEASE)

    # Eagerly, each retry runs at once: the lease is still held at the last.
    answer = task.apply(args=[device.pk])

    assert answer.state == "SUCCESS"  # busy to the end, not failed
    assert answer.result["busy"] is True
    assert answer.result["error"].startswith("device busy: a poll is in progress")
    tries = math.ceil(ingest.poll_lease().total_seconds() / ingest.DEVICE_BUSY_RETRY_SECONDS) + 1
    assert retries == [(task.name, ingest.DEVICE_BUSY_RETRY_SECONDS)] * tries
    assert emu.connects == 0
    assert emu.device_now() < datetime.datetime.now() - datetime.timedelta(minutes=59)


def test_test_and_sync_time_tasks_run_on_a_free_device_and_give_the_lease_back(
    zk_emulator, retries
):
    emu = zk_emulator(small_state("FREE"), clock_offset=-3600)
    device = device_for(emu)
    # A dead worker's lease, over: taken over, then given back.
    Device.objects.filter(pk=device.pk).update(
        poll_lease_until=timezone.now() - datetime.timedelta(seconds=1)
    )

    report = tasks.test_device.apply(args=[device.pk]).result
    assert report["ok"] is True and report["identity"]["serial_number"] == "FREE"
    assert Device.objects.get(pk=device.pk).poll_lease_until is None

    Device.objects.filter(pk=device.pk).update(
        poll_lease_until=timezone.now() - datetime.timedelta(seconds=1)
    )
    synced = tasks.sync_device_time.apply(args=[device.pk]).result
    assert synced["device_id"] == device.pk and "set_to" in synced
    assert Device.objects.get(pk=device.pk).poll_lease_until is None
    assert abs((emu.device_now() - datetime.datetime.now()).total_seconds()) < 5
    assert retries == [] and emu.connects == 2


@pytest.mark.django_db(transaction=True)
def test_a_poll_is_skipped_while_a_connection_test_talks_to_the_device(zk_emulator):
    # Slow replies keep the test inside its session while the poll starts.
    emu = zk_emulator(small_state("TESTING"), delay_ms=150)
    device = device_for(emu)
    results = {}

    thread = in_thread(results, "test", lambda: tasks.test_device(device.pk))
    wait_until(lambda: emu.connects, "the test never connected")
    results["poll"] = tasks.poll_device(device.pk)
    thread.join(timeout=30)

    assert not thread.is_alive()
    assert results["test"]["ok"] is True
    assert results["poll"]["busy"] is True
    assert emu.connects == 1 and emu.enable_log == []  # the poll never connected
    assert not RawAttendance.objects.filter(device=device).exists()
    assert Device.objects.get(pk=device.pk).poll_lease_until is None


@pytest.mark.parametrize(
    "action, done",
    [("test_connection", "Lobby: OK"), ("sync_clock", "Lobby: clock set to")],
)
def test_test_connection_and_sync_clock_in_the_admin_wait_for_a_poll(
    admin_client, zk_emulator, action, done
):
    emu = zk_emulator(small_state("ADMHELD"))
    device = device_for(emu, name="Lobby")
    until = ingest.device_lease_claim(device_id=device.pk, lease=LEASE)

    def run():
        response = admin_client.post(
            reverse("admin:core_device_changelist"),
            {"action": action, "_selected_action": [device.pk]},
            follow=True,
        )
        (message,) = list(response.context["messages"])
        return message

    busy = run()
    assert busy.level_tag == "warning"
    assert busy.message.startswith("Lobby: device busy: a poll is in progress")
    assert "try again in 30 s" in busy.message
    assert emu.connects == 0

    ingest.device_lease_release(device_id=device.pk, until=until)
    assert run().message.startswith(done)
    assert emu.connects == 1
    assert Device.objects.get(pk=device.pk).poll_lease_until is None


# --- The chain: poll → process → deliver -----------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_poll_with_new_punches_reaches_the_crm_through_processing_and_delivery(
    zk_emulator, crm_on, eager
):
    # Committed for real (the CRM is never called inside a transaction): each
    # follow-up is queued at its commit and, eagerly, run there.
    device = device_for(zk_emulator(small_state("CHAIN")))

    tasks.poll_device(device.pk)

    days = ProcessedAttendance.objects.all()
    assert days.exists()
    assert not days.exclude(sync_state=ProcessedAttendance.SyncState.SYNCED).exists()
    assert set(crm_on.held()) == {f"{d.user_id}:{d.work_date.isoformat()}" for d in days}


def test_polls_finishing_together_queue_one_processing_run(
    zk_emulator, eager, django_capture_on_commit_callbacks
):
    first = device_for(zk_emulator(small_state("DEB1", seed=1)))
    second = device_for(zk_emulator(small_state("DEB2", seed=2)))

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        tasks.poll_device(first.pk)
        tasks.poll_device(second.pk)

    assert len(callbacks) == 1
    assert RunRequest.objects.get(name=pipeline.PROCESS).queued_until is not None


def test_a_poll_after_the_run_started_queues_another_run(
    zk_emulator, eager, django_capture_on_commit_callbacks
):
    emu = zk_emulator(small_state("AGAIN"))
    device = device_for(emu)
    with django_capture_on_commit_callbacks(execute=False) as first_callbacks:
        tasks.poll_device(device.pk)
    tasks.process_attendance()  # the queued run starts: request cleared
    emu.push_punch("1001")

    with django_capture_on_commit_callbacks(execute=False) as second_callbacks:
        tasks.poll_device(device.pk)

    assert (len(first_callbacks), len(second_callbacks)) == (1, 1)


def test_a_poll_without_new_punches_queues_nothing(
    zk_emulator, eager, django_capture_on_commit_callbacks
):
    device = device_for(zk_emulator(small_state("QUIET")))
    tasks.poll_device(device.pk)
    pipeline.run_started(name=pipeline.PROCESS)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        result = tasks.poll_device(device.pk)

    assert result["ok"] and result["new"] == 0
    assert callbacks == []


def test_processing_that_changed_nothing_queues_no_delivery(
    crm_on, eager, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        tasks.process_attendance()

    assert callbacks == []


def test_processing_queues_no_delivery_when_push_is_off(
    zk_emulator, settings, eager, django_capture_on_commit_callbacks
):
    settings.CRM_API_URL = ""
    device = device_for(zk_emulator(small_state("NOPUSH")))
    tasks.poll_device(device.pk)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        result = tasks.process_attendance()

    assert result["rows_created"] > 0
    assert callbacks == []


@pytest.mark.django_db(transaction=True)
def test_new_punches_go_to_the_punch_export_at_once_when_it_is_on(
    zk_emulator, settings, fake_crm, eager
):
    crm = fake_crm(token="t0ken")
    settings.CRM_API_URL = ""
    settings.CRM_PUNCHES_URL = crm.punches_url
    settings.CRM_API_TOKEN = "t0ken"
    device = device_for(zk_emulator(small_state("PUNCHES")))

    tasks.poll_device(device.pk)

    assert len(crm.punches()) == 20


def test_failed_days_whose_retry_time_came_are_made_due_and_a_delivery_is_queued(
    crm_on, django_capture_on_commit_callbacks
):
    failed = ProcessedAttendance.SyncState.FAILED
    day = ProcessedAttendance.objects.create(
        user_id="1001",
        work_date=datetime.date(2026, 11, 2),
        sync_state=failed,
        next_sync_at=timezone.now() - datetime.timedelta(minutes=1),
    )
    ProcessedAttendance.objects.create(
        user_id="1002",
        work_date=datetime.date(2026, 11, 2),
        sync_state=failed,
        next_sync_at=timezone.now() + datetime.timedelta(hours=1),
    )

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert tasks.retry_failed_syncs() == 1

    day.refresh_from_db()
    assert day.sync_state == ProcessedAttendance.SyncState.PENDING
    assert len(callbacks) == 1


@pytest.mark.django_db(transaction=True)
def test_a_delivery_run_that_reaches_its_limit_queues_the_next(
    crm_on, eager, monkeypatch, django_capture_on_commit_callbacks
):
    for user in ("1001", "1002", "1003"):
        ProcessedAttendance.objects.create(user_id=user, work_date=datetime.date(2026, 11, 2))
    monkeypatch.setattr(tasks, "SYNC_RUN_LIMIT", 1)

    tasks.sync_to_crm()  # eager: each run queues the next until none is left

    assert len(crm_on.held()) == 3
    assert not ProcessedAttendance.objects.exclude(
        sync_state=ProcessedAttendance.SyncState.SYNCED
    ).exists()


def test_run_request_is_granted_once_until_the_run_starts_or_expires():
    assert pipeline.run_request(name="x", expires=LEASE)
    assert not pipeline.run_request(name="x", expires=LEASE)
    pipeline.run_started(name="x")
    assert pipeline.run_request(name="x", expires=datetime.timedelta(0))
    # Expired at once: a lost message no longer blocks the next request.
    assert pipeline.run_request(name="x", expires=LEASE)


# --- Tasks whose row is gone -------------------------------------------------------------


@pytest.mark.parametrize(
    "task", [tasks.poll_device, tasks.test_device, tasks.sync_device_time, tasks.clear_device_log]
)
def test_a_task_for_a_deleted_device_returns_quietly(task):
    device = DeviceFactory()
    device_id = device.pk
    device.delete()

    assert task(device_id) is None


def test_a_poll_queued_for_a_device_disabled_since_does_nothing(zk_emulator):
    emu = zk_emulator(small_state("LATER"))
    device = device_for(emu, enabled=False)

    assert tasks.poll_device(device.pk) is None
    assert emu.enable_log == []


# --- The schedule ------------------------------------------------------------------------


def schedule_of(**env) -> dict:
    script = (
        "import json; from attendance_bridge import settings as s; "
        "print(json.dumps({k: [v['task'], str(v['schedule'])] "
        "for k, v in s.CELERY_BEAT_SCHEDULE.items()}))"
    )
    environment = {
        "SECRET_KEY": "x",
        "PATH": "/usr/bin:/bin",
        "VAR_DIR": "/tmp/ab-settings-test",
        "DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
        "CRM_API_URL": "",
        "CRM_PUNCHES_URL": "",
        # Empty: the defaults, whatever a developer's .env says.
        "POLL_INTERVAL_MINUTES": "",
        "PROCESS_INTERVAL_MINUTES": "",
        "SYNC_INTERVAL_MINUTES": "",
        "RETRY_FAILED_SYNCS_HOURS": "",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_beat_schedule_comes_from_the_interval_settings():
    schedule = schedule_of(
        POLL_INTERVAL_MINUTES="0.5", PROCESS_INTERVAL_MINUTES="7", DAILY_CLEANUP_AT="03:30"
    )

    assert schedule["poll-all-devices"] == ["core.tasks.poll_all_devices", "30.0"]
    assert schedule["process-attendance"] == ["core.tasks.process_attendance", "420.0"]
    assert schedule["retry-failed-syncs"] == ["core.tasks.retry_failed_syncs", "21600"]
    assert schedule["daily-cleanup"][1].startswith("<crontab: 30 3 ")
    assert "sync-to-crm" not in schedule and "sync-punches-to-crm" not in schedule


def test_the_default_poll_interval_is_fifteen_minutes_and_delivery_is_scheduled_when_on():
    schedule = schedule_of(
        CRM_API_URL="https://crm.example.com/a", CRM_PUNCHES_URL="https://crm.example.com/p"
    )

    assert float(schedule["poll-all-devices"][1]) == 900
    assert schedule["sync-to-crm"][0] == "core.tasks.sync_to_crm"
    assert float(schedule["sync-to-crm"][1]) == 1800
    assert schedule["sync-punches-to-crm"][0] == "core.tasks.sync_punches_to_crm"


@pytest.mark.parametrize(
    ("task", "queue"),
    [
        (tasks.poll_device, "devices"),
        (tasks.poll_all_devices, "devices"),
        (tasks.clear_device_log, "devices"),
        (tasks.process_attendance, "processing"),
        (tasks.daily_cleanup, "processing"),
        (tasks.sync_to_crm, "crm"),
        (tasks.sync_punches_to_crm, "crm"),
    ],
)
def test_each_task_goes_to_its_own_queue_and_only_there(task, queue):
    route = app.amqp.router.route({}, task.name)

    assert route["queue"].name == queue
    # Its own exchange and key: a message published for one queue lands in no other.
    assert (route["queue"].exchange.name, route["queue"].routing_key) == (queue, queue)


def test_a_worker_without_queue_options_consumes_every_queue():
    assert set(app.amqp.queues) == {"devices", "processing", "crm"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CELERY_TASK_SOFT_TIME_LIMIT": "600", "LATE_COMMIT_MARGIN": "10m"},
            "must be below LATE_COMMIT_MARGIN",
        ),
        (
            {"CELERY_TASK_SOFT_TIME_LIMIT": "1000", "LATE_COMMIT_MARGIN": "1h"},
            "far below the broker's visibility timeout",
        ),
        ({"POLL_INTERVAL_MINUTES": "soon"}, "POLL_INTERVAL_MINUTES must be a number"),
        ({"CLEAR_DEVICE_LOGS_AT_PERCENT": "100"}, "must be below 100"),
        ({"DAILY_CLEANUP_AT": "2am"}, "DAILY_CLEANUP_AT must be a time like 08:00"),
    ],
)
def test_time_limits_and_schedule_settings_that_cannot_work_stop_start_up(env, message):
    result = load_settings(**env)
    assert result.returncode != 0
    assert message in result.stderr
