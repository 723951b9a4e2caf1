"""Records out: delivery of ProcessedAttendance rows (and, with CRM_PUNCHES_URL,
raw punches) to the CRM.

A row is due when processing (or HR) wrote a new version of it: sync_state
pending. A run claims batches of up to CRM_BATCH_SIZE due rows, each under an
idempotency key derived from their ids and versions (content_key), POSTs them
outside any database transaction, and then books the answer:
only rows still at the version that was sent become synced; a row recomputed
while its batch was in flight stays pending and goes again.

Why this loses nothing and doubles nothing:

- Claiming is one conditional write (SELECT … FOR UPDATE SKIP LOCKED and an
  UPDATE on PostgreSQL, up to CLAIM_BATCHES batches at once; a single
  UPDATE … WHERE unclaimed on SQLite), so two runs never hold the same row.
  The claim stores each batch's key, the version and a lease.
- A run that dies after its POST leaves the claim behind. Once the lease is
  over, the next run sends that batch again under the same key, without the
  rows that changed since (a CRM that honours the key would answer the first
  request's result and skip their new version); those go in a new batch.
- The CRM upserts by external_id and ignores a version older than the one it
  holds (docs/crm-contract.md), so sending a row twice is harmless.

Raw punches go through the same claim, request and booking code (a `_Queue`
each): a punch gets a PunchDelivery row when a run registers it
(_punches_register explains which punches can be new), and that row is
delivered as a daily record is, one device per request.

Destinations plug in through the small `Destination` interface; the JSON
contract (`JsonContractDestination`) is the one shipped. The pull feed
(crm_changes) serves the same records to CRMs that fetch."""

import base64
import binascii
import datetime
import email.utils
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import requests
from django.conf import settings
from django.db import connection, connections, transaction
from django.db.models import Count, DateTimeField, F, Func, Max, Min, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from core import metrics
from core.models import (
    DeliveryLog,
    Device,
    Employee,
    ProcessedAttendance,
    ProcessedAttendanceVersion,
    ProcessingState,
    PunchDelivery,
    RawAttendance,
)

logger = logging.getLogger(__name__)

State = ProcessedAttendance.SyncState
Outcome = DeliveryLog.Outcome

# How much of an answer the delivery log and a rejected row keep.
EXCERPT_CHARS = 500
# Transient answers: the CRM or the network may do better in a moment.
TRANSIENT_STATUSES = {408, 425, 429}
# Rows of one stale batch sent again per run before new work; bounds the loop.
MAX_STALE_BATCHES_PER_RUN = 100
# Batches claimed by one statement (PostgreSQL): fewer database round trips,
# and a lease as many times longer, since they are sent one after the other.
CLAIM_BATCHES = 10


class CrmError(Exception):
    """Delivery cannot run as configured; the message says what to fix."""


class CrmConfigError(CrmError):
    pass


# --- The destination interface ---------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What came back from one request: a status, or the error that replaced it."""

    status: int | None
    body: str = ""
    error: str = ""
    retry_after: float | None = None
    duration_ms: int = 0

    @property
    def excerpt(self) -> str:
        return self.body[:EXCERPT_CHARS]

    def describe(self) -> str:
        if self.status is None:
            return self.error
        text = f"HTTP {self.status}"
        return f"{text}: {self.excerpt}" if self.body else text


class Destination(Protocol):
    """Where records go. `send` delivers a list of contract records (see
    `render_records`, or `render_punches` with the `envelope` that names their
    device) under an idempotency key and returns the answer without raising
    for network trouble; `check` proves reachability and credentials
    without changing data; `preview` shows the request `send` would make."""

    label: str

    def send(self, *, records: list[dict], key: str, envelope: dict | None = None) -> Answer: ...

    def check(self) -> Answer: ...

    def preview(self, *, records: list[dict], key: str, envelope: dict | None = None) -> str: ...

    def close(self) -> None: ...


