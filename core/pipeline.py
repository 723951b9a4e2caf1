"""Follow-up runs between stages: a poll that stored punches asks for a
processing run, a processing run that changed days asks for a delivery run.

A fleet of polls finishing together must queue one processing run, not one
each, and nothing here may rely on one worker's memory: the request is a row
(RunRequest) claimed with one conditional UPDATE, shared by every worker.

Why no punch waits for the next scheduled run: a run clears its request
(run_started) and commits that before it reads anything. A caller that finds
a request still set asked after storing its rows, and before the run
cleared it, so the run reads those rows; a caller that finds it cleared
queues a new run.
"""

from __future__ import annotations

import datetime

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from core.models import RunRequest

PROCESS = "process"
CRM_SYNC = "crm_sync"
CRM_PUNCH_SYNC = "crm_punch_sync"


def run_request(*, name: str, expires: datetime.timedelta) -> bool:
    """Marks a run of `name` as queued unless one already is; True when the
    caller must queue it.

    `expires` bounds how long a queued run that never starts (a lost message)
    blocks new requests. Idempotent while a run is queued: every later caller
    gets False. One conditional UPDATE (an INSERT the first time); raises
    nothing of its own.
    """
    now = timezone.now()
    until = now + expires
    free = Q(queued_until__isnull=True) | Q(queued_until__lte=now)
    if RunRequest.objects.filter(free, name=name).update(queued_until=until):
        return True
    if RunRequest.objects.filter(name=name).exists():
        return False
    try:
        with transaction.atomic():
            RunRequest.objects.create(name=name, queued_until=until)
    except IntegrityError:
        return False  # another caller created it first, and queues the run
    return True


def run_started(*, name: str) -> None:
    """Clears the request of `name`: the run starting now reads everything
    committed before it, so later callers must queue a new one. Must be
    called outside a transaction, before the run reads. Idempotent."""
    RunRequest.objects.filter(name=name).update(queued_until=None)
