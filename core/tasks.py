"""Celery tasks: the pipeline's stages run by workers.

Each task takes ids and small JSON values, re-fetches what it needs, calls one
stage function and returns a JSON-serialisable summary. A device that is gone
by the time its task runs is skipped quietly. Every stage is idempotent, so a
task that runs twice (acks_late after a worker died) does no harm.
"""

import dataclasses
import logging

from celery import shared_task

from core import crm, health, ingest
from core.models import Device
from core.processing import attendance_process

logger = logging.getLogger(__name__)

DEVICES_QUEUE = "devices"
CRM_QUEUE = "crm"


def _device(device_id: int) -> Device | None:
    device = Device.objects.filter(pk=device_id).first()
    if device is None:
        logger.info("Device %s is gone; nothing to do.", device_id)
    return device


@shared_task(queue=DEVICES_QUEUE)
def poll_device(device_id: int, force_full: bool = False) -> dict | None:
    """Downloads the new punches of one device (ingest.device_poll)."""
    device = _device(device_id)
    if device is None:
        return None
    return dataclasses.asdict(ingest.device_poll(device=device, force_full=force_full))


@shared_task(queue=DEVICES_QUEUE)
def poll_all_devices(force_full: bool = False) -> list[int]:
    """Queues one poll_device task per enabled device; returns their ids."""
    ids = list(Device.objects.filter(enabled=True).values_list("pk", flat=True))
    for device_id in ids:
        poll_device.delay(device_id, force_full=force_full)
    return ids


@shared_task(queue=DEVICES_QUEUE)
def test_device(device_id: int) -> dict | None:
    """Connects to one device and reads identity, counts and clock (ingest.device_test)."""
    device = _device(device_id)
    if device is None:
        return None
    return dataclasses.asdict(ingest.device_test(device=device))


@shared_task(queue=DEVICES_QUEUE)
def sync_device_time(device_id: int) -> dict | None:
    """Sets one device's clock to the server's time in its zone (ingest.device_sync_time)."""
    device = _device(device_id)
    if device is None:
        return None
    local_now = ingest.device_sync_time(device=device)
    return {"device_id": device_id, "set_to": local_now.isoformat()}


@shared_task
def process_attendance() -> dict:
    """Builds daily records from the punches stored since the last run."""
    return dataclasses.asdict(attendance_process())


@shared_task(queue=CRM_QUEUE)
def sync_to_crm(ids: list[int] | None = None) -> dict:
    """Pushes due daily records to the CRM; with ids, makes those rows due first (a resend)."""
    if ids:
        crm.crm_resend(ids=ids)
    return dataclasses.asdict(crm.crm_sync())


# --- Operations: the heartbeat ------------------------------------------------------


@shared_task(name="core.tasks.heartbeat")
def heartbeat() -> str:
    """Records that beat queued this and a worker ran it (core.health); /health/ reads it."""
    health.heartbeat_record()
    return "ok"
