"""Device to daily record: the emulator, a real poll and processing, end to end."""

import datetime

import pytest

from core.ingest import device_poll
from core.models import ProcessedAttendance
from core.processing import attendance_process
from core.tests.factories import DeviceFactory
from core.zk.emulator import DeviceState

pytestmark = pytest.mark.django_db

UTC = datetime.UTC


def device_file(punches: list[tuple[str, str]]) -> DeviceState:
    return DeviceState.from_dict(
        {
            "serial_number": "PIPE01",
            "users": [
                {"uid": 1, "user_id": "1001", "name": "Ana Silva"},
                {"uid": 2, "user_id": "2001", "name": "Rui Costa"},
            ],
            "attendance": [
                {"user_id": user_id, "timestamp": moment, "status": 1, "punch": 0}
                for user_id, moment in punches
            ],
        }
    )


def test_polled_punches_become_days_for_day_and_night_workers_in_the_device_zone(zk_emulator):
    state = device_file(
        [
            ("1001", "2026-07-01 08:02:00"),  # day worker, Lisbon summer time (UTC+1)
            ("1001", "2026-07-01 08:02:30"),  # double tap
            ("1001", "2026-07-01 17:05:00"),
            ("2001", "2026-07-01 22:00:00"),  # night worker across midnight
            ("2001", "2026-07-02 06:05:00"),
        ]
    )
    emu = zk_emulator(state)
    device = DeviceFactory(ip_address=emu.host, port=emu.port, timezone="Europe/Lisbon")

    assert device_poll(device=device).new == 5
    result = attendance_process()

    assert result.rows_created == 2
    day = ProcessedAttendance.objects.get(user_id="1001")
    assert (day.work_date, day.clock_in, day.clock_out, day.punch_count) == (
        datetime.date(2026, 7, 1),
        datetime.datetime(2026, 7, 1, 7, 2, tzinfo=UTC),
        datetime.datetime(2026, 7, 1, 16, 5, tzinfo=UTC),
        2,
    )
    assert day.employee.name == "Ana Silva"
    assert not day.is_outlier
    night = ProcessedAttendance.objects.get(user_id="2001")
    assert night.work_date == datetime.date(2026, 7, 1)
    assert night.worked == datetime.timedelta(hours=8, minutes=5)


def test_a_late_punch_polled_after_processing_reaches_the_day_as_a_new_version(zk_emulator):
    state = device_file([("1001", "2026-11-02 08:00:00")])
    emu = zk_emulator(state)
    device = DeviceFactory(ip_address=emu.host, port=emu.port, timezone="UTC")
    device_poll(device=device)
    attendance_process()
    first = ProcessedAttendance.objects.get(user_id="1001")
    assert first.clock_out is None and first.is_outlier  # missing_clock_out
    ProcessedAttendance.objects.filter(pk=first.pk).update(sync_state="synced", synced_version=1)

    state.add_punch(user_id="1001", timestamp=datetime.datetime(2026, 11, 2, 17, 0), status=1)
    assert device_poll(device=device).new == 1
    attendance_process()

    day = ProcessedAttendance.objects.get(pk=first.pk)
    assert day.clock_out == datetime.datetime(2026, 11, 2, 17, 0, tzinfo=UTC)
    assert (day.version, day.sync_state, day.is_outlier) == (2, "pending", False)
    # Polling and processing again changes nothing.
    assert device_poll(device=device).new == 0
    assert attendance_process().rows_changed == 0
    assert ProcessedAttendance.objects.get(pk=first.pk).version == 2