class JsonContractDestination:
    """The JSON contract of docs/crm-contract.md over HTTPS, with one pooled Session."""

    def __init__(
        self,
        *,
        url: str,
        token: str = "",
        auth_scheme: str = "Token",
        signing_secret: str = "",
        connect_timeout: float = 5,
        read_timeout: float = 30,
        ca_bundle: str = "",
        bridge_name: str = "attendance-bridge",
    ):
        self.url = url
        self.label = url
        self.token = token
        self.auth_scheme = auth_scheme
        self.signing_secret = signing_secret
        self.timeout = (connect_timeout, read_timeout)
        self.bridge_name = bridge_name
        self.session = requests.Session()
        # TLS is always verified; a company CA replaces the public ones.
        self.session.verify = ca_bundle or True
        self.session.headers.update(
            {"Content-Type": "application/json", "Accept": "application/json"}
        )
        if token:
            self.session.headers["Authorization"] = f"{auth_scheme} {token}"
        # The environment (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE) is read once
        # here instead of at every request, where it cost a millisecond each.
        environment = self.session.merge_environment_settings(
            url, {}, None, self.session.verify, None
        )
        self.session.proxies.update(environment["proxies"])
        self.session.verify = environment["verify"]
        self.session.trust_env = False

    @classmethod
    def from_settings(cls, *, punches: bool = False) -> "JsonContractDestination":
        """The daily records' destination (CRM_API_URL), or with `punches` the raw
        punches' (CRM_PUNCHES_URL), with the same credentials. Raises
        CrmConfigError when that push is off or a file it names cannot be read."""
        url = settings.CRM_PUNCHES_URL if punches else settings.CRM_API_URL
        if not url:
            raise CrmConfigError(
                "Raw punch export is off: CRM_PUNCHES_URL is not set."
                if punches
                else "Push to the CRM is off: CRM_API_URL is not set."
            )
        token = settings.CRM_API_TOKEN
        if settings.CRM_API_TOKEN_FILE:
            try:
                token = Path(settings.CRM_API_TOKEN_FILE).read_text().strip()
            except OSError as exc:
                raise CrmConfigError(
                    f"Cannot read CRM_API_TOKEN_FILE {settings.CRM_API_TOKEN_FILE}: "
                    f"{exc.strerror or exc}."
                ) from exc
            if not token:
                raise CrmConfigError(f"CRM_API_TOKEN_FILE {settings.CRM_API_TOKEN_FILE} is empty.")
        if settings.CRM_CA_BUNDLE and not Path(settings.CRM_CA_BUNDLE).is_file():
            raise CrmConfigError(f"CRM_CA_BUNDLE {settings.CRM_CA_BUNDLE} is not a file.")
        return cls(
            url=url,
            token=token,
            auth_scheme=settings.CRM_AUTH_SCHEME,
            signing_secret=settings.CRM_SIGNING_SECRET,
            connect_timeout=settings.CRM_CONNECT_TIMEOUT_SECONDS,
            read_timeout=settings.CRM_READ_TIMEOUT_SECONDS,
            ca_bundle=settings.CRM_CA_BUNDLE,
            bridge_name=settings.CRM_BRIDGE_NAME,
        )

    def body(self, records: list[dict], envelope: dict | None = None) -> bytes:
        if envelope is None:
            envelope = {
                "source": {"bridge": self.bridge_name, "sent_at": timezone.now().isoformat()}
            }
        return json.dumps(
            {**envelope, "records": records}, separators=(",", ":"), ensure_ascii=False
        ).encode()

    def headers(self, *, body: bytes, key: str) -> dict[str, str]:
        headers = {"Idempotency-Key": key}
        if self.signing_secret:
            stamp = str(int(time.time()))
            headers["X-Signature-Timestamp"] = stamp
            headers["X-Signature"] = "sha256=" + sign(
                secret=self.signing_secret, timestamp=stamp, body=body
            )
        return headers

    def send(self, *, records: list[dict], key: str, envelope: dict | None = None) -> Answer:
        return self._post(self.body(records, envelope), key)

    def check(self) -> Answer:
        # An empty batch: the contract says it changes nothing and answers 2xx
        # when the credentials are good.
        return self._post(self.body([]), f"check-{uuid.uuid4().hex}")

    def preview(self, *, records: list[dict], key: str, envelope: dict | None = None) -> str:
        body = self.body(records, envelope)
        headers = {**self.session.headers, **self.headers(body=body, key=key)}
        if "Authorization" in headers:
            headers["Authorization"] = f"{self.auth_scheme} ****"
        lines = [f"POST {self.url}"] + [f"{name}: {value}" for name, value in headers.items()]
        return "\n".join(lines) + "\n\n" + json.dumps(json.loads(body), indent=2)

    def close(self) -> None:
        self.session.close()

    def _post(self, body: bytes, key: str) -> Answer:
        started = time.monotonic()
        try:
            response = self.session.post(
                self.url,
                data=body,
                headers=self.headers(body=body, key=key),
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            return Answer(None, error=f"No answer in time: {exc}", duration_ms=_ms(started))
        except requests.ConnectionError as exc:
            return Answer(None, error=f"Connection failed: {exc}", duration_ms=_ms(started))
        except requests.RequestException as exc:
            return Answer(None, error=f"Request failed: {exc}", duration_ms=_ms(started))
        return Answer(
            response.status_code,
            body=response.text[: EXCERPT_CHARS * 4],
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            duration_ms=_ms(started),
        )


def sign(*, secret: str, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of timestamp + "." + body: the contract's X-Signature."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return max(0.0, (moment - timezone.now()).total_seconds())


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


# --- Records as the contract writes them ------------------------------------------------

_RECORD_FIELDS = (
    "pk",
    "user_id",
    "work_date",
    "version",
    "clock_in",
    "clock_out",
    "punch_count",
    "worked",
    "is_outlier",
    "outlier_reasons",
    "is_manual",
    "employee__name",
    "clock_in_device__name",
    "clock_in_device__timezone",
    "clock_out_device__name",
    "clock_out_device__timezone",
    "resend_count",
)


def render_records(rows: Iterable[dict]) -> list[dict]:
    """Contract records from `_RECORD_FIELDS` values; each time in its own device's zone."""
    zones: dict[str, ZoneInfo] = {}

    def zone(name: str | None) -> ZoneInfo:
        name = name or settings.DEVICE_DEFAULT_TIMEZONE
        if name not in zones:
            zones[name] = ZoneInfo(name)
        return zones[name]

    records = []
    for row in rows:
        in_zone = zone(row["clock_in_device__timezone"])
        out_zone = (
            zone(row["clock_out_device__timezone"])
            if row["clock_out_device__timezone"]
            else in_zone
        )
        worked = row["worked"]
        records.append(
            {
                "external_id": f"{row['user_id']}:{row['work_date'].isoformat()}",
                "version": row["version"],
                "user_id": row["user_id"],
                "employee_name": row["employee__name"] or "",
                "work_date": row["work_date"].isoformat(),
                "clock_in": row["clock_in"].astimezone(in_zone).isoformat()
                if row["clock_in"]
                else None,
                "clock_out": row["clock_out"].astimezone(out_zone).isoformat()
                if row["clock_out"]
                else None,
                "clock_in_device": row["clock_in_device__name"],
                "clock_out_device": row["clock_out_device__name"],
                "punch_count": row["punch_count"],
                "worked_minutes": None if worked is None else int(worked.total_seconds() // 60),
                "is_outlier": row["is_outlier"],
                "outlier_reasons": [reason["code"] for reason in row["outlier_reasons"] or []],
                "is_manual": row["is_manual"],
            }
        )
    return records


# --- Raw punches as the punch contract writes them -------------------------------------

_PUNCH_FIELDS = (
    "pk",
    "version",
    "resend_count",
    "raw__user_id",
    "raw__timestamp",
    "raw__punch_state",
    "raw__device_id",
    "raw__device__name",
    "raw__device__timezone",
    "raw__device__serial_number",
    "raw__device__ip_address",
    "raw__device__port",
)

# RawAttendance.punch_state as the punch contract names it; any other value
# (255, undefined on the device) is "Undefined".
PUNCH_TYPES = {
    0: "Check In",
    1: "Check Out",
    2: "Break Out",
    3: "Break In",
    4: "Overtime In",
    5: "Overtime Out",
}


def render_punches(rows: list[dict]) -> list[dict]:
    """Punch contract records from `_PUNCH_FIELDS` values, in the device's zone.

    Employee names come from one query for the whole list.
    """
    names = dict(
        Employee.objects.filter(user_id__in={row["raw__user_id"] for row in rows}).values_list(
            "user_id", "name"
        )
    )
    zones: dict[str, ZoneInfo] = {}
    records = []
    for row in rows:
        name = row["raw__device__timezone"] or settings.DEVICE_DEFAULT_TIMEZONE
        if name not in zones:
            zones[name] = ZoneInfo(name)
        local = row["raw__timestamp"].astimezone(zones[name])
        records.append(
            {
                "employee_id": row["raw__user_id"],
                "employee_name": names.get(row["raw__user_id"], ""),
                "timestamp": local.isoformat(),
                "date": local.date().isoformat(),
                "time": local.strftime("%H:%M:%S"),
                "punch_type": PUNCH_TYPES.get(row["raw__punch_state"], "Undefined"),
                "device": row["raw__device__name"],
            }
        )
    return records


def punch_envelope(rows: list[dict]) -> dict:
    """The punch contract's device_info for a batch (one device per batch)."""
    row = rows[0]
    return {
        "device_info": {
            "name": row["raw__device__name"],
            "serial_number": row["raw__device__serial_number"],
            "ip": row["raw__device__ip_address"],
            "port": row["raw__device__port"],
            "export_time": timezone.now().isoformat(),
        }
    }


# --- What is delivered: daily records, raw punches ---------------------------------------


class _UtcTimestamp(Func):
    """A timestamptz column as the UTC timestamp without zone (PostgreSQL)."""

    template = "(%(expressions)s AT TIME ZONE 'UTC')"
    output_field = DateTimeField()


class _AwareValues:
    """A values() queryset of `_UtcTimestamp` aliases utc_0, utc_1…: slices and
    iterates as that queryset, each dict with the times back under their field
    names, aware in UTC."""

    def __init__(self, rows, *, times: tuple[str, ...]):
        self.rows, self.times = rows, times

    def __getitem__(self, index):
        return _AwareValues(self.rows[index], times=self.times)

    def __iter__(self):
        names = list(enumerate(self.times))
        for row in self.rows:
            for n, name in names:
                value = row.pop(f"utc_{n}")
                row[name] = None if value is None else value.replace(tzinfo=datetime.UTC)
            yield row


@dataclass(frozen=True)
class _Queue:
    """A model whose rows are delivered by the machinery below: they carry the
    same delivery fields (sync_state, version, delivery_key, …)."""

    model: type
    fields: tuple[str, ...]
    render: Callable[[list[dict]], list[dict]]
    # One request carries rows of one group only (a device, for punches).
    group_field: str | None
    # Tells this queue's idempotency keys from another's with the same ids.
    key_salt: str
    envelope: Callable[[list[dict]], dict | None]
    sync_from: Callable[[object, datetime.date], object]
    # Date-time fields among `fields` (read as UTC timestamps on PostgreSQL).
    times: tuple[str, ...] = ()

    def due(self, *, sync_from: datetime.date | None):
        # Every writer of a pending row clears next_sync_at (processing, HR edits,
        # crm_retry_failed, the admin's actions); only failed rows carry one. An
        # OR on it made PostgreSQL scan a bitmap of every pending row.
        rows = self.model.objects.filter(
            sync_state=State.PENDING, next_sync_at__isnull=True, delivery_key=""
        )
        if sync_from is not None:
            rows = self.sync_from(rows, sync_from)
        return rows

    def values(self, rows, *extra: str):
        """`rows.values(*fields, *extra)`; the dicts come with aware UTC times.

        On PostgreSQL the times are read as UTC timestamps without a zone
        (`_UtcTimestamp`) and made aware in Python: Django's loader of
        timestamptz parses each one in Python, and took most of reading a batch.
        """
        if connection.vendor != "postgresql":
            return rows.values(*self.fields, *extra)
        plain = [name for name in self.fields if name not in self.times]
        aliases = {f"utc_{n}": _UtcTimestamp(name) for n, name in enumerate(self.times)}
        return _AwareValues(rows.values(*plain, *extra, **aliases), times=self.times)

    def records(self, rows: list[dict]) -> list[dict]:
        return self.render(rows) if rows else []

    def group(self, row: dict) -> object:
        return row[self.group_field] if self.group_field else None

    def key(self, rows: list[dict]) -> str:
        return content_key(rows, salt=self.key_salt)


DAILY = _Queue(
    model=ProcessedAttendance,
    fields=_RECORD_FIELDS,
    render=render_records,
    group_field=None,
    key_salt="",
    envelope=lambda rows: None,
    sync_from=lambda rows, day: rows.filter(work_date__gte=day),
    times=("clock_in", "clock_out"),
)
# CRM_SYNC_FROM is applied when punches are registered (_punches_register).
PUNCHES = _Queue(
    model=PunchDelivery,
    fields=_PUNCH_FIELDS,
    render=render_punches,
    group_field="raw__device_id",
    key_salt="punches",
    envelope=punch_envelope,
    sync_from=lambda rows, day: rows,
    times=("raw__timestamp",),
)


# --- Results -----------------------------------------------------------------------------


@dataclass
class SyncResult:
    sent: int = 0
    failed: int = 0
    rejected: int = 0
    # Rows acknowledged at a version that was replaced while in flight: due again.
    superseded: int = 0
    batches: int = 0
    requests: int = 0
    # Batches a dead run left in flight, sent again under their own key.
    replayed_batches: int = 0
    seconds: float = 0.0
    # Raw punches only: punches newly given a delivery row this run.
    registered: int = 0
    # Why the run ended before its work did; empty when it did not.
    stopped: str = ""
    # True when the CRM refused the credentials (401/403): nothing can go.
    credentials_refused: bool = False

    def lines(self) -> list[str]:
        lines = [
            f"sent {self.sent}, failed {self.failed}, rejected {self.rejected} "
            f"in {self.batches} batches, {self.requests} requests, {self.seconds:.2f} s"
        ]
        if self.registered:
            lines.append(f"{self.registered} punches new since the last run")
        if self.superseded:
            lines.append(f"{self.superseded} changed while in flight and will be sent again")
        if self.replayed_batches:
            lines.append(
                f"{self.replayed_batches} batches left in flight by an earlier run sent again"
            )
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        return lines


@dataclass
class _Config:
    batch_size: int
    max_retries: int
    backoff: float
    max_wait: float
    lease: datetime.timedelta
    retry_failed_after: datetime.timedelta
    sync_from: datetime.date | None
    sleep: Callable[[float], None]
    pacer: "_Pacer"
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def load(cls, *, sleep: Callable[[float], None], batch_size: int | None) -> "_Config":
        max_retries = settings.CRM_MAX_RETRIES
        max_wait = settings.CRM_RETRY_MAX_WAIT_SECONDS
        per_request = settings.CRM_CONNECT_TIMEOUT_SECONDS + settings.CRM_READ_TIMEOUT_SECONDS
        pacing = (
            60 / settings.CRM_MAX_REQUESTS_PER_MINUTE if settings.CRM_MAX_REQUESTS_PER_MINUTE else 0
        )
        # Long enough for a batch's every attempt and wait, and its fallback to
        # single records is re-leased per record, so a live run never loses it.
        lease = (max_retries + 1) * (per_request + pacing) + max_retries * max_wait + 60
        return cls(
            batch_size=batch_size or settings.CRM_BATCH_SIZE,
            max_retries=max_retries,
            backoff=settings.CRM_RETRY_BACKOFF_SECONDS,
            max_wait=max_wait,
            lease=datetime.timedelta(seconds=lease),
            retry_failed_after=datetime.timedelta(hours=settings.RETRY_FAILED_SYNCS_HOURS),
            sync_from=settings.CRM_SYNC_FROM,
            sleep=sleep,
            pacer=_Pacer(settings.CRM_MAX_REQUESTS_PER_MINUTE, sleep),
        )


class _Pacer:
    """At most `per_minute` request starts a minute from this run (0: no limit)."""

    def __init__(self, per_minute: int, sleep: Callable[[float], None]):
        self.interval = 60 / per_minute if per_minute else 0.0
        self.sleep = sleep
        self.next_start = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if now < self.next_start:
            self.sleep(self.next_start - now)
            now = self.next_start
        self.next_start = now + self.interval


# --- Claiming ----------------------------------------------------------------------------


def _due(*, sync_from: datetime.date | None):
    return DAILY.due(sync_from=sync_from)


def _claim(
    *, limit: int, config: _Config, batches: int = 1, queue: _Queue = DAILY
) -> list[tuple[str, list[dict], list[dict]]]:
    """Claims up to `batches` batches of due rows, `limit` rows in all; returns
    each batch's key, rows and records, oldest id first; [] when none is due.

    A batch's key is its content's (content_key), written on its rows before
    any request, so a run that dies after a POST is followed by one that
    resends that batch under the same key. The lease covers every batch of
    the claim, sent one after the other.
    """
    now = timezone.now()
    # No ORDER BY: sorting every due row (with its joins) to take 100 cost
    # more than the rest of a batch; the index hands them out in its order.
    due = queue.due(sync_from=config.sync_from).order_by()
    lease_until = now + config.lease * batches
    if connection.features.has_select_for_update_skip_locked:
        # Rows locked here are skipped by another run's claim, and cannot
        # change before the keys naming their versions are written. Several
        # batches in one SELECT and one UPDATE: a claim per batch cost more
        # database round trips than the batch's request.
        with _bookkeeping():
            rows = list(queue.values(due.select_for_update(skip_locked=True, of=("self",)))[:limit])
            if not rows:
                return []
            rows.sort(key=lambda row: (queue.group(row) or 0, row["pk"]))
            chunks = _chunks(rows, size=config.batch_size, group=queue.group)
            keys = [queue.key(chunk) for chunk in chunks]
            ids = [row["pk"] for row in rows]
            row_keys = [key for key, chunk in zip(keys, chunks, strict=True) for _ in chunk]
            model = queue.model._meta
            table = connection.ops.quote_name(model.db_table)
            pk = connection.ops.quote_name(model.pk.column)
            with connection.cursor() as cursor:
                # Also tells processing the CRM may have seen the row (last_sync_attempt):
                # it then empties a vanished day instead of deleting it.
                cursor.execute(
                    f"UPDATE {table} AS p SET delivery_key = v.key, delivery_version = p.version, "
                    "delivery_lease_until = %s, last_sync_attempt = %s "
                    # Lists as one string each: psycopg quotes a list element by element.
                    "FROM unnest(string_to_array(%s, ',')::bigint[], string_to_array(%s, ',')) "
                    f"AS v(id, key) WHERE p.{pk} = v.id",
                    [lease_until, now, ",".join(map(str, ids)), ",".join(row_keys)],
                )
        records = iter(queue.records(rows))
        return [
            (key, chunk, [next(records) for _ in chunk])
            for key, chunk in zip(keys, chunks, strict=True)
        ]
    # SQLite: one UPDATE whose WHERE re-checks that the rows are unclaimed;
    # SQLite runs one writer at a time, so no other run can claim between.
    token = f"claim-{uuid.uuid4().hex}"
    if queue.group_field:
        first = due.order_by("pk").values(queue.group_field).first()
        if first is None:
            return []
        due = due.filter(**{queue.group_field: queue.group(first)})
    claimed = queue.model.objects.filter(
        pk__in=due.values("pk")[: min(limit, config.batch_size)], delivery_key=""
    ).update(
        delivery_key=token,
        delivery_version=F("version"),
        delivery_lease_until=now + config.lease,
        last_sync_attempt=now,
    )
    if not claimed:
        return []
    rows = _claimed(token, queue=queue)
    if not rows:
        return []
    key = queue.key(rows)
    queue.model.objects.filter(delivery_key=token).update(delivery_key=key)
    return [(key, rows, queue.records(rows))]


def _chunks(rows: list[dict], *, size: int, group: Callable[[dict], object]) -> list[list[dict]]:
    """Batches of at most `size` rows, each of one group; rows sorted by group."""
    chunks: list[list[dict]] = []
    for row in rows:
        if chunks and len(chunks[-1]) < size and group(chunks[-1][0]) == group(row):
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


def _reclaim_stale(*, config: _Config, queue: _Queue = DAILY) -> str | None:
    """Takes over a batch whose run died (lease over) and keeps its key.

    Rows changed since that batch was claimed are released to go in a new
    batch: under the old key, a CRM would answer the first request's result.
    """
    now = timezone.now()
    stale = queue.model.objects.exclude(delivery_key="").filter(delivery_lease_until__lt=now)
    for key in stale.order_by().values_list("delivery_key", flat=True).distinct()[:5]:
        # Conditional on the lease still being over: of two runs, one wins.
        taken = queue.model.objects.filter(delivery_key=key, delivery_lease_until__lt=now).update(
            delivery_lease_until=now + config.lease
        )
        if not taken:
            continue
        _release(
            queue.model.objects.filter(delivery_key=key).exclude(version=F("delivery_version"))
        )
        if queue.model.objects.filter(delivery_key=key).exists():
            return key
    return None


# Set while a run has turned synchronous_commit off for its whole session.
_SESSION_ASYNC_COMMIT: ContextVar[bool] = ContextVar("crm_session_async_commit", default=False)


@contextmanager
def _bookkeeping():
    """A transaction for delivery bookkeeping that does not wait for the disk.

    On PostgreSQL the commit returns before its WAL is flushed (synchronous_commit
    off, this transaction only): a database crash can lose the last commits,
    and for delivery that costs at most a resend under the same key, never a
    row. Waiting for the disk three times a batch cost a third of the throughput.
    """
    with transaction.atomic():
        if connection.vendor == "postgresql" and not _SESSION_ASYNC_COMMIT.get():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield


def _release(rows) -> int:
    return rows.update(delivery_key="", delivery_version=None, delivery_lease_until=None)


def _claimed(key: str, *, queue: _Queue = DAILY) -> list[dict]:
    """The rows claimed under `key`, at the version claimed.

    A row recomputed between the claim and this read is released to a later
    batch: what is sent must be the version the claim books.
    """
    rows = list(
        queue.values(
            queue.model.objects.filter(delivery_key=key).order_by("pk"), "delivery_version"
        )
    )
    moved = [row["pk"] for row in rows if row["version"] != row["delivery_version"]]
    if moved:
        _release(queue.model.objects.filter(pk__in=moved, delivery_key=key))
        rows = [row for row in rows if row["version"] == row["delivery_version"]]
    return rows


def content_key(rows: list[dict], *, salt: str = "") -> str:
    """The idempotency key of these rows at these versions, whatever the run.

    A batch sent again, even by a later run after its rows failed, goes under
    the key it first went under, so a CRM that honours keys stores it once.
    A Resend (resend_count) makes a new key: the CRM is asked again.
    """
    digest = hashlib.sha256(salt.encode())
    for row in sorted(rows, key=lambda r: r["pk"]):
        digest.update(f"{row['pk']}\x1f{row['version']}\x1f{row['resend_count']}\x1e".encode())
    return digest.hexdigest()


# --- Sending -----------------------------------------------------------------------------


def _classify(answer: Answer) -> str:
    status = answer.status
    if status is None or status in TRANSIENT_STATUSES or status >= 500:
        return Outcome.TRANSIENT
    if 200 <= status < 300:
        return Outcome.ACKNOWLEDGED
    if status in (401, 403):
        return Outcome.CREDENTIALS
    return Outcome.REFUSED


def _request(
    destination: Destination,
    *,
    records: list[dict],
    key: str,
    config: _Config,
    result: SyncResult,
    envelope: dict | None = None,
    first: Answer | None = None,
) -> tuple[str, Answer, int, str, DeliveryLog | None]:
    """Sends one request, retrying transient failures with backoff and jitter.

    `first`, when given, is the answer to a first attempt already made (by the
    sender of a pipelined run). Returns (outcome, last answer, attempts, why it
    gave up on a transient failure, the last attempt's log entry when not yet
    written). Each attempt that is retried is logged at once; the last one is
    written by the caller in the transaction that books its answer
    (`_save_log` or `_book`), one commit instead of two.
    """
    for attempt in range(1, config.max_retries + 2):
        if attempt == 1 and first is not None:
            answer = first
        else:
            _before_request(config)
            answer = _send(destination, records=records, key=key, envelope=envelope)
        result.requests += 1
        outcome = _classify(answer)
        log = DeliveryLog(
            destination=destination.label[:200],
            idempotency_key=key,
            attempt=attempt,
            records=len(records),
            external_ids=" ".join(_log_id(record) for record in records[:5]),
            status_code=answer.status,
            outcome=outcome,
            duration_ms=answer.duration_ms,
            response_excerpt=answer.excerpt,
            error=answer.error,
        )
        if outcome != Outcome.TRANSIENT:
            return outcome, answer, attempt, "", log
        if attempt > config.max_retries:
            return outcome, answer, attempt, f"{attempt} attempts", log
        _save_log(log)
        wait = min(config.max_wait, config.backoff * 2 ** (attempt - 1))
        wait *= config.rng.uniform(0.5, 1.0)
        if answer.retry_after is not None:
            if answer.retry_after > config.max_wait:
                return (
                    outcome,
                    answer,
                    attempt,
                    f"the CRM asked to wait {answer.retry_after:g} s, more than "
                    f"CRM_RETRY_MAX_WAIT_SECONDS ({config.max_wait:g})",
                    log,
                )
            wait = max(wait, answer.retry_after)
        config.sleep(wait)
    raise AssertionError("unreachable")


def _before_request(config: _Config) -> None:
    """Refuses a request from inside a transaction (it would hold its locks for as
    long as the CRM takes), then waits for the pacing."""
    if connection.in_atomic_block:
        raise RuntimeError("A CRM request inside a database transaction would hold locks.")
    config.pacer.wait()


def _send(
    destination: Destination, *, records: list[dict], key: str, envelope: dict | None
) -> Answer:
    # Only punches carry an envelope: a destination of daily records alone
    # keeps the two-argument send.
    if envelope is None:
        return destination.send(records=records, key=key)
    return destination.send(records=records, key=key, envelope=envelope)


def _log_id(record: dict) -> str:
    """How the delivery log names a record: its external id, or a punch's employee and time."""
    return record.get("external_id") or f"{record['employee_id']}@{record['timestamp']}"


def _save_log(log: DeliveryLog | None) -> None:
    if log is not None:
        with _bookkeeping():
            log.save()


def _book(
    rows,
    *,
    state: str,
    answer: Answer,
    attempts: int,
    error: str = "",
    next_sync_at: datetime.datetime | None = None,
    claimed: int | None = None,
    log: DeliveryLog | None = None,
) -> tuple[int, int]:
    """Books an answer on claimed rows; returns (rows booked, rows changed in flight).

    Only rows still at the version that was sent take the new state; the rest
    are released as they are (pending: processing made them due again).
    `claimed`, when known, saves looking for the rest when there is none.
    `log`, the answer's delivery log entry, is written in the same transaction.
    """
    values = {
        "sync_attempts": F("sync_attempts") + attempts,
        "last_sync_error": error,
        "crm_status": answer.status,
        "crm_response": answer.excerpt,
        "next_sync_at": next_sync_at,
        "delivery_key": "",
        "delivery_version": None,
        "delivery_lease_until": None,
    }
    if state == State.SYNCED:
        values["synced_version"] = F("delivery_version")
    if connection.vendor == "postgresql" and not connection.in_atomic_block:
        return _book_in_one_statement(
            rows,
            state=state,
            attempts=attempts,
            set_values={
                "last_sync_error": error,
                "crm_status": answer.status,
                "crm_response": answer.excerpt,
                "next_sync_at": next_sync_at,
            },
            log=log,
        )
    with _bookkeeping():
        if log is not None:
            log.save()
        booked = rows.filter(version=F("delivery_version")).update(sync_state=state, **values)
        metrics.counter_add(counts=[(_counter_name(rows.model), 0, _COUNTED_AS[state], booked)])
        if booked == claimed:
            return booked, 0
        # Changed in flight: the version sent is what the CRM holds, if it holds
        # anything. A row resent in flight no longer says which (_resend).
        moved = {"delivery_key": "", "delivery_version": None, "delivery_lease_until": None}
        if state == State.SYNCED:
            moved["synced_version"] = Coalesce(F("delivery_version"), F("synced_version"))
        changed = rows.update(**moved)
    return booked, changed


# The /metrics outcome a booking adds its rows to.
_COUNTED_AS = {State.SYNCED: "sent", State.FAILED: "failed", State.REJECTED: "rejected"}


def _counter_name(model) -> str:
    return metrics.DELIVERED_PUNCHES if model is PunchDelivery else metrics.DELIVERED_DAILY


def _book_in_one_statement(
    rows, *, state: str, attempts: int, set_values: dict, log: DeliveryLog | None
) -> tuple[int, int]:
    """`_book` on PostgreSQL: the log entry, the booking, its rows added to the
    totals of /metrics and the release of rows changed in flight in one
    statement, its own transaction: one round trip instead of six, for each of
    the hundred bookings of 10 000 records.

    The release takes every claimed row the booking did not (by id, not by
    version), so a row whose new version commits while the statement waits
    for its lock is released, not left claimed."""
    quote = connection.ops.quote_name
    meta = rows.model._meta
    table = quote(meta.db_table)
    pk = quote(meta.pk.column)
    claimed_sql, claimed_params = rows.order_by().values("pk").query.sql_with_params()
    assignments = [f"{quote(name)} = %s" for name in set_values]
    params = [
        meta.get_field(name).get_db_prep_save(value, connection)
        for name, value in set_values.items()
    ]
    assignments += [
        "sync_state = %s",
        "sync_attempts = sync_attempts + %s",
        "delivery_key = ''",
        "delivery_version = NULL",
        "delivery_lease_until = NULL",
    ]
    params += [state, attempts]
    if state == State.SYNCED:
        assignments.append("synced_version = delivery_version")
    released = ["delivery_key = ''", "delivery_version = NULL", "delivery_lease_until = NULL"]
    if state == State.SYNCED:
        released.append("synced_version = COALESCE(delivery_version, synced_version)")
    log_sql, log_params = "", []
    if log is not None:
        fields = [field for field in DeliveryLog._meta.concrete_fields if not field.primary_key]
        log_sql = (
            f"log AS (INSERT INTO {quote(DeliveryLog._meta.db_table)} "
            f"({', '.join(quote(field.column) for field in fields)}) "
            f"VALUES ({', '.join(['%s'] * len(fields))})), "
        )
        log_params = [
            field.get_db_prep_save(getattr(log, field.attname), connection) for field in fields
        ]
    sql = (
        f"WITH {log_sql}"
        f"booked AS (UPDATE {table} SET {', '.join(assignments)} "
        f"WHERE {pk} IN ({claimed_sql}) AND version = delivery_version RETURNING {pk}), "
        f"moved AS (UPDATE {table} SET {', '.join(released)} "
        f"WHERE {pk} IN ({claimed_sql}) AND {pk} NOT IN (SELECT {pk} FROM booked) "
        f"RETURNING {pk}), "
        f"counted AS ({metrics.COUNTER_UPSERT_SELECT} FROM booked "
        f"{metrics.COUNTER_ON_CONFLICT}) "
        "SELECT (SELECT count(*) FROM booked), (SELECT count(*) FROM moved)"
    )
    counted = [_counter_name(rows.model), 0, _COUNTED_AS[state]]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*log_params, *params, *claimed_params, *claimed_params, *counted])
        booked, changed = cursor.fetchone()
    return booked, changed


def _deliver(
    destination: Destination,
    *,
    key: str,
    rows: list[dict],
    records: list[dict],
    config: _Config,
    result: SyncResult,
    queue: _Queue = DAILY,
    envelope: dict | None = None,
    first: Answer | None = None,
) -> list[dict]:
    """Sends these rows, claimed under `key`, and books the answer; returns the
    records sent. `first`: the answer to a first attempt already made, with
    the `envelope` it carried."""
    if not records:
        return records
    claimed = queue.model.objects.filter(delivery_key=key)
    if first is None:
        envelope = queue.envelope(rows)
    before = (result.sent, result.failed, result.rejected, result.requests)
    outcome, answer, attempts, why, log = _request(
        destination,
        records=records,
        key=key,
        config=config,
        result=result,
        envelope=envelope,
        first=first,
    )
    result.batches += 1
    if outcome == Outcome.ACKNOWLEDGED:
        booked, changed = _book(
            claimed,
            state=State.SYNCED,
            answer=answer,
            attempts=attempts,
            claimed=len(records),
            log=log,
        )
        result.sent += booked
        result.superseded += changed
    elif outcome == Outcome.TRANSIENT:
        _fail(
            claimed,
            answer=answer,
            attempts=attempts,
            why=why,
            config=config,
            result=result,
            log=log,
        )
    elif outcome == Outcome.CREDENTIALS:
        _save_log(log)
        _stop_for_credentials(claimed, answer=answer, result=result)
    elif 300 <= (answer.status or 0) < 400:
        _save_log(log)
        _release(claimed)
        result.stopped = (
            f"the CRM answered HTTP {answer.status} (a redirect); set CRM_API_URL to the "
            "address it names. Nothing was changed."
        )
    else:
        _save_log(log)
        _one_by_one(
            destination,
            key=key,
            rows=rows,
            records=records,
            config=config,
            result=result,
            queue=queue,
            envelope=envelope,
        )
    _count_batch(queue, key=key, records=len(records), before=before, result=result)
    return records


def _count_batch(
    queue: _Queue, *, key: str, records: int, before: tuple[int, ...], result: SyncResult
) -> None:
    """The batch's log line. Its outcomes are added to the totals of /metrics
    by the bookings themselves (_book), in the same transaction."""
    sent, failed, rejected, requests = (
        now - then
        for now, then in zip(
            (result.sent, result.failed, result.rejected, result.requests), before, strict=True
        )
    )
    kind = "punch" if queue is PUNCHES else "daily"
    logger.info(
        "CRM delivery of a %s batch (key %s): %d records, %d sent, %d failed, %d rejected "
        "in %d request(s)%s",
        kind,
        key[:12],
        records,
        sent,
        failed,
        rejected,
        requests,
        f"; stopped: {result.stopped}" if result.stopped else "",
    )


def _fail(
    rows,
    *,
    answer: Answer,
    attempts: int,
    why: str,
    config: _Config,
    result: SyncResult,
    log: DeliveryLog | None = None,
):
    wait = max(config.retry_failed_after.total_seconds(), answer.retry_after or 0)
    error = f"{answer.describe()} (gave up after {why})"
    booked, changed = _book(
        rows,
        state=State.FAILED,
        answer=answer,
        attempts=attempts,
        error=error,
        next_sync_at=timezone.now() + datetime.timedelta(seconds=wait),
        log=log,
    )
    result.failed += booked
    result.superseded += changed
    # The next batches would meet the same outage; they stay pending.
    result.stopped = f"the CRM is unavailable: {error}"


def _stop_for_credentials(rows, *, answer: Answer, result: SyncResult) -> None:
    _release(rows)
    result.credentials_refused = True
    result.stopped = (
        f"the CRM refused the credentials (HTTP {answer.status}): check CRM_API_TOKEN "
        "(or CRM_API_TOKEN_FILE), CRM_AUTH_SCHEME and CRM_SIGNING_SECRET. No row was changed."
    )


def _one_by_one(
    destination: Destination,
    *,
    key: str,
    rows: list[dict],
    records: list[dict],
    config: _Config,
    result: SyncResult,
    queue: _Queue = DAILY,
    envelope: dict | None = None,
) -> None:
    """A refused batch, record by record, so one bad record holds back no other."""
    for position, (row, record) in enumerate(zip(rows, records, strict=True)):
        single = queue.model.objects.filter(pk=row["pk"], delivery_key=key)
        single_key = queue.key([row])
        single.update(delivery_lease_until=timezone.now() + config.lease)
        outcome, answer, attempts, why, log = _request(
            destination,
            records=[record],
            key=single_key,
            config=config,
            result=result,
            envelope=envelope,
        )
        # The batch attempt counts too.
        attempts += 1
        if outcome == Outcome.ACKNOWLEDGED:
            booked, changed = _book(
                single, state=State.SYNCED, answer=answer, attempts=attempts, log=log
            )
            result.sent += booked
            result.superseded += changed
            continue
        if outcome == Outcome.REFUSED:
            booked, changed = _book(
                single,
                state=State.REJECTED,
                answer=answer,
                attempts=attempts,
                error=f"The CRM refused this record: {answer.describe()}",
                log=log,
            )
            result.rejected += booked
            result.superseded += changed
            continue
        rest = queue.model.objects.filter(
            pk__in=[r["pk"] for r in rows[position + 1 :]], delivery_key=key
        )
        if outcome == Outcome.TRANSIENT:
            _fail(
                single,
                answer=answer,
                attempts=attempts,
                why=why,
                config=config,
                result=result,
                log=log,
            )
            _release(rest)
        else:
            _save_log(log)
            _stop_for_credentials(single, answer=answer, result=result)
            _release(rest)
        return


# --- Stage functions ---------------------------------------------------------------------


def crm_sync(
    *,
    limit: int | None = None,
    destination: Destination | None = None,
    batch_size: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[int, int], None] | None = None,
) -> SyncResult:
    """Pushes due daily records to the CRM: pending rows, and failed rows whose
    retry time has come. At most `limit` rows (default: those due at the start).

    Idempotent: a row is booked as delivered only for the version sent, under a
    claim no other run can take, and a batch a dead run left behind goes again
    under its own idempotency key. Stops early, with `stopped` saying why, when
    the CRM is unavailable after retries or refuses the credentials (then no
    row changes). `progress`, when given, is called with (records done, records
    due) after each batch; each batch is logged and added to the delivery totals
    of /metrics. Raises CrmConfigError when push is off or misconfigured.
    """
    started = time.monotonic()
    own_destination = destination is None
    destination = destination or JsonContractDestination.from_settings()
    config = _Config.load(sleep=sleep, batch_size=batch_size)
    result = SyncResult()
    try:
        _prune_log()
        crm_retry_failed()
        _run(
            DAILY,
            destination=destination,
            config=config,
            limit=limit,
            result=result,
            progress=progress,
        )
    finally:
        if own_destination:
            destination.close()
    result.seconds = time.monotonic() - started
    return result


