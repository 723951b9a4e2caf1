import datetime

import factory

from core.models import Device, Employee, RawAttendance
from core.processing.rules import Rules


class DeviceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Device

    name = factory.Sequence(lambda n: f"Door {n}")
    ip_address = "127.0.0.1"
    port = 4370
    timezone = "UTC"
    timeout_seconds = 5


class EmployeeFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Employee

    user_id = factory.Sequence(lambda n: str(1000 + n))
    name = factory.Faker("name")


class RawAttendanceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RawAttendance

    device = factory.SubFactory(DeviceFactory)
    user_id = "1001"
    timestamp = factory.Sequence(
        lambda n: (
            datetime.datetime(2026, 11, 2, 8, 0, tzinfo=datetime.UTC)
            + datetime.timedelta(minutes=n)
        )
    )
    status = 1
    verify_type = 1
    punch_state = 0


# The outlier rules at the settings' defaults, for the tests of the pure
# processing modules (core.processing.shifts, rules, diff).
DEFAULT_RULES = Rules(
    max_shift=datetime.timedelta(hours=16),
    dedupe=datetime.timedelta(seconds=60),
    work_start=datetime.time(8),
    work_end=datetime.time(17),
    early_in=120,
    late_in=120,
    early_out=120,
    late_out=180,
)
