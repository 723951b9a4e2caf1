"""Device to daily record: the emulator, a real poll and processing, end to end."""

import datetime

import pytest
import time_machine

from core.ingest import device_poll, punches_judge
from core.models import ProcessedAttendance, RawAttendance
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


def now_on_a_utc_clock() -> datetime.datetime:
    return datetime.datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def test_a_clock_reset_by_a_power_cut_before_the_poll_loses_no_day(zk_emulator):
    start = now_on_a_utc_clock() - datetime.timedelta(hours=10)
    state = device_file(
        [
            ("1001", f"{start:%Y-%m-%d %H:%M:%S}"),
            ("1001", f"{start + datetime.timedelta(hours=8):%Y-%m-%d %H:%M:%S}"),
        ]
    )
    # After those punches the power went, and the clock came back at its factory date.
    reset = (datetime.datetime(2000, 1, 1, 1, 0) - now_on_a_utc_clock()).total_seconds()
    emu = zk_emulator(state, clock_offset=reset)
    device = DeviceFactory(ip_address=emu.host, port=emu.port, timezone="UTC")

    poll = device_poll(device=device)
    attendance_process()

    assert (poll.new, poll.suspect) == (2, 0)
    assert "behind the server's time" in poll.summary()
    day = ProcessedAttendance.objects.get(user_id="1001")
    assert (day.punch_count, day.ignored_suspect_punches) == (2, 0)
    assert day.worked == datetime.timedelta(hours=8)


def test_a_verdict_revised_by_a_later_download_reaches_the_day_as_a_new_version(
    zk_emulator, settings
):
    settings.SUSPECT_FUTURE_TOLERANCE = datetime.timedelta(hours=1)
    clock_in = now_on_a_utc_clock() - datetime.timedelta(hours=6)
    # The clock runs two hours fast: its clock-out is dated ahead of the server's time.
    clock_out = now_on_a_utc_clock() + datetime.timedelta(hours=2)
    state = device_file(
        [("1001", f"{clock_in:%Y-%m-%d %H:%M:%S}"), ("1001", f"{clock_out:%Y-%m-%d %H:%M:%S}")]
    )
    emu = zk_emulator(state, clock_offset=2 * 3600)
    device = DeviceFactory(ip_address=emu.host, port=emu.port, timezone="UTC")
    assert device_poll(device=device).suspect == 1
    attendance_process()
    first = ProcessedAttendance.objects.get(user_id="1001")
    assert (first.clock_out, first.ignored_suspect_punches, first.version) == (None, 1, 1)

    # Three hours on, the clock-out is no longer in the future: judged again, it counts.
    with time_machine.travel(datetime.timedelta(hours=3)):
        poll = device_poll(device=device, force_full=True)
        attendance_process()

    assert (poll.new, poll.revised, poll.suspect) == (0, 1, 0)
    day = ProcessedAttendance.objects.get(pk=first.pk)
    assert day.clock_out == clock_out.replace(tzinfo=UTC)
    assert (day.ignored_suspect_punches, day.version, day.sync_state) == (0, 2, "pending")


def test_an_operator_clearing_a_suspect_punch_reaches_the_day_at_the_next_run(
    zk_emulator, django_user_model
):
    state = device_file([("1001", "2026-11-02 08:00:00"), ("1001", "2026-11-02 17:00:00")])
    emu = zk_emulator(state)
    device = DeviceFactory(ip_address=emu.host, port=emu.port, timezone="UTC")
    device_poll(device=device)
    clock_out = RawAttendance.objects.get(timestamp__hour=17)
    operator = django_user_model.objects.create_user("ops")
    punches_judge(
        ids=[clock_out.pk], suspect=True, reason="badge lent to a colleague", user=operator
    )
    attendance_process()
    assert ProcessedAttendance.objects.get().clock_out is None

    punches_judge(ids=[clock_out.pk], suspect=False, reason="checked with the guard", user=operator)
    attendance_process()
    day = ProcessedAttendance.objects.get()
    assert day.clock_out == datetime.datetime(2026, 11, 2, 17, 0, tzinfo=UTC)
    assert day.version == 2
    # A later download keeps the operator's verdict.
    assert device_poll(device=device, force_full=True).revised == 0
