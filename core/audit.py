"""The audit log: who changed what, when, with the values before and after.

Entries are django-auditlog's ``LogEntry`` rows, written two ways:

1. Model saves and deletes of the models in settings.AUDITLOG_INCLUDE_TRACKING_MODELS
   (devices, employees) are recorded by auditlog's own signals, so an edit in
   the admin or a serializer's ``save()`` in the API needs nothing more.
2. Changes made with set-based ``.update()`` (which send no signal), and
   commands sent to a clock (which change no row), are recorded by the
   interface that makes them, with the acting user, through this module:

   - ``audit_changes(actor=..., action=..., ids=...)``: a context manager for the
     actions named in ``AUDITED_ACTIONS``. It reads the audited fields of those
     rows before and after the block, in the block's transaction, and writes
     one entry per row whose values changed, in bulk. Wrap the one stage call::

         with audit_changes(actor=request.user, action="crm_resend", ids=ids) as ids:
             count = crm_resend(ids=ids)

   - ``audit_record(actor=..., action=..., model=..., entries=[...])``: writes
     entries whose before and after values the caller knows, in bulk.

Processing's bulk writes are not recorded row by row: a row's version already
says it was recomputed.

What the REST API must call (the admin does the same in core/admin.py and
core/admin_adms.py, the device_command command with no actor):

- ``PATCH /api/processed-attendance/{id}/`` (HR correction)::

      with audit_changes(actor=request.user, action="attendance_edit", ids=[pk]):
          attendance_edit(record_id=pk, clock_in=..., clock_out=..., user=request.user)

  Likewise ``action="attendance_mark_reviewed"`` around attendance_mark_reviewed,
  ``"attendance_discard_edits"`` around attendance_discard_edits,
  ``"crm_resend"`` around crm_resend (``POST /api/processed-attendance/sync/``
  with ids), ``"crm_reset_failed"`` around crm_reset_failed, and
  ``"punches_judge"`` around core.ingest.punches_judge.
- A user added or updated on a clock (``POST /api/devices/{id}/users/``, and
  each user an import wrote, in one call)::

      entry = device_user_entry(device=device, before=replaced, after=written)
      audit_record(actor=request.user, action="device_user_add", model=Device,
                   entries=[entry] if entry else [])

  which records e.g. ``{"user_id": [None, "1234"], "name": [None, "Ann Lee"]}``;
  ``"device_user_remove"`` for ``DELETE /api/devices/{id}/users/{user_id}/``
  (``after=None``: ``{"user_id": ["1234", None], "name": ["Ann Lee", None]}``).
- A command queued for a clock that pushes (core.adms), once per command,
  after it was queued: the admin's **Push:** actions and the device_command
  command call::

      audit_commands(actor=request.user, commands=result.queued)

  (action ``"device_command"``; ``actor=None`` from the command line), which
  records on the device ``{"command": [None, "INFO"]}``, the line through
  core.adms.command_shown (a password as ***), and the command's id in the
  entry's data (``command_id``). The users endpoints record their queued
  commands as ``"device_user_add"``/``"device_user_remove"`` entries made by
  ``device_command_entry(command=..., changes=...)``: the user's fields and
  the line.
- A command sent to a clock, after it succeeded: a clock set with
  ``audit_clock_set(actor=request.user, device=device, set_to=local_time)``
  (action ``"device_sync_time"``, ``device`` as read before the command);
  a clock set by a queued task is recorded by the task
  (core.tasks.sync_device_time), the requesting user passed to it by id as
  ``actor_id``; a cleared punch log with ``audit_record(...,
  action="device_clear_log", model=Device, entries=[AuditEntry.of(device,
  {"record_count": [before, 0]})])``.
- Device create/change/delete and employee changes (name, work-time
  overrides) through a serializer's save() or delete(): nothing; the signals
  record them. A view that writes them with .update() instead must call
  audit_record.

Reading the log: ``GET /api/audit-log/`` (core/api/views/audit.py) and the admin's
Log entries, both with the ``auditlog.view_logentry`` permission only, which
is what the HR and Operators groups need for it.

The actor of signal-recorded entries: ``AuditActorMiddleware`` (in
settings.MIDDLEWARE, in place of auditlog's own) reads ``request.user`` when an
entry is written, not when the request enters the middleware. Django REST
framework authenticates tokens and JWTs inside the view, after every middleware
has run, and then sets the user on the underlying Django request; reading it at
write time therefore gives the token's or JWT's user too, with no mixin on each
view. ``audit_record`` and ``audit_changes`` take the actor explicitly: pass
``request.user`` (DRF's, inside an API view).
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from auditlog.cid import get_cid
from auditlog.context import auditlog_value
from auditlog.middleware import AuditlogMiddleware
from auditlog.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import models, transaction
from django.utils.functional import SimpleLazyObject

from core.models import (
    Device,
    DeviceCommand,
    ProcessedAttendance,
    PunchDelivery,
    RawAttendance,
)

# Rows read per query for a snapshot: far below SQLite's bound on query parameters.
SNAPSHOT_CHUNK = 2000
BULK_BATCH = 1000


# --- Models recorded by signals (settings.AUDITLOG_INCLUDE_TRACKING_MODELS) ----------------


def mask_secret(value: str) -> str:
    """How a secret appears in the log: whether it is set, never a digit of it."""
    return "not set" if value in ("", "0", "None") else "set"


class AuditActorMiddleware(AuditlogMiddleware):
    """auditlog's middleware, with the actor read when an entry is written.

    auditlog's own reads request.user as the request comes in; a REST call
    authenticated by a token or a JWT is authenticated later, inside the view,
    and would be recorded without its user.
    """

    @staticmethod
    def _get_actor(request):
        return SimpleLazyObject(lambda: _user(getattr(request, "user", None)))


def _user(user):
    if isinstance(user, get_user_model()) and user.is_authenticated:
        return user
    return None


# --- Recording ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One object's change: ``changes`` maps a field to ``[before, after]``."""

    object_pk: int | str
    object_repr: str
    changes: dict[str, list[Any]]
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, instance: models.Model, changes: Mapping[str, Sequence[Any]], **details):
        return cls(
            object_pk=instance.pk,
            object_repr=str(instance),
            changes={name: [json_value(v) for v in pair] for name, pair in changes.items()},
            details=details,
        )


