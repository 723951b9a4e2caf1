"""The HR status page (the admin's first page): who is in today, the days
waiting for review, the devices that need a look, the CRM backlog, and
punches per hour. Reads only, in a fixed handful of queries whatever the
number of employees, days or punches.

"Today" is the date in COMPANY_TIMEZONE. Each figure is counted with one of
the conditions below (presence_q, review_q, device_q), and the admin's list
filters select their rows with the same conditions, so a figure and the list
it links to always agree.
"""

from __future__ import annotations

import datetime
from collections.abc import Collection
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db.models import BooleanField, Count, ExpressionWrapper, F, Min, Q
from django.db.models.functions import Mod, TruncHour
from django.db.models.lookups import GreaterThanOrEqual
from django.utils import timezone

from core.crm import DeliveryStats, crm_punch_stats, crm_stats
from core.health import device_overdue_q
from core.ingest import drift_text
from core.models import Device, ProcessedAttendance, RawAttendance

PRESENCE = "presence"
REVIEW = "review"
DEVICES = "devices"
BACKLOG = "backlog"
PUNCH_BACKLOG = "punch_backlog"
PUNCHES_PER_HOUR = "punches_per_hour"
SECTIONS = frozenset({PRESENCE, REVIEW, DEVICES, BACKLOG, PUNCH_BACKLOG, PUNCHES_PER_HOUR})

# Days the chart's average is taken over (the days before today).
AVERAGE_DAYS = 7


# --- Where "today" is ------------------------------------------------------------------


def company_zone() -> ZoneInfo:
    return ZoneInfo(settings.COMPANY_TIMEZONE)


def company_today(now: datetime.datetime | None = None) -> datetime.date:
    """Today's date in the company's zone: HR's "today", here and in the admin's periods."""
    return (now or timezone.now()).astimezone(company_zone()).date()


def local_midnight(day: datetime.date, zone: ZoneInfo) -> datetime.datetime:
    """The first moment of a local day, in UTC (DST-safe: fold=0 at midnight)."""
    return datetime.datetime.combine(day, datetime.time(), tzinfo=zone).astimezone(datetime.UTC)


# --- The conditions behind each figure -------------------------------------------------


def _open_shift(now: datetime.datetime) -> Q:
    # A shift takes in punches for MAX_SHIFT_HOURS after its first one
    # (core.processing.shifts): until then a missing clock-out may still come.
    return Q(clock_in__gt=now - datetime.timedelta(hours=settings.MAX_SHIFT_HOURS))


PRESENCE_KINDS = {
    "today": "Clocked in today",
    "in": "Still in",
}


def presence_q(kind: str, *, now: datetime.datetime) -> Q:
    """Daily records behind a presence figure.

    today: a shift that starts on today's date (in the company's zone).
    in: a shift still open (its first punch less than MAX_SHIFT_HOURS ago)
    with an odd number of punches, counting punches as alternating in and
    out (in, lunch out, back in: still in). Night shifts begun yesterday count.
    """
    if kind == "today":
        return Q(work_date=company_today(now), clock_in__isnull=False)
    if kind == "in":
        return _open_shift(now) & Q(punch_parity=1)
    raise ValueError(f"unknown presence figure {kind!r}")


REVIEW_KINDS = {
    "outlier": "Outliers not reviewed",
    "missing_clock_out": "Missing clock-outs",
    "newer_punches": "Edited days with newer punches",
    "any": "Waiting for review",
}


def review_q(kind: str, *, now: datetime.datetime) -> Q:
    """Daily records behind a review figure.

    outlier: an outlier day with a clock-out, not reviewed yet.
    missing_clock_out: one punch only, its shift over (no later punch can
    close it), not reviewed yet; open shifts are people still at work.
    newer_punches: an HR-edited day that punches arrived for after its edit
    or review. Marking a day reviewed clears all three.
    """
    if kind == "outlier":
        return Q(is_outlier=True, reviewed_at__isnull=True, clock_out__isnull=False)
    if kind == "missing_clock_out":
        return Q(
            clock_in__isnull=False, clock_out__isnull=True, reviewed_at__isnull=True
        ) & ~_open_shift(now)
    if kind == "newer_punches":
        return Q(has_newer_punches=True)
    if kind == "any":
        return (
            review_q("outlier", now=now)
            | review_q("missing_clock_out", now=now)
            | review_q("newer_punches", now=now)
        )
    raise ValueError(f"unknown review figure {kind!r}")


DEVICE_KINDS = {
    "down": "Down (last poll failed)",
    "overdue": "Overdue for a successful poll",
    "log_full": "Log nearly full",
    "drift": "Clock drifting",
    "attention": "Any of these",
}


