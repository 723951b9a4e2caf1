"""The emulator in push mode against the receiver over real sockets: the bridge
served on a loopback port by pytest-django's live server, the emulated clock
an HTTP client behaving as firmware does (core.zk.emulator.push)."""

import datetime
import time
from zoneinfo import ZoneInfo

import pytest
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection

from core import adms
from core.ingest import device_poll
from core.models import Device, DeviceCommand, Employee, RawAttendance
from core.zk.emulator import DeviceState, PushClock, parse_down_windows
from core.zk.protocol import encode_time

pytestmark = pytest.mark.django_db(transaction=True)

UTC = datetime.UTC
SN = "PUSH0001"
WAIT = 30.0


@pytest.fixture(autouse=True)
def quick_clock_timing(settings):
    # The clock polls every second and retries a second after a failure.
    settings.ADMS_DELAY_SECONDS = 1
    settings.ADMS_ERROR_DELAY_SECONDS = 1
    settings.ADMS_AUTO_APPROVE = False


def small_state(**overrides) -> DeviceState:
    state = DeviceState.generate(
        **{"users": 6, "punches": 400, "days": 10, "seed": 5, **overrides},
        now=datetime.datetime.now().replace(microsecond=0) - datetime.timedelta(hours=1),
    )
    state.serial_number = SN
    return state


@pytest.fixture
def push_clock(live_server):
    """Starts pushing clocks aimed at the live server; stops them after the test."""
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        # Django gives the live server's request threads and the test the one
        # connection of an in-memory database: a clock's requests and the test's
        # reads at once can leave it inside a broken transaction for every
        # later test.
        pytest.skip("needs PostgreSQL or a SQLite file, not the in-memory test database")
    running = []

    def start(state: DeviceState, **options) -> PushClock:
        clock = PushClock(state, live_server.url, error_delay=1.0, seed=3, **options).start()
        running.append(clock)
        return clock

    yield start
    for clock in running:
        clock.stop()


