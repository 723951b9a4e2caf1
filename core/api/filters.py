"""Query filters of the lists. A value that does not parse is a 400 naming
its parameter (django-filter's form errors); an unknown ordering field too."""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db.models import Q
from django_filters import rest_framework as filters
from rest_framework.exceptions import ValidationError
from rest_framework.filters import OrderingFilter

from core.models import (
    Device,
    DeviceCommand,
    Employee,
    ProcessedAttendance,
    RawAttendance,
    validate_timezone,
)

TRUE_FALSE = [("true", "true"), ("false", "false")]
# Dates as YYYY-MM-DD only: 02/11/2026 means a different day to different people.
ISO_DATE = ["%Y-%m-%d"]
# Far enough for any attendance, near enough that a day in any zone stays a
# valid datetime (year 1 in Tokyo is before year 1 in UTC).
DATE_RANGE = [
    MinValueValidator(datetime.date(1900, 1, 1)),
    MaxValueValidator(datetime.date(2999, 12, 31)),
]


class StrictOrderingFilter(OrderingFilter):
    """?ordering=a,-b over the view's ordering_fields; an unknown field is a 400."""

    def get_ordering(self, request, queryset, view):
        given = request.query_params.get(self.ordering_param)
        if given:
            valid = {name for name, _label in self.get_valid_fields(queryset, view, {})}
            fields = [part.strip() for part in given.split(",")]
            unknown = [f for f in fields if f.lstrip("-") not in valid]
            if unknown:
                raise ValidationError(
                    {
                        self.ordering_param: f"Unknown field {', '.join(unknown)}; order by "
                        f"{', '.join(sorted(valid))}, with - for descending."
                    }
                )
        return super().get_ordering(request, queryset, view)


class StrictBooleanFilter(filters.ChoiceFilter):
    """true or false; anything else is a 400 (a plain BooleanFilter ignores it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("choices", TRUE_FALSE)
        super().__init__(*args, **kwargs)

    def filter(self, qs, value):
        if value in ("", None):
            return qs
        return qs.filter(**{f"{self.field_name}__{self.lookup_expr}": value == "true"})


def _check_range(start, end) -> None:
    if start and end and start > end:
        raise ValidationError({"end_date": f"end_date {end} is before start_date {start}."})


class RawAttendanceFilter(filters.FilterSet):
    device = filters.ModelChoiceFilter(queryset=Device.objects.all(), help_text="Device id.")
    user_id = filters.CharFilter(help_text="The user id shown on the clock.")
    start_date = filters.DateFilter(
        input_formats=ISO_DATE,
        validators=DATE_RANGE,
        method="_dates",
        help_text="First day (YYYY-MM-DD), a local date in tz.",
    )
    end_date = filters.DateFilter(
        input_formats=ISO_DATE,
        validators=DATE_RANGE,
        method="_dates",
        help_text="Last day (YYYY-MM-DD, inclusive), a local date in tz.",
    )
    tz = filters.CharFilter(
        method="_dates",
        validators=[validate_timezone],
        help_text="IANA zone the dates are in (Europe/Lisbon); default: each punch's device's.",
    )
    punch_state = filters.ChoiceFilter(choices=RawAttendance.PunchState.choices)
    suspect = StrictBooleanFilter(field_name="is_suspect", help_text="true or false.")

    class Meta:
        model = RawAttendance
        fields = ["device", "user_id", "start_date", "end_date", "tz", "punch_state", "suspect"]

    def _dates(self, queryset, name, value):
        return queryset  # applied together in filter_queryset

    def filter_queryset(self, queryset):
        queryset = super().filter_queryset(queryset)
        start = self.form.cleaned_data.get("start_date")
        end = self.form.cleaned_data.get("end_date")
        _check_range(start, end)
        if not (start or end):
            return queryset
        tz = self.form.cleaned_data.get("tz")
        if tz:
            return queryset.filter(self._window(ZoneInfo(tz), start, end))
        # Each punch's dates in its own device's zone: one condition per zone in use.
        device = self.form.cleaned_data.get("device")
        zones = (
            [device.timezone]
            if device
            else sorted(set(Device.objects.values_list("timezone", flat=True)))
        )
        if len(zones) == 1:
            return queryset.filter(self._window(ZoneInfo(zones[0]), start, end))
        condition = Q()
        for zone in zones:
            condition |= Q(device__timezone=zone) & self._window(ZoneInfo(zone), start, end)
        return queryset.filter(condition)

    @staticmethod
    def _window(zone: ZoneInfo, start, end) -> Q:
        condition = Q()
        if start:
            since = datetime.datetime.combine(start, datetime.time.min, tzinfo=zone)
            condition &= Q(timestamp__gte=since)
        if end:
            day_after = end + datetime.timedelta(days=1)
            until = datetime.datetime.combine(day_after, datetime.time.min, tzinfo=zone)
            condition &= Q(timestamp__lt=until)
        return condition


class ProcessedAttendanceFilter(filters.FilterSet):
    user_id = filters.CharFilter(help_text="The user id shown on the clock.")
    start_date = filters.DateFilter(
        input_formats=ISO_DATE,
        validators=DATE_RANGE,
        field_name="work_date",
        lookup_expr="gte",
        help_text="First work date (YYYY-MM-DD).",
    )
    end_date = filters.DateFilter(
        input_formats=ISO_DATE,
        validators=DATE_RANGE,
        field_name="work_date",
        lookup_expr="lte",
        help_text="Last work date (YYYY-MM-DD, inclusive).",
    )
    is_outlier = StrictBooleanFilter(help_text="true or false.")
    is_manual = StrictBooleanFilter(help_text="true or false: corrected by HR.")
    sync_state = filters.ChoiceFilter(choices=ProcessedAttendance.SyncState.choices)
    device = filters.ModelChoiceFilter(
        queryset=Device.objects.all(),
        field_name="clock_in_device",  # for the schema's type; _device reads both
        method="_device",
        help_text="Device id: days clocked in or out on it.",
    )

    class Meta:
        model = ProcessedAttendance
        fields = [
            "user_id",
            "start_date",
            "end_date",
            "is_outlier",
            "is_manual",
            "sync_state",
            "device",
        ]

    def _device(self, queryset, name, value):
        return queryset.filter(Q(clock_in_device=value) | Q(clock_out_device=value))

    def filter_queryset(self, queryset):
        _check_range(
            self.form.cleaned_data.get("start_date"), self.form.cleaned_data.get("end_date")
        )
        return super().filter_queryset(queryset)


class EmployeeFilter(filters.FilterSet):
    device = filters.ModelChoiceFilter(
        queryset=Device.objects.all(), field_name="devices", help_text="Device id."
    )

    class Meta:
        model = Employee
        fields = ["device"]


class DeviceFilter(filters.FilterSet):
    enabled = StrictBooleanFilter(help_text="true or false.")
    protocol = filters.ChoiceFilter(choices=Device.Protocol.choices)

    class Meta:
        model = Device
        fields = ["enabled", "protocol"]


class DeviceCommandFilter(filters.FilterSet):
    state = filters.ChoiceFilter(choices=DeviceCommand.State.choices)

    class Meta:
        model = DeviceCommand
        fields = ["state"]
