"""Running totals and the Prometheus view of the pipeline (GET /metrics).

Several gunicorn and Celery processes, on several machines, poll, process and
deliver at once, so in-process counters would each see a slice. The totals
live in the database instead (Counter rows, one upsert per poll, processing
run or delivery batch), and every figure is read from the database when
Prometheus scrapes: any web process answers with the whole picture.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator

from django.db import connection
from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from core.models import Counter, Device, Heartbeat, ProcessedAttendance, PunchDelivery

PREFIX = "attendance_bridge"

# Counter names (Counter.name) and what they count.
POLLS = "polls"  # per device, outcome downloaded / unchanged / failed
PUNCHES_STORED = "punches_stored"  # per device: new punches stored
PROCESSING_RUNS = "processing_runs"  # outcome: the run's mode
PROCESSING_ROWS = "processing_rows"  # outcome created / changed / removed
DELIVERED_DAILY = "delivered_daily"  # outcome sent / failed / rejected
DELIVERED_PUNCHES = "delivered_punches"  # outcome sent / failed / rejected

_TABLE = Counter._meta.db_table
# One statement on PostgreSQL and SQLite alike; concurrent adds queue on the
# row lock and none is lost.
COUNTER_ON_CONFLICT = (
    f"ON CONFLICT (name, device_id, outcome) DO UPDATE SET value = {_TABLE}.value + excluded.value"
)
_UPSERT = f"""
    INSERT INTO {_TABLE} (name, device_id, outcome, value) VALUES (%s, %s, %s, %s)
    {COUNTER_ON_CONFLICT}