def db(work):
    """work()'s value. On SQLite's shared in-memory test database a table the
    live server is writing to is locked for a moment (no busy timeout there):
    try again. PostgreSQL never raises this."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return work()
        except OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_for(condition, seconds=WAIT):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if db(condition):
            return True
        time.sleep(0.1)
    return db(condition)


def approved_device(**fields) -> Device:
    return Device.objects.create(
        **{
            "name": "Gate",
            "serial_number": SN,
            "timezone": "UTC",
            "first_seen_at": datetime.datetime.now(UTC),
            **fields,
        }
    )


def stored_instants(device: Device) -> set[datetime.datetime]:
    return set(RawAttendance.objects.filter(device=device).values_list("timestamp", flat=True))


def expected_instants(state: DeviceState, zone: str) -> set[datetime.datetime]:
    tz = ZoneInfo(zone)
    return {r.timestamp.replace(tzinfo=tz).astimezone(UTC) for r in state.attendance}


def test_an_unknown_clock_keeps_its_backlog_until_approved_then_uploads_all_of_it(push_clock):
    state = small_state()
    clock = push_clock(state)
    assert wait_for(lambda: Device.objects.filter(serial_number=SN).exists())
    time.sleep(1.5)  # it has shaken hands (refused) at least twice by now
    device = db(lambda: Device.objects.get(serial_number=SN))
    assert not device.enabled and not clock.connected
    assert clock.stats.handshakes >= 2 and clock.stats.punches_acknowledged == 0
    assert not db(RawAttendance.objects.exists)

    db(lambda: Device.objects.filter(pk=device.pk).update(enabled=True, timezone="UTC"))

    assert wait_for(lambda: RawAttendance.objects.count() == 400)
    assert wait_for(lambda: Employee.objects.count() == 6)
    clock.stop()
    assert stored_instants(device) == expected_instants(state, "UTC")
    assert clock.stats.punches_acknowledged == 400
    # Stamp = the ZK time of the newest record, echoed at the next handshake.
    newest = max(r.timestamp for r in state.attendance)
    device.refresh_from_db()
    assert device.attlog_stamp == str(encode_time(newest))
    # The users came with the operation log (EnrollUser in TransFlag).
    assert set(Employee.objects.values_list("user_id", "name")) == {
        (u.user_id, u.name) for u in state.users
    }


def test_a_batch_sent_again_after_check_with_a_reset_stamp_stores_nothing_twice(push_clock):
    device = approved_device()
    state = small_state()
    clock = push_clock(state)
    assert wait_for(lambda: clock.stats.punches_acknowledged == 400)
    sent_before = clock.stats.punches_sent

    # The operator asks for everything again: stamp 0, then CHECK.
    db(lambda: Device.objects.filter(pk=device.pk).update(attlog_stamp="0"))
    check = db(lambda: adms.device_command_queue(device=device, command="CHECK"))

    assert wait_for(lambda: clock.stats.punches_sent >= sent_before + 400)
    assert wait_for(lambda: DeviceCommand.objects.get(pk=check.pk).state == "done")
    clock.stop()
    # Sent twice, acknowledged twice, counted once.
    assert clock.stats.punches_acknowledged == 400
    assert RawAttendance.objects.count() == 400
    assert stored_instants(device) == expected_instants(state, "UTC")


def test_a_clock_whose_acknowledgements_are_lost_sends_again_and_nothing_doubles(push_clock):
    approved_device()
    state = small_state(users=20, punches=900)
    clock = push_clock(state, drop_rate=0.4)
    assert wait_for(lambda: clock.stats.punches_acknowledged == 900)
    assert clock.stats.dropped > 0
    # Dropped uploads were stored by the receiver and then sent again.
    assert clock.stats.punches_sent >= 900
    clock.stop()
    time.sleep(0.5)  # an upload still in flight on the server has finished by now
    assert RawAttendance.objects.count() == 900
    assert stored_instants(Device.objects.get()) == expected_instants(state, "UTC")


def test_queued_commands_are_carried_out_on_the_clock_and_answered(push_clock):
    device = approved_device()
    state = small_state()
    clock = push_clock(state)
    assert wait_for(lambda: RawAttendance.objects.count() == 400)
    handshakes = clock.stats.handshakes
    leaving = state.users[-1].user_id
    # A day of the log is lost on the server: DATA QUERY ATTLOG brings it back.
    day = max(r.timestamp for r in state.attendance).date()
    start = datetime.datetime.combine(day, datetime.time())
    end = start + datetime.timedelta(hours=23, minutes=59, seconds=59)
    lost = db(
        lambda: RawAttendance.objects.filter(
            timestamp__gte=start.replace(tzinfo=UTC), timestamp__lte=end.replace(tzinfo=UTC)
        ).delete()[0]
    )
    assert lost > 0

    commands = {
        kind: db(
            lambda kind=kind, values=values: adms.device_command_queue(
                device=device, command=adms.command_text(kind, **values)
            )
        )
        for kind, values in (
            ("info", {}),
            ("user_update", {"user_id": "7777", "name": "Nova Pessoa", "card": 123456}),
            ("user_delete", {"user_id": leaving}),
            ("reupload", {"start": start, "end": end}),
            ("reboot", {}),
        )
    }

    def answered():
        return not DeviceCommand.objects.filter(answered_at__isnull=True).exists()

    assert wait_for(answered)
    assert wait_for(lambda: clock.stats.handshakes > handshakes and clock.connected)
    clock.stop()
    states = dict(DeviceCommand.objects.values_list("pk", "state"))
    assert states == {command.pk: "done" for command in commands.values()}
    # Carried out on the clock's own data.
    added = state.user_by_user_id("7777")
    assert added is not None and added.name == "Nova Pessoa" and added.card == 123456
    assert state.user_by_user_id(leaving) is None
    assert RawAttendance.objects.count() == 400
    # INFO's options reached the device; the reboot made the clock shake hands again.
    device.refresh_from_db()
    assert device.push_options["~DeviceName"] == state.device_name
    assert device.push_options["TransactionCount"] == "400"
    assert clock.stats.reboots == 1
    # Every result was posted once: nothing waits on the clock.
    assert clock._pending_results == []


def test_a_punch_both_polled_and_pushed_is_stored_once(push_clock, zk_emulator):
    state = small_state()
    emulator = zk_emulator(state)
    device = approved_device(ip_address="127.0.0.1", port=emulator.port)
    result = device_poll(device=device)
    assert not result.error
    assert RawAttendance.objects.count() == 400

    # The same clock also pushes: one device, the same punches.
    clock = push_clock(state)
    assert wait_for(lambda: clock.stats.punches_acknowledged == 400)
    assert db(Device.objects.count) == 1
    assert db(RawAttendance.objects.count) == 400
    # A new punch, pushed at once, then polled: still one row.
    record = clock.punch(state.users[0].user_id)
    assert wait_for(lambda: RawAttendance.objects.count() == 401)
    clock.stop()
    device_poll(device=Device.objects.get(pk=device.pk), force_full=True)
    assert RawAttendance.objects.count() == 401
    stored = RawAttendance.objects.get(
        user_id=record.user_id, timestamp=max(stored_instants(device))
    )
    assert stored.timestamp == record.timestamp.replace(tzinfo=UTC)


def test_the_clock_takes_its_time_from_the_date_header_and_timezone_and_live_punches_go_at_once(
    push_clock,
):
    device = approved_device(timezone="Asia/Kolkata")
    state = small_state(punches=10)
    # The clock runs an hour and a quarter slow before it meets the server.
    clock = push_clock(state, clock_offset=-4500, live_interval=0.5)
    assert wait_for(lambda: clock.connected)
    kolkata = datetime.datetime.now(ZoneInfo("Asia/Kolkata")).replace(tzinfo=None)
    assert abs((clock.device_now() - kolkata).total_seconds()) < 5
    assert clock.timezone == datetime.timedelta(minutes=330)

    assert wait_for(lambda: RawAttendance.objects.filter(device=device).count() >= 14)
    clock.stop()
    live = RawAttendance.objects.filter(
        timestamp__gt=datetime.datetime.now(UTC) - datetime.timedelta(minutes=1)
    )
    assert live.count() >= 3
    # Stored at the right UTC instant: within seconds of now, not 5.5 h off.
    for row in live:
        assert abs((row.timestamp - datetime.datetime.now(UTC)).total_seconds()) < 30


def test_a_clock_that_is_down_makes_no_request_and_catches_up_afterwards(push_clock):
    approved_device()
    state = small_state()
    clock = push_clock(state, down=[(0, 2.0)])
    time.sleep(1.0)
    assert clock.stats.requests == 0
    clock.punch(state.users[0].user_id)
    assert clock.stats.requests == 0
    assert wait_for(lambda: RawAttendance.objects.count() == 401)
    clock.stop()
    assert stored_instants(Device.objects.get()) == expected_instants(state, "UTC")


def test_down_windows_are_parsed_and_bad_ones_say_what_is_wrong():
    assert parse_down_windows("10:20, 40:45") == [(10.0, 20.0), (40.0, 45.0)]
    for bad in ("10", "20:10", "a:b", "-1:5"):
        with pytest.raises(ValueError, match="START:END|END must come after"):
            parse_down_windows(bad)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--push", "ftp://127.0.0.1:1"], "http://"),
        (["--push", "http://127.0.0.1:1", "--push-drop-rate", "1.5"], "drop"),
        (["--push", "http://127.0.0.1:1", "--push-down", "9:3"], "--push-down"),
        (["--push-down", "1:3"], "--push"),
    ],
)
def test_push_options_that_cannot_work_are_refused_with_a_clear_error(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("zk_emulator", *args)


def test_a_backlog_across_a_dst_change_is_stored_at_the_right_utc_instants(push_clock):
    device = approved_device(timezone="Europe/Lisbon")
    state = small_state(punches=0)
    # Lisbon: WET (UTC+0) until 01:00 on 29 March 2026, then WEST (UTC+1).
    for moment in ("2026-03-28 09:00:00", "2026-03-29 00:30:00", "2026-03-29 09:00:00"):
        state.add_punch(user_id="1001", timestamp=datetime.datetime.fromisoformat(moment))
    clock = push_clock(state)
    assert wait_for(lambda: RawAttendance.objects.count() == 3)
    clock.stop()
    assert sorted(stored_instants(device)) == [
        datetime.datetime(2026, 3, 28, 9, 0, tzinfo=UTC),
        datetime.datetime(2026, 3, 29, 0, 30, tzinfo=UTC),
        datetime.datetime(2026, 3, 29, 8, 0, tzinfo=UTC),
    ]
    # The clock was given Lisbon's offset as it is now, in whole hours.
    now_offset = datetime.datetime.now(ZoneInfo("Europe/Lisbon")).utcoffset()
    assert clock.timezone == now_offset and clock.options["TimeZone"] in ("0", "1")