def json_value(value: Any) -> Any:
    """A value as the log stores it: JSON types as they are, times as ISO text
    (aware times in UTC), durations as H:MM:SS, anything else as its text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC)
        return value.isoformat()
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    return str(value)


def audit_record(
    *,
    actor,
    action: str,
    model: type[models.Model],
    entries: Iterable[AuditEntry],
) -> int:
    """Writes one log entry per change, in bulk, as changes ("update") of
    ``model`` rows by ``actor`` under the named ``action``; returns how many.

    ``actor`` is the user who made the change (None or an anonymous user for
    none: a command, a scheduled task). Each entry's ``changes`` must be
    JSON-ready (``AuditEntry.of`` makes them so). Not idempotent: every call
    records; call it once the change is made, in its transaction. Raises
    nothing of its own; a database error propagates and rolls back with the
    caller's transaction.
    """
    actor = _user(actor)
    content_type = ContentType.objects.get_for_model(model)
    context = _request_context()
    rows = [
        LogEntry(
            content_type=content_type,
            object_pk=str(entry.object_pk),
            object_id=entry.object_pk if isinstance(entry.object_pk, int) else None,
            object_repr=entry.object_repr[:2000],
            action=LogEntry.Action.UPDATE,
            changes=entry.changes,
            changes_text="",
            additional_data={"action": action, **entry.details},
            actor=actor,
            actor_email=getattr(actor, "email", None) or None,
            cid=get_cid(),
            remote_addr=context.get("remote_addr"),
            remote_port=context.get("remote_port"),
        )
        for entry in entries
    ]
    LogEntry.objects.bulk_create(rows, batch_size=BULK_BATCH)
    return len(rows)


def _request_context() -> dict:
    """The address auditlog's middleware saw for this request; empty outside one."""
    try:
        value = auditlog_value.get()
    except LookupError:
        return {}
    return value if isinstance(value, dict) else {}


