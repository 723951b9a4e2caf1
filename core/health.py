"""Is the bridge working? The checks behind GET /health/, and the heartbeat."""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache.backends.filebased import FileBasedCache
from django.core.cache.backends.redis import RedisCache
from django.db import DatabaseError, connection
from django.db.models import Q
from django.utils import timezone
from django.utils.module_loading import import_string
from kombu import Connection
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from core.models import Device, Heartbeat

HEARTBEAT = "beat"
# A heartbeat this many intervals old means beat, the broker or every worker stopped.
HEARTBEAT_STALE_INTERVALS = 5
BROKER_TIMEOUT_SECONDS = 3
CACHE_TIMEOUT_SECONDS = 3


@dataclass
class Check:
    ok: bool
    detail: str


@dataclass
class Health:
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())

    def as_dict(self) -> dict:
        return {
            "status": "ok" if self.ok else "failing",
            "failing": [name for name, check in self.checks.items() if not check.ok],
            "checks": {
                name: {"ok": check.ok, "detail": check.detail}
                for name, check in self.checks.items()
            },
        }


def heartbeat_record(*, at: datetime.datetime | None = None) -> None:
    """Records that the heartbeat ran now. Idempotent: one row, overwritten.

    One INSERT … ON CONFLICT statement: on SQLite a read that turns into a
    write inside a transaction fails at once with "database is locked" when a
    poll is writing, where a single write waits for it.
    """
    Heartbeat.objects.bulk_create(
        [Heartbeat(name=HEARTBEAT, at=at or timezone.now())],
        update_conflicts=True,
        unique_fields=["name"],
        update_fields=["at"],
    )


def _database() -> Check:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        return Check(False, f"the database does not answer: {exc}".strip())
    return Check(True, f"{connection.vendor} answers")


def _broker() -> Check:
    url = settings.CELERY_BROKER_URL
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
    # The URL may hold a password: it is never shown, only its transport.
    transport = url.split("://", 1)[0]
    try:
        with Connection(
            url, connect_timeout=BROKER_TIMEOUT_SECONDS, transport_options=options
        ) as broker:
            # The filesystem transport's URL names no host; its default stops
            # kombu warning about that at every check.
            broker.hostname = broker.hostname or "localhost"
            broker.ensure_connection(
                max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_SECONDS
            )
    except (KombuError, OSError) as exc:
        return Check(False, f"the {transport} broker cannot be reached: {exc.__class__.__name__}")
    return Check(True, f"the {transport} broker is reachable")


def _cache() -> Check:
    """Writes, reads back and deletes a key of its own in the cache the API's
    request limits use (settings.CACHES["default"])."""
    config = settings.CACHES["default"]
    backend = import_string(config["BACKEND"])
    options = dict(config.get("OPTIONS", {}))
    if issubclass(backend, RedisCache):
        # The URL may hold a password: it is never shown, only its scheme.
        kind = str(config["LOCATION"]).split("://", 1)[0]
        # A Redis that accepts connections but never answers fails the check
        # within seconds, whatever the API's own timeouts are.
        options.update(
            socket_connect_timeout=CACHE_TIMEOUT_SECONDS, socket_timeout=CACHE_TIMEOUT_SECONDS
        )
    else:
        kind = "file" if issubclass(backend, FileBasedCache) else backend.__name__
    key = f"health-{uuid.uuid4().hex}"
    try:
        # An instance of its own, for its timeouts; its connection closes with it.
        # The file cache makes its folder here.
        probe = backend(config.get("LOCATION", ""), {**config, "OPTIONS": options})
        probe.set(key, key, timeout=60)
        stored = probe.get(key)
        probe.delete(key)
    except (RedisError, OSError) as exc:
        # The kind of error, not its text: a Redis error's names the server's
        # address, a file error's the path.
        error = exc.__class__.__name__
        if isinstance(exc, OSError) and exc.strerror:
            error = f"{error} ({exc.strerror})"
        return Check(False, f"the {kind} cache does not work: {error}")
    if stored != key:
        return Check(False, f"the {kind} cache did not return a key just written to it")
    return Check(True, f"the {kind} cache stores and returns a key")


def _heartbeat(now: datetime.datetime) -> Check:
    at = Heartbeat.objects.filter(name=HEARTBEAT).values_list("at", flat=True).first()
    limit = datetime.timedelta(
        seconds=settings.HEARTBEAT_INTERVAL_SECONDS * HEARTBEAT_STALE_INTERVALS
    )
    if at is None:
        return Check(
            False,
            "no heartbeat yet: start beat (start_beat.sh) and a worker (start_worker.sh); "
            f"the first comes within {settings.HEARTBEAT_INTERVAL_SECONDS} s",
        )
    age = (now - at).total_seconds()
    if now - at > limit:
        return Check(
            False,
            f"the last heartbeat is {age:.0f} s old (more than {limit.total_seconds():.0f} s): "
            "beat, the broker or every worker has stopped",
        )
    return Check(True, f"the last heartbeat is {age:.0f} s old")


def device_overdue_q(*, now: datetime.datetime) -> Q:
    """Enabled devices overdue for a successful poll: none for more than
    DEVICE_OVERDUE_MINUTES. A device never polled counts from when it was
    added, so one just added is not overdue before its first polls were due.
    The /health/ check and the status page (core.status) both select with it."""
    cutoff = now - datetime.timedelta(minutes=settings.DEVICE_OVERDUE_MINUTES)
    return Q(enabled=True) & (
        Q(last_success_at__lt=cutoff) | Q(last_success_at__isnull=True, created_at__lt=cutoff)
    )


def _devices(now: datetime.datetime) -> Check:
    overdue = list(Device.objects.filter(device_overdue_q(now=now)).values_list("name", flat=True))
    if overdue:
        return Check(
            False,
            f"{len(overdue)} device(s) without a successful poll for more than "
            f"{settings.DEVICE_OVERDUE_MINUTES:g} minutes: {', '.join(overdue)}",
        )
    return Check(True, "every enabled device was polled successfully in time")


def health_check() -> Health:
    """Runs every check: database, broker, cache, heartbeat, overdue devices. Reads
    only, but for a short-lived key of its own in the cache; never raises for a failing part, which is reported as a failing check."""
    now = timezone.now()
    health = Health()
    health.checks["database"] = _database()
    health.checks["broker"] = _broker()
    health.checks["cache"] = _cache()
    if health.checks["database"].ok:
        health.checks["heartbeat"] = _heartbeat(now)
        health.checks["devices"] = _devices(now)
    else:
        skipped = Check(False, "not checked: the database does not answer")
        health.checks["heartbeat"] = skipped
        health.checks["devices"] = skipped
    return health