def _run(
    queue: _Queue,
    *,
    destination: Destination,
    config: _Config,
    limit: int | None,
    result: SyncResult,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Claims, sends and books due rows of `queue` until none is due, `limit` is
    reached or the CRM stops the run.

    Where claims take several batches (PostgreSQL) the run is pipelined: while
    the request of one batch is in flight, on a sender thread that never
    touches the database, this thread books the answer of the batch before it
    and claims the next ones. One request is in flight at a time, and no
    transaction is open while a request is: each request starts and is waited
    for outside any transaction, and booking and claims are transactions of
    their own that wait for nothing. An answer that is not an acknowledgement
    is dealt with before anything else goes (retries, single records, a stop).
    """
    model = queue.model
    # Each total of /metrics exists from the first run on, at 0 until it counts.
    with _bookkeeping():
        metrics.counter_add(
            counts=[(_counter_name(model), 0, outcome, 0) for outcome in _COUNTED_AS.values()]
        )
    budget = limit
    if budget is None:
        budget = (
            queue.due(sync_from=config.sync_from).count()
            + model.objects.exclude(delivery_key="").count()
        )
    total = budget
    if progress is not None:
        progress(0, total)
    # Batches a dead run left are taken first, once per run: they appear
    # only when a run dies, and looking for them costs a query.
    looking_for_stale = True
    # Claimed batches not sent yet; released when the run ends early.
    queued: deque[tuple[str, list[dict], list[dict]]] = deque()
    # A row changed while in flight is due again and goes again in this
    # run, outside the budget; this bounds the run should changes never stop.
    batches_left = 2 * (budget // config.batch_size + 1) + MAX_STALE_BATCHES_PER_RUN
    # An acknowledged batch not booked yet, with its envelope and answer.
    answered: tuple[tuple[str, list[dict], list[dict]], dict | None, Answer] | None = None

    def fill() -> None:
        """Claims batches when none is queued (a dead run's first)."""
        nonlocal looking_for_stale
        if queued or budget <= 0:
            return
        if looking_for_stale:
            key = None
            if result.replayed_batches < MAX_STALE_BATCHES_PER_RUN:
                key = _reclaim_stale(config=config, queue=queue)
            if key:
                result.replayed_batches += 1
                rows = _claimed(key, queue=queue)
                queued.append((key, rows, queue.records(rows)))
                return
            looking_for_stale = False
        queued.extend(
            _claim(
                limit=min(config.batch_size * CLAIM_BATCHES, budget),
                config=config,
                batches=CLAIM_BATCHES,
                queue=queue,
            )
        )

    def take() -> tuple[str, list[dict], list[dict]] | None:
        nonlocal budget, batches_left
        if budget <= 0 or batches_left <= 0 or result.stopped:
            return None
        fill()
        if not queued:
            return None
        batches_left -= 1
        batch = queued.popleft()
        budget -= max(1, len(batch[2]))
        return batch

    def deliver(batch, *, envelope: dict | None = None, first: Answer | None = None) -> None:
        nonlocal budget
        key, rows, records = batch
        superseded = result.superseded
        _deliver(
            destination,
            key=key,
            rows=rows,
            records=records,
            config=config,
            result=result,
            queue=queue,
            envelope=envelope,
            first=first,
        )
        # Rows changed in flight go again, outside the budget.
        budget += result.superseded - superseded
        if progress is not None:
            progress(result.sent + result.failed + result.rejected, total)

    sender = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm-sender")
        if connection.features.has_select_for_update_skip_locked
        else None
    )
    try:
        with _async_commit():
            while True:
                batch = take()
                if batch is None and answered is not None:
                    # Its rows changed in flight are due again once it is booked.
                    deliver(answered[0], envelope=answered[1], first=answered[2])
                    answered = None
                    batch = take()
                if batch is None:
                    break
                if not batch[2]:
                    continue
                if sender is None:
                    deliver(batch)
                    continue
                envelope = queue.envelope(batch[1])
                _before_request(config)
                future = sender.submit(
                    _send, destination, records=batch[2], key=batch[0], envelope=envelope
                )
                # While the request is in flight: book the last answer, claim ahead.
                if answered is not None:
                    deliver(answered[0], envelope=answered[1], first=answered[2])
                    answered = None
                fill()
                answer = future.result()
                if _classify(answer) == Outcome.ACKNOWLEDGED:
                    answered = (batch, envelope, answer)
                else:
                    deliver(batch, envelope=envelope, first=answer)
    finally:
        # Not sent: due again at once, for this run's successor or another run.
        keys = [key for key, _rows, _records in queued]
        if keys:
            _release(model.objects.filter(delivery_key__in=keys))
        if sender is not None:
            # The sender may have opened a connection (a destination that reads
            # the database); it is closed on its own thread.
            sender.submit(connections.close_all)
            sender.shutdown(wait=True)


@contextmanager
def _async_commit():
    """Delivery bookkeeping commits without waiting for the disk for the rest of
    a run (PostgreSQL's synchronous_commit off on this connection, restored
    after): see `_bookkeeping`. One SET for the run, not one per transaction."""
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO OFF")
    token = _SESSION_ASYNC_COMMIT.set(True)
    try:
        yield
    finally:
        _SESSION_ASYNC_COMMIT.reset(token)
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")


# --- Raw punches: which are new ----------------------------------------------------------

PUNCH_STATE_NAME = "crm_punches"
# Raw punch ids registered per statement.
REGISTER_CHUNK_IDS = 50_000


def crm_punch_sync(
    *,
    limit: int | None = None,
    destination: Destination | None = None,
    batch_size: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[int, int], None] | None = None,
    register_progress: Callable[[int, int], None] | None = None,
) -> SyncResult:
    """Delivers raw punches to CRM_PUNCHES_URL: registers the punches stored
    since the last run (_punches_register, reporting to `progress`), then
    sends the due ones, one device per request, with the batching, retries,
    claims and log of crm_sync. At most `limit` punches (default: those due at
    the start).

    Idempotent: a punch is registered once (its delivery row's key is the
    punch's), and delivered as crm_sync delivers a row, so it goes once even
    across runs and polls that commit out of order. Suspect punches are held
    back until their verdict is cleared. Stops early as crm_sync does. Raises
    CrmConfigError when the punch export is off or misconfigured.
    """
    started = time.monotonic()
    own_destination = destination is None
    destination = destination or JsonContractDestination.from_settings(punches=True)
    config = _Config.load(sleep=sleep, batch_size=batch_size)
    result = SyncResult()
    try:
        _prune_log()
        _retry_failed(PunchDelivery)
        result.registered = _punches_register(
            sync_from=config.sync_from, progress=register_progress
        )
        _run(
            PUNCHES,
            destination=destination,
            config=config,
            limit=limit,
            result=result,
            progress=progress,
        )
    finally:
        if own_destination:
            destination.close()
    result.seconds = time.monotonic() - started
    return result