# --- Set-based changes: before and after, in bulk ----------------------------------------


@dataclass(frozen=True, slots=True)
class AuditedAction:
    model: type[models.Model]
    fields: tuple[str, ...]
    # Extra columns read to name the row without a query per row.
    repr_fields: tuple[str, ...]
    describe: Callable[[Mapping[str, Any]], str]


def _day(row: Mapping[str, Any]) -> str:
    return f"{row['user_id']} on {row['work_date']}"


def _punch(row: Mapping[str, Any]) -> str:
    stamp = row["timestamp"].astimezone(datetime.UTC)
    return f"{row['user_id']} @ {stamp:%Y-%m-%d %H:%M:%S} UTC on device {row['device_id']}"


def _punch_delivery(row: Mapping[str, Any]) -> str:
    return _punch(
        {
            "user_id": row["raw__user_id"],
            "timestamp": row["raw__timestamp"],
            "device_id": row["raw__device_id"],
        }
    )


_PUNCH_REF = ("raw__user_id", "raw__timestamp", "raw__device_id")
_DAY = (ProcessedAttendance, ("user_id", "work_date"), _day)
_DAY_TIMES = ("clock_in", "clock_out", "worked", "is_outlier", "outlier_reasons", "is_manual")
_DELIVERY = ("sync_state", "next_sync_at", "sync_attempts", "resend_count")

AUDITED_ACTIONS: dict[str, AuditedAction] = {
    # core.processing.attendance_edit: an HR correction.
    "attendance_edit": AuditedAction(
        _DAY[0], (*_DAY_TIMES, "edited_by_id", "version"), _DAY[1], _DAY[2]
    ),
    # core.processing.attendance_mark_reviewed
    "attendance_mark_reviewed": AuditedAction(
        _DAY[0], ("reviewed_by_id", "reviewed_at", "has_newer_punches"), _DAY[1], _DAY[2]
    ),
    # core.processing.attendance_discard_edits
    "attendance_discard_edits": AuditedAction(
        _DAY[0], (*_DAY_TIMES, "has_newer_punches", "version"), _DAY[1], _DAY[2]
    ),
    # core.crm.crm_resend and crm_reset_failed
    "crm_resend": AuditedAction(_DAY[0], _DELIVERY, _DAY[1], _DAY[2]),
    "crm_reset_failed": AuditedAction(_DAY[0], _DELIVERY, _DAY[1], _DAY[2]),
    # core.crm.crm_punch_resend and crm_punch_reset_failed: raw punch deliveries.
    "crm_punch_resend": AuditedAction(PunchDelivery, _DELIVERY, _PUNCH_REF, _punch_delivery),
    "crm_punch_reset_failed": AuditedAction(PunchDelivery, _DELIVERY, _PUNCH_REF, _punch_delivery),
    # core.ingest.punches_judge: an operator's verdict on punches.
    "punches_judge": AuditedAction(
        RawAttendance,
        ("is_suspect", "suspect_override", "suspect_reason", "suspect_override_by"),
        ("user_id", "timestamp", "device_id"),
        _punch,
    ),
}


