"""Celery tasks: the pipeline's stages run by workers.

Each task takes ids and small JSON values, re-fetches what it needs, calls one
stage function and returns a JSON-serialisable summary. A device that is gone
by the time its task runs is skipped quietly. Every stage is idempotent, so a
task that runs twice (acks_late after a worker died) does no harm. Queues
(settings.CELERY_TASK_ROUTES): "devices" for everything that talks to a
clock, "processing" for database-only work, "crm" for delivery, so a slow CRM
never holds polls back.

The chain that takes a punch to the CRM without waiting for a scheduled run:
a poll that stored new punches asks for a processing run (and, with the raw
punch export on, an export run); a processing run that changed days asks for
a delivery run. Requests are debounced in the database (core.pipeline): a
fleet of polls finishing together queues one processing run.
"""

import dataclasses
import datetime
import logging
import math

from celery import shared_task
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import OperationalError, transaction

from core import crm, health, ingest, pipeline, retention
from core.audit import audit_clock_set
from core.models import Device
from core.processing import attendance_process

logger = logging.getLogger(__name__)

# A follow-up run waits this long after its request, so the polls of one
# cycle that finish close together are read by one run.
FOLLOW_UP_COUNTDOWN_SECONDS = 5
# Rows a delivery task sends at most; a bigger backlog queues the next run.
SYNC_RUN_LIMIT = 10_000
# Named transient failures worth a retry: the database briefly unavailable
# (a restart, a failover, SQLite's lock held too long). Backoff with jitter.
TRANSIENT = (OperationalError,)
RETRY = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": 5,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 3,
}


def _follow_up(task, name: str) -> None:
    """Queues `task` once for every request made before it starts (core.pipeline)."""
    expires = datetime.timedelta(
        seconds=FOLLOW_UP_COUNTDOWN_SECONDS + settings.CELERY_TASK_TIME_LIMIT
    )
    if pipeline.run_request(name=name, expires=expires):
        transaction.on_commit(lambda: task.apply_async(countdown=FOLLOW_UP_COUNTDOWN_SECONDS))


def _device(device_id: int) -> Device | None:
    device = Device.objects.filter(pk=device_id).first()
    if device is None:
        logger.info("Device %s is gone; nothing to do.", device_id)
    return device


@shared_task(**RETRY)
def poll_device(device_id: int, force_full: bool = False) -> dict | None:
    """Downloads the new punches of one device under its lease (ingest.device_poll_leased);
    skips a device another worker is polling."""
    result = ingest.device_poll_leased(
        device_id=device_id, lease=ingest.poll_lease(), force_full=force_full
    )
    if result is None:
        return None
    if result.ok and (result.new or result.revised):
        _follow_up(process_attendance, pipeline.PROCESS)
        if settings.CRM_PUNCHES_URL and result.new:
            _follow_up(sync_punches_to_crm, pipeline.CRM_PUNCH_SYNC)
    return dataclasses.asdict(result)