def device_q(kind: str, *, now: datetime.datetime) -> Q:
    """Enabled devices behind a device figure.

    down: the last poll failed. overdue: no successful poll for
    DEVICE_OVERDUE_MINUTES, the rule /health/ uses (core.health.device_overdue_q;
    a device never polled counts from when it was added). log_full: the log holds
    DEVICE_LOG_FULL_ALERT_PERCENT of its capacity or more. drift: the clock
    was further off than CLOCK_DRIFT_ALERT_SECONDS at the last poll.
    """
    if kind == "down":
        condition = Q(consecutive_failures__gt=0)
    elif kind == "overdue":
        condition = device_overdue_q(now=now)
    elif kind == "log_full":
        condition = Q(record_capacity__gt=0, record_count__isnull=False) & Q(
            GreaterThanOrEqual(
                F("record_count") * 100,
                F("record_capacity") * settings.DEVICE_LOG_FULL_ALERT_PERCENT,
            )
        )
    elif kind == "drift":
        limit = settings.CLOCK_DRIFT_ALERT_SECONDS
        condition = Q(clock_drift_seconds__gt=limit) | Q(clock_drift_seconds__lt=-limit)
    elif kind == "attention":
        condition = Q()
        for each in ("down", "overdue", "log_full", "drift"):
            condition |= device_q(each, now=now)
    else:
        raise ValueError(f"unknown device figure {kind!r}")
    return Q(enabled=True) & condition


def with_punch_parity(queryset):
    """Daily records annotated with punch_parity (1: odd punch count), which presence_q reads."""
    return queryset.alias(punch_parity=Mod("punch_count", 2))


# --- What the page shows ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Presence:
    clocked_in: int
    still_in: int


@dataclass(frozen=True, slots=True)
class Review:
    outliers: int
    missing_clock_outs: int
    newer_punches: int
    total: int
    oldest: datetime.date | None


@dataclass(frozen=True, slots=True)
class DeviceAlert:
    id: int
    name: str
    problems: list[str]
    last_success_at: datetime.datetime | None
    last_error: str
    log_fill_percent: float | None
    clock_drift: str  # "70 minutes behind" when the clock drifts, else empty


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    enabled: int
    down: int
    overdue: int
    log_full: int
    drift: int
    alerts: list[DeviceAlert]
    overdue_minutes: float  # DEVICE_OVERDUE_MINUTES, shown beside the overdue figure


@dataclass(frozen=True, slots=True)
class Backlog:
    """Records not delivered to the CRM yet (pending or failed), and the oldest of them."""

    undelivered: int
    pending: int
    failed: int
    rejected: int
    held: int  # punches only: suspect, sent once an operator clears them
    in_flight: int
    oldest: dict | None  # core.crm's oldest_undelivered

    @classmethod
    def from_stats(cls, stats: DeliveryStats) -> Backlog:
        states = stats.by_state
        return cls(
            undelivered=states["pending"] + states["failed"],
            pending=states["pending"],
            failed=states["failed"],
            rejected=states["rejected"],
            held=states.get("held", 0),
            in_flight=stats.in_flight,
            oldest=stats.oldest_undelivered,
        )


@dataclass(frozen=True, slots=True)
class HourBar:
    hour: int  # local hour of day, 0 to 23
    start: datetime.datetime  # today's hour, UTC
    end: datetime.datetime
    today: int
    average: float


@dataclass(frozen=True, slots=True)
class PunchesPerHour:
    bars: list[HourBar]
    total_today: int
    average_day: float
    scale: int  # the highest bar or average, for drawing


@dataclass(frozen=True, slots=True)
class HrStatus:
    now: datetime.datetime
    today: datetime.date
    zone: str
    presence: Presence | None = None
    review: Review | None = None
    devices: DeviceHealth | None = None
    backlog: Backlog | None = None
    punch_backlog: Backlog | None = None
    punches_per_hour: PunchesPerHour | None = None
    sections: frozenset[str] = field(default_factory=frozenset)