def _snapshot(spec: AuditedAction, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    columns = ("pk", *spec.fields, *spec.repr_fields)
    rows = {}
    for start in range(0, len(ids), SNAPSHOT_CHUNK):
        chunk = ids[start : start + SNAPSHOT_CHUNK]
        for row in spec.model.objects.filter(pk__in=chunk).values(*columns):
            rows[row.pop("pk")] = row
    return rows


@contextmanager
def audit_changes(*, actor, action: str, ids: Iterable[int]) -> Iterator[list[int]]:
    """Records what the block changes on these rows, as ``action`` by ``actor``.

    Yields the ids as a list (evaluate a queryset once, and hand the service
    the same rows). Reads the action's fields (``AUDITED_ACTIONS``) before and
    after the block in one transaction, a query per 2000 rows each, and writes
    an entry per row whose values changed (``audit_record``). A block that
    raises rolls back and records nothing; rows it left as they were record
    nothing, so running an idempotent action again adds no entry. Raises
    KeyError for an action not in AUDITED_ACTIONS.
    """
    spec = AUDITED_ACTIONS[action]
    ids = list(ids)
    with transaction.atomic():
        before = _snapshot(spec, ids)
        yield ids
        after = _snapshot(spec, ids)
        entries = []
        for pk, old in before.items():
            new = after.get(pk)
            if new is None:
                continue
            changes = {
                name.removesuffix("_id") if name.endswith("_by_id") else name: [
                    json_value(old[name]),
                    json_value(new[name]),
                ]
                for name in spec.fields
                if old[name] != new[name]
            }
            if changes:
                entries.append(AuditEntry(pk, spec.describe(new), changes))
        audit_record(actor=actor, action=action, model=spec.model, entries=entries)


def audit_clock_set(*, actor, device: Device, set_to: datetime.datetime) -> int:
    """Records a clock set on a device (``device_sync_time``): its drift before
    (as ``device`` was read before the command) and after, and the local time
    it was set to. Not idempotent: call once per command sent. Raises nothing
    of its own."""
    drift_after = (
        Device.objects.filter(pk=device.pk).values_list("clock_drift_seconds", flat=True).first()
    )
    entry = AuditEntry.of(
        device,
        {
            "clock_drift_seconds": [device.clock_drift_seconds, drift_after],
            "clock": [None, set_to],
        },
        timezone=device.timezone,
    )
    return audit_record(actor=actor, action="device_sync_time", model=Device, entries=[entry])


# What the log keeps of a user on a clock; the password only as set or not set.
DEVICE_USER_FIELDS = ("user_id", "name", "uid", "privilege", "card", "group_id", "password")


def device_user_entry(*, device: Device, before, after, **details) -> AuditEntry | None:
    """The log entry of a user written to or deleted from ``device``: each of
    DEVICE_USER_FIELDS that differs as ``[before, after]`` (``before`` None
    for a user added, ``after`` None for one deleted; both are
    core.zk.client.DeviceUser). None when nothing differs: a user saved again
    as it was records nothing. ``details`` go into the entry's additional
    data (the import's source URL, say)."""

    def value(user, name):
        if user is None:
            return None
        raw = getattr(user, name)
        return mask_secret(raw) if name == "password" else raw

    changes = {
        name: [value(before, name), value(after, name)]
        for name in DEVICE_USER_FIELDS
        if value(before, name) != value(after, name)
    }
    return AuditEntry.of(device, changes, **details) if changes else None


def device_command_entry(
    *, command: DeviceCommand, changes: Mapping[str, Sequence[Any]] | None = None, **details
) -> AuditEntry:
    """The log entry of a command queued for a pushing clock: on its device,
    ``changes`` (a user's fields, say) and the command line as ``command``
    ``[None, line]``, shown through core.adms.command_shown so no password
    reaches the log; the command's id in the entry's data (``command_id``)."""
    # Imported here: core.adms imports core.ingest, which imports this module.
    from core.adms import command_shown

    changes = {**(changes or {}), "command": [None, command_shown(command.command)]}
    return AuditEntry.of(command.device, changes, command_id=command.pk, **details)


def audit_commands(*, actor, commands: Iterable[DeviceCommand]) -> int:
    """Records commands queued for pushing clocks (``device_command``), an
    entry each (device_command_entry), in bulk; returns how many.
    ``actor`` None for the command line. Not idempotent: call once per batch
    queued, in its transaction. Raises nothing of its own."""
    return audit_record(
        actor=actor,
        action="device_command",
        model=Device,
        entries=[device_command_entry(command=command) for command in commands],
    )