def _punch_floor(runs: list[list], *, margin: datetime.timedelta) -> int:
    """The highest raw id seen by a registration that read it more than `margin`
    before the last registration did; 0 when there is none."""
    if not runs:
        return 0
    cutoff = datetime.datetime.fromisoformat(runs[-1][0]) - margin
    floor = 0
    for moment, max_id in runs:
        if datetime.datetime.fromisoformat(moment) < cutoff:
            floor = max(floor, max_id)
    return floor


def _punches_register(
    *,
    sync_from: datetime.date | None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Gives each raw punch not yet registered its delivery row (pending, or held
    when suspect); returns how many. Punches before CRM_SYNC_FROM (a local date
    on their device) are never registered. `progress(ids read, ids to read)` is
    called after each chunk of REGISTER_CHUNK_IDS ids.

    A first registration reads every stored punch (years, when CRM_SYNC_FROM
    is not set): one INSERT … SELECT per chunk, so no punch passes through
    Python and each statement's work is bounded, in one transaction.

    Which punches can be new: ids only grow, but a poll can commit after a
    later poll's, so a run may read past an id not yet visible. A poll commits
    within LATE_COMMIT_MARGIN of stamping received_at, which comes before its
    ids. A registration stamps its time just after reading the highest id; a
    punch it could not see commits after it, so its received_at and its id
    come later than that time minus the margin: above the highest id read by
    any registration stamped more than the margin before the last one (the
    floor). Each registration reads every id above the floor and skips those
    with a delivery row, a primary-key lookup; the rows of delivered punches
    at or below the floor are dropped, as no run reads there again. Nothing is
    added to RawAttendance, so a poll's bulk insert pays nothing.
    """
    margin = settings.LATE_COMMIT_MARGIN
    with transaction.atomic():
        # Written first: SQLite takes its write lock now, and on PostgreSQL the
        # row lock keeps two registrations from interleaving.
        if not ProcessingState.objects.filter(name=PUNCH_STATE_NAME).update(
            updated_at=timezone.now()
        ):
            ProcessingState.objects.get_or_create(name=PUNCH_STATE_NAME)
        state = ProcessingState.objects.select_for_update().get(name=PUNCH_STATE_NAME)
        floor = _punch_floor(state.recent_runs, margin=margin)
        bounds = RawAttendance.objects.filter(pk__gt=floor).aggregate(low=Min("pk"), top=Max("pk"))
        top = bounds["top"]
        stamped = timezone.now()
        registered = 0
        if top is not None:
            if connection.vendor == "postgresql":
                # Each chunk's foreign key checks run at the end of its statement:
                # deferred, PostgreSQL would queue one per row until the commit.
                with connection.cursor() as cursor:
                    cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            # Bounded statements: a first registration reads every stored punch.
            first = bounds["low"] - 1
            for start in range(first, top, REGISTER_CHUNK_IDS):
                end = min(start + REGISTER_CHUNK_IDS, top)
                registered += _insert_deliveries(above=start, up_to=end, sync_from=sync_from)
                if progress is not None:
                    progress(end - first, top - first)
        top = max(top or 0, state.last_raw_id)
        runs = [*state.recent_runs, [stamped.isoformat(), top]]
        # The next registration needs the newest run stamped a margin before this one.
        keep = 0
        for index, (moment, _) in enumerate(runs):
            if datetime.datetime.fromisoformat(moment) < stamped - margin:
                keep = index
        state.recent_runs = runs[keep:]
        state.last_raw_id = top
        state.last_run_at = stamped
        state.save(update_fields=["recent_runs", "last_raw_id", "last_run_at", "updated_at"])
    PunchDelivery.objects.filter(sync_state=State.SYNCED, pk__lte=floor).delete()
    # An operator (or a later download) cleared the verdict: the punch goes now.
    PunchDelivery.objects.filter(
        sync_state=PunchDelivery.SyncState.HELD, raw__is_suspect=False
    ).update(sync_state=State.PENDING, next_sync_at=None)
    return registered


def _insert_deliveries(*, above: int, up_to: int, sync_from: datetime.date | None) -> int:
    """One INSERT … SELECT of the delivery rows of punches above..up_to that have none."""
    ops = connection.ops
    raw_table = ops.quote_name(RawAttendance._meta.db_table)
    table = ops.quote_name(PunchDelivery._meta.db_table)
    now = ops.adapt_datetimefield_value(timezone.now())
    where = ["r.id > %s", "r.id <= %s"]
    params: list = [now, above, up_to]
    if sync_from is not None:
        bounds = []
        for device_id, zone in Device.objects.values_list("pk", "timezone"):
            since = datetime.datetime.combine(sync_from, datetime.time(), tzinfo=ZoneInfo(zone))
            bounds.append("(r.device_id = %s AND r.timestamp >= %s)")
            params += [device_id, ops.adapt_datetimefield_value(since.astimezone(datetime.UTC))]
        where.append("(" + (" OR ".join(bounds) or "FALSE") + ")")
    held = PunchDelivery.SyncState.HELD.value
    pending = State.PENDING.value
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (raw_id, version, sync_state, sync_attempts, "
            "last_sync_error, crm_response, delivery_key, resend_count, created_at) "
            f"SELECT r.id, 1, CASE WHEN r.is_suspect THEN '{held}' ELSE '{pending}' END, "
            f"0, '', '', '', 0, %s FROM {raw_table} AS r WHERE {' AND '.join(where)} "
            "ON CONFLICT (raw_id) DO NOTHING",
            params,
        )
        return max(cursor.rowcount, 0)


def crm_preview(*, destination: Destination | None = None) -> str:
    """The first request crm_sync would send now, changing nothing; "" when nothing is due.

    Raises CrmConfigError when push is off or misconfigured.
    """
    own_destination = destination is None
    destination = destination or JsonContractDestination.from_settings()
    try:
        due = _due(sync_from=settings.CRM_SYNC_FROM).order_by("pk")
        rows = list(due.values(*_RECORD_FIELDS)[: settings.CRM_BATCH_SIZE])
        if not rows:
            return ""
        return destination.preview(records=render_records(rows), key="<a new key per batch>")
    finally:
        if own_destination:
            destination.close()


def crm_punch_preview(*, destination: Destination | None = None) -> str:
    """The first request of raw punches crm_punch_sync would send now, changing
    nothing (nothing is registered); "" when no punch would go.

    Punches already registered and due go first, one device per request; when
    none is, the punches the next registration would register and send
    (above the registration floor, not suspect, not before CRM_SYNC_FROM).
    Raises CrmConfigError when the punch export is off or misconfigured.
    """
    own_destination = destination is None
    destination = destination or JsonContractDestination.from_settings(punches=True)
    try:
        size = settings.CRM_BATCH_SIZE
        due = PUNCHES.due(sync_from=None).order_by("raw__device_id", "pk")
        rows = list(PUNCHES.values(due)[:size])
        if not rows:
            rows = _unregistered_punches(limit=size)
        if not rows:
            return ""
        rows = [row for row in rows if row["raw__device_id"] == rows[0]["raw__device_id"]]
        return destination.preview(
            records=render_punches(rows),
            key="<a new key per batch>",
            envelope=punch_envelope(rows),
        )
    finally:
        if own_destination:
            destination.close()


def _unregistered_punches(*, limit: int) -> list[dict]:
    """Up to `limit` punches the next registration would register as due, in the
    shape of `_PUNCH_FIELDS`, those of the lowest device id first. Reads only."""
    state = ProcessingState.objects.filter(name=PUNCH_STATE_NAME).first()
    floor = _punch_floor(state.recent_runs, margin=settings.LATE_COMMIT_MARGIN) if state else 0
    punches = RawAttendance.objects.filter(pk__gt=floor, delivery__isnull=True, is_suspect=False)
    sync_from = settings.CRM_SYNC_FROM
    if sync_from is not None:
        since = Q(pk__in=[])
        for device_id, zone in Device.objects.values_list("pk", "timezone"):
            start = datetime.datetime.combine(sync_from, datetime.time(), tzinfo=ZoneInfo(zone))
            since |= Q(device_id=device_id, timestamp__gte=start)
        punches = punches.filter(since)
    fields = [name.removeprefix("raw__") for name in _PUNCH_FIELDS if name.startswith("raw__")]
    return [
        {"pk": row["pk"], "version": 1, "resend_count": 0}
        | {f"raw__{name}": row[name] for name in fields}
        for row in punches.order_by("device_id", "pk").values("pk", *fields)[:limit]
    ]


@dataclass
class CheckResult:
    ok: bool
    message: str
    answer: Answer


def crm_check(*, destination: Destination | None = None, punches: bool = False) -> CheckResult:
    """Checks that the CRM answers and takes the credentials, changing no CRM data
    (an empty batch), at CRM_API_URL or with `punches` at CRM_PUNCHES_URL. Safe
    to repeat. Raises CrmConfigError when that push is off."""
    own_destination = destination is None
    destination = destination or JsonContractDestination.from_settings(punches=punches)
    try:
        answer = destination.check()
    finally:
        if own_destination:
            destination.close()
    outcome = _classify(answer)
    where = destination.label
    if outcome == Outcome.ACKNOWLEDGED:
        return CheckResult(
            True,
            f"{where}: reachable, credentials accepted ({answer.describe()}, {answer.duration_ms} ms)",
            answer,
        )
    if outcome == Outcome.CREDENTIALS:
        message = f"{where}: the CRM refused the credentials ({answer.describe()}); check CRM_API_TOKEN, CRM_AUTH_SCHEME and CRM_SIGNING_SECRET"
    elif answer.status is None:
        message = f"{where}: unreachable ({answer.error})"
    else:
        message = f"{where}: unexpected answer to an empty batch ({answer.describe()})"
    return CheckResult(False, message, answer)


@dataclass
class DeliveryStats:
    by_state: dict[str, int]
    in_flight: int
    oldest_undelivered: dict | None


def _delivery_stats(model, *, states, oldest_by: str, oldest_fields: tuple) -> DeliveryStats:
    counts = dict(model.objects.order_by().values_list("sync_state").annotate(n=Count("pk")))
    oldest = (
        model.objects.filter(sync_state__in=[State.PENDING, State.FAILED])
        .order_by(oldest_by, "pk")
        .values(*oldest_fields)
        .first()
    )
    return DeliveryStats(
        by_state={state.value: counts.get(state.value, 0) for state in states},
        in_flight=model.objects.exclude(delivery_key="").count(),
        oldest_undelivered=oldest,
    )


def crm_punch_stats() -> DeliveryStats:
    """Registered raw punches by delivery state (delivered ones are counted until
    they are dropped, LATE_COMMIT_MARGIN after), and the undelivered punch
    registered longest ago. Reads only."""
    return _delivery_stats(
        PunchDelivery,
        states=PunchDelivery.SyncState,
        oldest_by="created_at",
        oldest_fields=(
            "raw__user_id",
            "raw__timestamp",
            "raw__device__name",
            "sync_state",
            "created_at",
            "last_sync_error",
        ),
    )


def crm_stats() -> DeliveryStats:
    """Rows by delivery state and the undelivered row waiting longest. Reads only."""
    return _delivery_stats(
        ProcessedAttendance,
        states=State,
        oldest_by="updated_at",
        oldest_fields=("user_id", "work_date", "sync_state", "updated_at", "last_sync_error"),
    )


def crm_retry_failed() -> int:
    """Makes failed rows whose retry time (RETRY_FAILED_SYNCS_HOURS after their
    last attempt, or the CRM's Retry-After) has come due again; returns how many.
    Idempotent; raises nothing."""
    return _retry_failed(ProcessedAttendance)


def _retry_failed(model) -> int:
    return model.objects.filter(sync_state=State.FAILED, next_sync_at__lte=timezone.now()).update(
        sync_state=State.PENDING, next_sync_at=None
    )


def crm_reset_failed(*, ids: Iterable[int]) -> int:
    """Makes these failed rows due now (the admin's Reset failed); returns how many.
    Idempotent; raises nothing."""
    return _reset_failed(ProcessedAttendance.objects.filter(pk__in=list(ids)))


def crm_resend(*, ids: Iterable[int]) -> int:
    """Makes these rows due again whatever their state (the admin's Resend);
    returns how many. The CRM ignores a version it holds, so a resend is safe.
    Idempotent; raises nothing."""
    return _resend(ProcessedAttendance.objects.filter(pk__in=list(ids)))


def crm_punch_reset_failed(*, ids: Iterable[int]) -> int:
    """Makes these failed punch deliveries due now (the admin's Reset failed on raw
    punch deliveries); returns how many. Idempotent; raises nothing."""
    return _reset_failed(PunchDelivery.objects.filter(pk__in=list(ids)))


def crm_punch_resend(*, ids: Iterable[int]) -> int:
    """Makes these punch deliveries due again under a new idempotency key (the
    admin's Resend on raw punch deliveries); returns how many. Punches held
    back as suspect stay held: they go once their verdict is cleared. A CRM
    keeps a punch once (device, employee_id, timestamp), so a resend is safe.
    Idempotent; raises nothing."""
    return _resend(
        PunchDelivery.objects.filter(pk__in=list(ids)).exclude(
            sync_state=PunchDelivery.SyncState.HELD
        )
    )


def _reset_failed(rows) -> int:
    return rows.filter(sync_state=State.FAILED).update(
        sync_state=State.PENDING, next_sync_at=None, sync_attempts=0
    )


def _resend(rows) -> int:
    # A row in flight keeps its claim but loses the version it carries
    # (delivery_version): its batch's booking then releases it instead of
    # booking the answer to the request made before the Resend, and it goes
    # again under a new key. A row not in flight has none to lose.
    return rows.update(
        sync_state=State.PENDING,
        next_sync_at=None,
        sync_attempts=0,
        resend_count=F("resend_count") + 1,
        delivery_version=None,
    )


def _prune_log() -> int:
    cutoff = timezone.now() - datetime.timedelta(days=settings.DELIVERY_LOG_DAYS)
    deleted, _ = DeliveryLog.objects.filter(created_at__lt=cutoff).delete()
    return deleted


# --- The pull feed -----------------------------------------------------------------------

FEED_MAX_LIMIT = 1000
# The ProcessingState row whose last_raw_id holds the feed's horizon: the
# highest change number that replaced a version crm_feed_prune dropped. A
# cursor below it has not read a change older than the retention, and may
# miss a dropped version: it is answered 410.
FEED_STATE_NAME = "crm_feed"
# A record's columns as the feed reads them, from ProcessedAttendance (the
# current versions) and ProcessedAttendanceVersion (older versions, tombstones)
# alike. Names are looked up after: joins inside the UNION would keep
# PostgreSQL from reading both tables in change order and stopping at the limit.
_FEED_COLUMNS = (
    "user_id",
    "work_date",
    "version",
    "clock_in",
    "clock_out",
    "punch_count",
    "worked",
    "is_outlier",
    "outlier_reasons",
    "is_manual",
    "employee_id",
    "clock_in_device_id",
    "clock_out_device_id",
)


class InvalidCursor(ValueError):
    """A cursor the feed did not hand out."""


class CursorExpired(Exception):
    """A cursor from before the feed's retention: changes after it were dropped."""


@dataclass
class ChangesPage:
    records: list[dict]
    next_cursor: str
    has_more: bool


@dataclass(frozen=True)
class _Cursor:
    after: int  # the last change served
    # The last change committed when the consumer started without a cursor:
    # a version replaced (or a day deleted) by a change up to it was gone
    # before the consumer started, so it is not served.
    start: int = 0

    def encode(self) -> str:
        text = f"c2:{self.after}:{self.start}" if self.after < self.start else f"c1:{self.after}"
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> "_Cursor":
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            kind, *numbers = text.split(":")
            if (kind, len(numbers)) not in (("c1", 1), ("c2", 2)) or not all(
                n.isdigit() for n in numbers
            ):
                raise ValueError
            return cls(*map(int, numbers))
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise InvalidCursor(
                f"{cursor!r} is not a cursor of this feed: pass the next_cursor of the previous "
                "page, or no cursor to start from the beginning."
            ) from None


def _feed_rows(*, after: int, start: int, limit: int) -> list[dict]:
    """The next `limit` versions after change `after`, from both tables, in one
    statement (one snapshot: a version moving between them is seen in one of them).

    Each table is read in change order up to the limit, through its own index,
    and the two short lists are merged: the planner does not merge two indexes
    under a UNION's ORDER BY … LIMIT by itself, and sorted both tables whole.
    """
    quote = connection.ops.quote_name
    columns = ", ".join(quote(c) for c in _FEED_COLUMNS)
    since_start = f"AND {quote('replaced_by')} > %s" if after < start else ""
    live_seq, seq = quote("change_seq"), quote("seq")
    sql = (
        f"SELECT * FROM ("
        f"SELECT * FROM (SELECT {live_seq} AS seq, {quote('id')} AS day_id, %s AS deleted,"
        f" {columns} FROM {quote(ProcessedAttendance._meta.db_table)}"
        f" WHERE {live_seq} > %s ORDER BY {live_seq} LIMIT %s) AS live"
        f" UNION ALL "
        f"SELECT * FROM (SELECT {seq}, {quote('day_id')}, {quote('deleted')}, {columns}"
        f" FROM {quote(ProcessedAttendanceVersion._meta.db_table)}"
        f" WHERE {seq} > %s {since_start} ORDER BY {seq} LIMIT %s) AS older"
        f") AS feed ORDER BY seq LIMIT %s"
    )
    params = [False, after, limit, after, *([start] if since_start else []), limit, limit]
    # Raw rows as ProcessedAttendanceVersion instances: the model's converters
    # decode each column alike on both databases. They are never saved.
    return [
        {"seq": v.seq, "deleted": v.deleted, **{c: getattr(v, c) for c in _FEED_COLUMNS}}
        for v in ProcessedAttendanceVersion.objects.raw(sql, params)
    ]


def _with_names(rows: list[dict]) -> list[dict]:
    """Adds the employee and device names and zones render_records reads (two queries)."""
    employees = dict(
        Employee.objects.filter(pk__in={r["employee_id"] for r in rows} - {None}).values_list(
            "pk", "name"
        )
    )
    wanted = {r[k] for r in rows for k in ("clock_in_device_id", "clock_out_device_id")}
    devices = {
        pk: (name, zone)
        for pk, name, zone in Device.objects.filter(pk__in=wanted - {None}).values_list(
            "pk", "name", "timezone"
        )
    }
    for row in rows:
        row["employee__name"] = employees.get(row["employee_id"])
        for end in ("clock_in_device", "clock_out_device"):
            row[f"{end}__name"], row[f"{end}__timezone"] = devices.get(
                row[f"{end}_id"], (None, None)
            )
    return rows


def _last_change() -> int:
    """The highest change number committed (version writers commit in its order)."""
    live = ProcessedAttendance.objects.aggregate(top=Max("change_seq"))["top"] or 0
    older = ProcessedAttendanceVersion.objects.aggregate(top=Max("seq"))["top"] or 0
    return max(live, older)


def feed_horizon() -> int:
    """The highest change number that replaced a version crm_feed_prune dropped (0: none)."""
    found = ProcessingState.objects.filter(name=FEED_STATE_NAME).values_list(
        "last_raw_id", flat=True
    )
    return next(iter(found), 0)


def crm_changes(*, cursor: str | None = None, limit: int = 100) -> ChangesPage:
    """The versions of daily records written since `cursor`, oldest change
    first, in the contract's shape plus `deleted`, and the cursor to pass next.

    The current versions come from ProcessedAttendance (change_seq), the
    versions since replaced and the deleted days (tombstones, `deleted` true)
    from ProcessedAttendanceVersion, both kept by database triggers whoever
    writes; version writers commit in change_seq order and one statement reads
    both tables, so a consumer that follows next_cursor sees every version of
    every day written after it started, and misses no change, even one
    committed while it reads. Without a cursor the feed starts with every day
    at its current version. Reads only; safe to repeat. Days before
    CRM_SYNC_FROM are served too. Raises InvalidCursor for a cursor it did not
    hand out, CursorExpired for one older than CRM_FEED_RETENTION_DAYS allows.
    """
    position = _Cursor.decode(cursor) if cursor else _Cursor(0, _last_change())
    limit = max(1, min(limit, FEED_MAX_LIMIT))
    rows = _feed_rows(after=position.after, start=position.start, limit=limit + 1)
    # Checked after the read: a prune that committed before it is seen here.
    if cursor and feed_horizon() > max(position.after, position.start):
        raise CursorExpired(
            "This cursor is older than the feed keeps changes "
            f"(CRM_FEED_RETENTION_DAYS={settings.CRM_FEED_RETENTION_DAYS}): versions and "
            "deletions after it were dropped. Start again without a cursor: the feed then "
            "serves every day at its current version; remove from your copy the days that "
            "pass does not serve."
        )
    has_more = len(rows) > limit
    rows = _with_names(rows[:limit])
    records = render_records(rows)
    for record, row in zip(records, rows, strict=True):
        record["deleted"] = row["deleted"]
    after = rows[-1]["seq"] if rows else position.after
    return ChangesPage(
        records=records,
        next_cursor=_Cursor(after, position.start).encode(),
        has_more=has_more,
    )


def crm_feed_prune(*, now: datetime.datetime | None = None) -> int:
    """Drops the older versions and tombstones replaced more than
    CRM_FEED_RETENTION_DAYS ago, and raises the feed's horizon to the highest
    change number that replaced one of them; returns how many it dropped.

    Keeps the newest of them whatever its age: SQLite numbers a change after
    the highest number held, and must never hand one out twice. Idempotent;
    call it under the processing lock (attendance_process does), so that two
    prunes do not interleave. Raises nothing of its own.
    """
    cutoff = (now or timezone.now()) - datetime.timedelta(days=settings.CRM_FEED_RETENTION_DAYS)
    # One probe of the index on recorded_at when nothing is due, which is most
    # runs: a processing run pays nothing for a large history.
    oldest = ProcessedAttendanceVersion.objects.order_by("recorded_at").values_list(
        "recorded_at", flat=True
    )[:1]
    if not oldest or oldest[0] >= cutoff:
        return 0
    newest = ProcessedAttendanceVersion.objects.aggregate(top=Max("seq"))["top"]
    expired = ProcessedAttendanceVersion.objects.filter(recorded_at__lt=cutoff).exclude(seq=newest)
    top = expired.aggregate(top=Max("replaced_by"))["top"]
    if top is None:
        return 0
    dropped, _ = expired.delete()
    state, _ = ProcessingState.objects.get_or_create(name=FEED_STATE_NAME)
    if top > state.last_raw_id:
        ProcessingState.objects.filter(pk=state.pk).update(last_raw_id=top)
    return dropped