def status_read(
    *, sections: Collection[str] = SECTIONS, now: datetime.datetime | None = None
) -> HrStatus:
    """The figures of the HR status page, for the sections asked (a user sees
    only those of the models they may view; the others cost no query).

    Reads only, so idempotent. A fixed number of queries: one for presence and
    review together, one for devices, one for punches per hour, three for each
    delivery backlog (core.crm); the punch backlog only when CRM_PUNCHES_URL is
    set. Raises ValueError for an unknown section.
    """
    unknown = set(sections) - SECTIONS
    if unknown:
        raise ValueError(f"unknown status sections: {', '.join(sorted(unknown))}")
    now = now or timezone.now()
    wanted = frozenset(sections)
    if not settings.CRM_PUNCHES_URL:
        wanted -= {PUNCH_BACKLOG}
    presence = review = None
    if wanted & {PRESENCE, REVIEW}:
        presence, review = _days(now)
    return HrStatus(
        now=now,
        today=company_today(now),
        zone=settings.COMPANY_TIMEZONE,
        presence=presence if PRESENCE in wanted else None,
        review=review if REVIEW in wanted else None,
        devices=_devices(now) if DEVICES in wanted else None,
        backlog=Backlog.from_stats(crm_stats()) if BACKLOG in wanted else None,
        punch_backlog=(Backlog.from_stats(crm_punch_stats()) if PUNCH_BACKLOG in wanted else None),
        punches_per_hour=_punches_per_hour(now) if PUNCHES_PER_HOUR in wanted else None,
        sections=wanted,
    )


def _days(now: datetime.datetime) -> tuple[Presence, Review]:
    waiting = review_q("any", now=now)
    figures = with_punch_parity(ProcessedAttendance.objects.order_by()).aggregate(
        clocked_in=Count("pk", filter=presence_q("today", now=now)),
        still_in=Count("pk", filter=presence_q("in", now=now)),
        outliers=Count("pk", filter=review_q("outlier", now=now)),
        missing_clock_outs=Count("pk", filter=review_q("missing_clock_out", now=now)),
        newer_punches=Count("pk", filter=review_q("newer_punches", now=now)),
        total=Count("pk", filter=waiting),
        oldest=Min("work_date", filter=waiting),
    )
    presence = Presence(clocked_in=figures.pop("clocked_in"), still_in=figures.pop("still_in"))
    return presence, Review(**figures)


_DEVICE_PROBLEMS = {
    "down": "last poll failed",
    "overdue": "overdue",
    "log_full": "log nearly full",
    "drift": "clock drifting",
}


def _devices(now: datetime.datetime) -> DeviceHealth:
    flags = {
        kind: ExpressionWrapper(device_q(kind, now=now), output_field=BooleanField())
        for kind in _DEVICE_PROBLEMS
    }
    devices = list(Device.objects.filter(enabled=True).annotate(**flags).order_by("name"))
    alerts = [
        DeviceAlert(
            id=device.pk,
            name=device.name,
            problems=[text for kind, text in _DEVICE_PROBLEMS.items() if getattr(device, kind)],
            last_success_at=device.last_success_at,
            last_error=device.last_error,
            log_fill_percent=device.log_fill_percent,
            clock_drift=drift_text(device.clock_drift_seconds) if device.drift else "",
        )
        for device in devices
        if any(getattr(device, kind) for kind in _DEVICE_PROBLEMS)
    ]
    return DeviceHealth(
        enabled=len(devices),
        alerts=alerts,
        overdue_minutes=settings.DEVICE_OVERDUE_MINUTES,
        **{kind: sum(1 for d in devices if getattr(d, kind)) for kind in _DEVICE_PROBLEMS},
    )


def _punches_per_hour(now: datetime.datetime) -> PunchesPerHour:
    zone = company_zone()
    today = company_today(now)
    first_day = today - datetime.timedelta(days=AVERAGE_DAYS)
    rows = (
        RawAttendance.objects.filter(
            timestamp__gte=local_midnight(first_day, zone),
            timestamp__lt=local_midnight(today + datetime.timedelta(days=1), zone),
        )
        .annotate(hour=TruncHour("timestamp", tzinfo=zone))
        .order_by()
        .values_list("hour")
        .annotate(n=Count("pk"))
    )
    today_counts = [0] * 24
    past_counts = [0] * 24
    for hour, count in rows:
        local = hour.astimezone(zone)
        (today_counts if local.date() == today else past_counts)[local.hour] += count
    # Each local hour from its start to the next one's, in UTC: the hour a
    # clock repeats when DST ends spans two real hours, the one it skips none.
    starts = [
        datetime.datetime.combine(today, datetime.time(hour), tzinfo=zone).astimezone(datetime.UTC)
        for hour in range(24)
    ]
    starts.append(local_midnight(today + datetime.timedelta(days=1), zone))
    bars = [
        HourBar(
            hour=hour,
            start=starts[hour],
            end=max(starts[hour], starts[hour + 1]),
            today=today_counts[hour],
            average=past_counts[hour] / AVERAGE_DAYS,
        )
        for hour in range(24)
    ]
    scale = max([1, *today_counts, *(round(b.average + 0.5) for b in bars)])
    return PunchesPerHour(
        bars=bars,
        total_today=sum(today_counts),
        average_day=sum(past_counts) / AVERAGE_DAYS,
        scale=scale,
    )