"""
# For a statement that counts the rows another part of it wrote: followed by
# FROM <those rows> and COUNTER_ON_CONFLICT; parameters name, device_id, outcome.
COUNTER_UPSERT_SELECT = (
    f"INSERT INTO {_TABLE} (name, device_id, outcome, value) SELECT %s, %s, %s, count(*)"
)


def counter_add(*, counts: Iterable[tuple[str, int, str, int]]) -> None:
    """Adds (name, device_id, outcome, amount) to the running totals.

    Not idempotent by nature: callers add once per event they record, inside
    the transaction that records the event when there is one, so a rolled-back
    event is not counted. A zero amount creates the total at 0 (it shows up in
    /metrics before its first event). Raises DatabaseError when the database does.
    """
    rows = [(name, device_id, outcome, amount) for name, device_id, outcome, amount in counts]
    if rows:
        with connection.cursor() as cursor:
            cursor.executemany(_UPSERT, rows)


def _age(moment: datetime.datetime | None, now: datetime.datetime) -> float | None:
    return None if moment is None else max((now - moment).total_seconds(), 0.0)


class PipelineCollector:
    """Reads the figures at each scrape: a handful of queries whatever the data size."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        devices = list(
            Device.objects.values(
                "pk",
                "name",
                "enabled",
                "consecutive_failures",
                "last_success_at",
                "record_count",
                "record_capacity",
                "clock_drift_seconds",
            )
        )
        names = {device["pk"]: device["name"] for device in devices}
        yield from self._totals(names)
        yield from self._devices(devices, now)
        yield from self._backlog(now)
        heartbeat = Heartbeat.objects.filter(name="beat").values_list("at", flat=True).first()
        age = GaugeMetricFamily(
            f"{PREFIX}_heartbeat_age_seconds",
            "Seconds since a worker last ran the heartbeat beat queues (absent: never).",
        )
        if heartbeat is not None:
            age.add_metric([], _age(heartbeat, now))
        yield age

    def _totals(self, names: dict[int, str]) -> Iterator[Metric]:
        polls = CounterMetricFamily(
            f"{PREFIX}_polls", "Device polls by outcome.", labels=["device", "outcome"]
        )
        punches = CounterMetricFamily(
            f"{PREFIX}_punches_ingested", "New punches stored by polls.", labels=["device"]
        )
        runs = CounterMetricFamily(
            f"{PREFIX}_processing_runs", "Attendance processing runs by mode.", labels=["mode"]
        )
        rows = CounterMetricFamily(
            f"{PREFIX}_processing_rows",
            "Daily records written by processing runs.",
            labels=["change"],
        )
        delivered = CounterMetricFamily(
            f"{PREFIX}_delivered_records",
            "Records whose delivery to the CRM ended, by kind and outcome.",
            labels=["kind", "outcome"],
        )
        for name, device_id, outcome, value in Counter.objects.values_list(
            "name", "device_id", "outcome", "value"
        ):
            if name in (POLLS, PUNCHES_STORED):
                device = names.get(device_id)
                if device is None:
                    continue  # the device was deleted
                if name == POLLS:
                    polls.add_metric([device, outcome], value)
                else:
                    punches.add_metric([device], value)
            elif name == PROCESSING_RUNS:
                runs.add_metric([outcome], value)
            elif name == PROCESSING_ROWS:
                rows.add_metric([outcome], value)
            elif name == DELIVERED_DAILY:
                delivered.add_metric(["daily", outcome], value)
            elif name == DELIVERED_PUNCHES:
                delivered.add_metric(["punch", outcome], value)
        yield from (polls, punches, runs, rows, delivered)

    def _devices(self, devices: list[dict], now: datetime.datetime) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_device_up",
            "1 when the device's last poll succeeded, 0 when it failed or it was never polled.",
            labels=["device"],
        )
        enabled = GaugeMetricFamily(
            f"{PREFIX}_device_enabled", "1 when the device is polled.", labels=["device"]
        )
        fill = GaugeMetricFamily(
            f"{PREFIX}_device_log_fill_ratio",
            "Attendance records on the device over its capacity, at the last poll.",
            labels=["device"],
        )
        drift = GaugeMetricFamily(
            f"{PREFIX}_device_clock_drift_seconds",
            "Device clock minus server time at the last poll.",
            labels=["device"],
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_device_last_success_age_seconds",
            "Seconds since the device's last successful poll (absent: never).",
            labels=["device"],
        )
        for device in devices:
            label = [device["name"]]
            ok = device["last_success_at"] is not None and device["consecutive_failures"] == 0
            up.add_metric(label, 1 if ok else 0)
            enabled.add_metric(label, 1 if device["enabled"] else 0)
            if device["record_capacity"] and device["record_count"] is not None:
                fill.add_metric(label, device["record_count"] / device["record_capacity"])
            if device["clock_drift_seconds"] is not None:
                drift.add_metric(label, device["clock_drift_seconds"])
            if device["last_success_at"] is not None:
                age.add_metric(label, _age(device["last_success_at"], now))
        yield from (up, enabled, fill, drift, age)

    def _backlog(self, now: datetime.datetime) -> Iterator[Metric]:
        rows = GaugeMetricFamily(
            f"{PREFIX}_delivery_rows",
            "Records by delivery state (punches: until their delivery row is dropped).",
            labels=["kind", "state"],
        )
        backlog = GaugeMetricFamily(
            f"{PREFIX}_undelivered",
            "Records waiting for delivery to the CRM (pending or failed).",
            labels=["kind"],
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_undelivered_oldest_age_seconds",
            "Seconds the oldest undelivered record has waited (0 when none waits).",
            labels=["kind"],
        )
        waiting = (ProcessedAttendance.SyncState.PENDING, ProcessedAttendance.SyncState.FAILED)
        for kind, model, since in (
            ("daily", ProcessedAttendance, "updated_at"),
            ("punch", PunchDelivery, "created_at"),
        ):
            states = (
                model.objects.order_by()
                .values_list("sync_state")
                .annotate(n=Count("pk"), first=Min(since))
            )
            total, first = 0, None
            for state, count, earliest in states:
                rows.add_metric([kind, state], count)
                if state in waiting:
                    total += count
                    first = earliest if first is None else min(first, earliest)
            backlog.add_metric([kind], total)
            oldest.add_metric([kind], _age(first, now) or 0.0)
        yield from (rows, backlog, oldest)


def metrics_render() -> bytes:
    """The Prometheus text exposition of the pipeline's figures. Reads only."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector())
    return generate_latest(registry)