@shared_task
def poll_all_devices(force_full: bool = False) -> list[int]:
    """Queues one poll_device task per enabled device with an address; returns their ids."""
    ids = list(
        Device.objects.filter(enabled=True, ip_address__isnull=False)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    for device_id in ids:
        poll_device.delay(device_id, force_full=force_full)
    return ids


def _retry_while_busy(task, busy: ingest.DeviceBusy) -> None:
    """Queues `task` again in `busy.retry_in` seconds (raises celery's Retry)
    while a device's lease may still be held by a live poll; returns once the
    task has waited as long as a lease lasts, and the task reports the device busy."""
    tries = math.ceil(ingest.poll_lease().total_seconds() / ingest.DEVICE_BUSY_RETRY_SECONDS) + 1
    if task.request.retries < tries:
        raise task.retry(countdown=busy.retry_in, max_retries=tries)


@shared_task(bind=True)
def test_device(self, device_id: int) -> dict | None:
    """Connects to one device and reads identity, counts and clock (ingest.device_test);
    while another worker polls it, tries again later."""
    device = _device(device_id)
    if device is None:
        return None
    report = ingest.device_test(device=device)
    if report.busy:
        _retry_while_busy(self, ingest.device_busy(device_id=device_id))
    return dataclasses.asdict(report)


@shared_task(bind=True)
def sync_device_time(self, device_id: int, actor_id: int | None = None) -> dict | None:
    """Sets one device's clock to the server's time in its zone (ingest.device_sync_time)
    and records it in the audit log as done by the user ``actor_id`` (who asked
    for it through the API; None for no one, or a user deleted since). While
    another worker polls the device, tries again later."""
    device = _device(device_id)
    if device is None:
        return None
    try:
        local_now = ingest.device_sync_time(device=device)
    except ingest.DeviceBusy as busy:
        _retry_while_busy(self, busy)
        return {"device_id": device_id, "busy": True, "error": str(busy)}
    actor = None if actor_id is None else get_user_model().objects.filter(pk=actor_id).first()
    audit_clock_set(actor=actor, device=device, set_to=local_now)
    return {"device_id": device_id, "set_to": local_now.isoformat()}


@shared_task(**RETRY)
def process_attendance() -> dict:
    """Builds daily records from the punches stored since the last run; a run
    that changed days asks for delivery when push is on."""
    pipeline.run_started(name=pipeline.PROCESS)
    result = attendance_process()
    changed = result.rows_created + result.rows_changed + result.rows_deleted + result.rows_voided
    if changed and settings.CRM_API_URL:
        _follow_up(sync_to_crm, pipeline.CRM_SYNC)
    return dataclasses.asdict(result)


@shared_task(**RETRY)
def sync_to_crm(ids: list[int] | None = None) -> dict:
    """Pushes due daily records to the CRM, at most SYNC_RUN_LIMIT; with ids,
    makes those rows due first (a resend)."""
    pipeline.run_started(name=pipeline.CRM_SYNC)
    if ids:
        crm.crm_resend(ids=ids)
    result = crm.crm_sync(limit=SYNC_RUN_LIMIT)
    if result.sent + result.failed + result.rejected >= SYNC_RUN_LIMIT and not result.stopped:
        _follow_up(sync_to_crm, pipeline.CRM_SYNC)
    return dataclasses.asdict(result)


@shared_task(**RETRY)
def sync_punches_to_crm() -> dict:
    """Exports the raw punches not delivered yet to CRM_PUNCHES_URL, at most SYNC_RUN_LIMIT."""
    pipeline.run_started(name=pipeline.CRM_PUNCH_SYNC)
    result = crm.crm_punch_sync(limit=SYNC_RUN_LIMIT)
    if result.sent + result.failed + result.rejected >= SYNC_RUN_LIMIT and not result.stopped:
        _follow_up(sync_punches_to_crm, pipeline.CRM_PUNCH_SYNC)
    return dataclasses.asdict(result)


@shared_task(**RETRY)
def retry_failed_syncs() -> int:
    """Makes failed daily records whose retry time has come due again, and asks
    for a delivery run when there are some."""
    count = crm.crm_retry_failed()
    if count and settings.CRM_API_URL:
        _follow_up(sync_to_crm, pipeline.CRM_SYNC)
    return count


@shared_task(**RETRY)
def daily_cleanup() -> dict:
    """Deletes delivered punches and days older than RETENTION_DAYS
    (retention.records_prune); with CLEAR_DEVICE_LOGS, queues a log clear
    for each device whose log was fuller than CLEAR_DEVICE_LOGS_AT_PERCENT."""
    result = retention.records_prune()
    devices = []
    if settings.CLEAR_DEVICE_LOGS:
        devices = ingest.devices_log_clear_due(at_percent=settings.CLEAR_DEVICE_LOGS_AT_PERCENT)
        for device_id in devices:
            clear_device_log.delay(device_id)
    return {**dataclasses.asdict(result), "log_clears_queued": devices}


@shared_task
def clear_device_log(device_id: int) -> dict | None:
    """Clears one device's log if every record on it is verified stored
    (ingest.device_clear_log)."""
    result = ingest.device_clear_log(
        device_id=device_id,
        at_percent=settings.CLEAR_DEVICE_LOGS_AT_PERCENT,
        lease=ingest.poll_lease(),
    )
    return None if result is None else dataclasses.asdict(result)


# --- Operations: the heartbeat ------------------------------------------------------


@shared_task(name="core.tasks.heartbeat")
def heartbeat() -> str:
    """Records that beat queued this and a worker ran it (core.health); /health/ reads it."""
    health.heartbeat_record()
    return "ok"
