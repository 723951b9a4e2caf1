"""The raw punch export (CRM_PUNCHES_URL), against the fake CRM over loopback."""

import datetime
import json
import threading

import pytest
import time_machine
from django.core.management import call_command

from core.crm import crm_punch_stats, crm_punch_sync
from core.models import DeliveryLog, ProcessingState, PunchDelivery, RawAttendance
from core.tests.factories import DeviceFactory, EmployeeFactory

pytestmark = pytest.mark.django_db(transaction=True)

UTC = datetime.UTC
M = datetime.timedelta(minutes=1)
START = datetime.datetime(2026, 11, 2, 9, tzinfo=UTC)


@pytest.fixture
def crm(fake_crm, settings):
    """A fake CRM wanting a token and a signature; the punch export pointed at it."""
    server = fake_crm(token="secret-token", signing_secret="shh")
    settings.CRM_PUNCHES_URL = server.punches_url
    settings.CRM_API_TOKEN = "secret-token"
    settings.CRM_SIGNING_SECRET = "shh"
    settings.CRM_RETRY_BACKOFF_SECONDS = 0.001
    settings.CRM_READ_TIMEOUT_SECONDS = 5
    settings.CRM_BATCH_SIZE = 20
    return server


@pytest.fixture
def door():
    return DeviceFactory(
        name="Front door",
        serial_number="CKJ1234",
        ip_address="127.0.0.1",
        port=4370,
        timezone="Europe/Lisbon",
    )


def punch(device, user_id: str, when: str, *, state: int = 0, **fields) -> RawAttendance:
    """A punch at a UTC time 'YYYY-MM-DD HH:MM'."""
    moment = datetime.datetime.fromisoformat(when).replace(tzinfo=UTC)
    return RawAttendance.objects.create(
        device=device, user_id=user_id, timestamp=moment, punch_state=state, **fields
    )


def sync_at(moment: datetime.datetime):
    with time_machine.travel(moment, tick=False):
        return crm_punch_sync()


def test_punches_go_in_the_punch_contract_one_device_per_request(crm, door):
    EmployeeFactory(user_id="1001", name="Ana Costa")
    tokyo = DeviceFactory(
        name="Tokyo gate", serial_number="T-9", ip_address="127.0.0.2", timezone="Asia/Tokyo"
    )
    # Lisbon is UTC+0 in November; Tokyo UTC+9, so 23:30 UTC is the next day there.
    for state, when in enumerate(["08:00", "12:00", "12:05", "13:00", "18:00", "19:00"]):
        punch(door, "1001", f"2026-11-02 {when}", state=state)
    punch(door, "1001", "2026-11-02 20:00", state=255)
    punch(tokyo, "2002", "2026-11-02 23:30", state=1)
    with time_machine.travel(START, tick=False):
        result = crm_punch_sync()
    assert (result.sent, result.failed, result.rejected) == (8, 0, 0)
    assert (result.registered, result.requests) == (8, 2)
    held = crm.punches()
    assert held[("Front door", "1001", "2026-11-02T08:00:00+00:00")] == {
        "employee_id": "1001",
        "employee_name": "Ana Costa",
        "timestamp": "2026-11-02T08:00:00+00:00",
        "date": "2026-11-02",
        "time": "08:00:00",
        "punch_type": "Check In",
        "device": "Front door",
        "device_info": {
            "name": "Front door",
            "serial_number": "CKJ1234",
            "ip": "127.0.0.1",
            "port": 4370,
            "export_time": START.isoformat(),
        },
    }
    types = [record["punch_type"] for key, record in sorted(held.items()) if key[0] == "Front door"]
    assert types == [
        "Check In",
        "Check Out",
        "Break Out",
        "Break In",
        "Overtime In",
        "Overtime Out",
        "Undefined",
    ]
    tokyo_punch = held[("Tokyo gate", "2002", "2026-11-03T08:30:00+09:00")]
    assert (tokyo_punch["date"], tokyo_punch["time"], tokyo_punch["employee_name"]) == (
        "2026-11-03",
        "08:30:00",
        "",
    )
    assert tokyo_punch["device_info"]["serial_number"] == "T-9"
    assert crm.state.stats.punches_duplicated == 0
    assert set(PunchDelivery.objects.values_list("sync_state", flat=True)) == {"synced"}
    log = DeliveryLog.objects.filter(destination=crm.punches_url)
    assert log.count() == 2
    assert "1001@2026-11-02T08:00:00+00:00" in log.get(records=7).external_ids


def test_a_wrong_signing_secret_is_refused_and_changes_nothing(crm, door, settings):
    punch(door, "1001", "2026-11-02 08:00")
    settings.CRM_SIGNING_SECRET = "not-the-secret"
    result = sync_at(START)
    assert result.credentials_refused and result.sent == 0
    assert crm.state.stats.unauthorized == 1 and crm.punches() == {}
    assert PunchDelivery.objects.get().sync_state == "pending"
    settings.CRM_SIGNING_SECRET = "shh"  # the secret the fake CRM checks the signature with
    assert sync_at(START + M).sent == 1


def test_a_500_then_success_sends_the_batch_again_under_the_same_key(crm, door):
    for minute in range(5):
        punch(door, "1001", f"2026-11-02 08:0{minute}")
    crm.script.extend(["500"])
    result = sync_at(START)
    assert (result.sent, result.requests) == (5, 2)
    attempts = list(
        DeliveryLog.objects.order_by("pk").values_list("idempotency_key", "status_code")
    )
    assert attempts == [(attempts[0][0], 500), (attempts[0][0], 200)]
    assert crm.keys_seen() == [attempts[0][0]]
    assert len(crm.punches()) == 5


def test_a_lost_answer_is_sent_again_under_its_key_and_the_punch_is_held_once(crm, door):
    punch(door, "1001", "2026-11-02 08:00")
    crm.script.extend(["drop-after"])
    result = sync_at(START)
    assert (result.sent, result.requests) == (1, 2)
    assert crm.state.stats.replays == 1
    assert crm.state.stats.punches_duplicated == 0


def test_each_punch_goes_once_across_runs(crm, door):
    punch(door, "1001", "2026-11-02 08:00")
    punch(door, "1002", "2026-11-02 08:01")
    assert sync_at(START).sent == 2
    punch(door, "1001", "2026-11-02 17:00")
    assert sync_at(START + M).sent == 1
    # Within the margin the last runs' punches are read again, and skipped.
    assert sync_at(START + 2 * M).sent == 0
    later = START + datetime.timedelta(hours=1)
    assert sync_at(later).sent == 0
    assert sync_at(later + M).sent == 0
    assert len(crm.punches()) == 3
    stats = crm.state.stats
    assert (stats.punches_received, stats.punches_duplicated) == (3, 0)
    # Delivered punches no run reads again lose their delivery row.
    assert PunchDelivery.objects.count() == 0


def test_a_punch_whose_poll_commits_after_a_later_polls_is_still_sent_once(crm, door):
    with time_machine.travel(START, tick=False):
        punch(door, "1001", "2026-11-02 08:30", id=1000)
    assert sync_at(START).sent == 1
    # A poll that wrote its rows a minute before that run, and committed after it.
    with time_machine.travel(START - M, tick=False):
        punch(door, "1002", "2026-11-02 08:00", id=500)
    assert sync_at(START + 5 * M).sent == 1
    assert ("Front door", "1002", "2026-11-02T08:00:00+00:00") in crm.punches()
    # Once the margin has passed, the runs read only what is new.
    past = START + datetime.timedelta(hours=1)
    assert sync_at(past).sent == 0
    assert sync_at(past + M).sent == 0
    assert crm.state.stats.punches_duplicated == 0
    assert len(crm.punches()) == 2
    state = ProcessingState.objects.get(name="crm_punches")
    assert state.last_raw_id == 1000


def test_a_poll_committing_while_a_run_reads_is_sent_once_by_a_later_run(crm, door):
    # The late poll's id is below the run's highest, and its commit comes after
    # the run registered: the next run, within the margin, finds it.
    with time_machine.travel(START, tick=False):
        punch(door, "1001", "2026-11-02 08:30", id=2000)
        assert crm_punch_sync().sent == 1
    with time_machine.travel(START + 10 * M, tick=False):
        punch(door, "1003", "2026-11-02 08:10", id=1500)  # written at START, committed now
        RawAttendance.objects.filter(pk=1500).update(received_at=START)
    assert sync_at(START + 14 * M).sent == 1
    assert sync_at(START + 40 * M).sent == 0
    assert len(crm.punches()) == 2 and crm.state.stats.punches_duplicated == 0


def test_punches_before_crm_sync_from_on_their_device_are_never_sent(crm, door, settings):
    tokyo = DeviceFactory(name="Tokyo gate", ip_address="127.0.0.2", timezone="Asia/Tokyo")
    settings.CRM_SYNC_FROM = datetime.date(2026, 11, 3)
    punch(door, "1001", "2026-11-02 23:59")  # 2 November in Lisbon: too old
    punch(door, "1001", "2026-11-03 00:00")
    punch(tokyo, "2002", "2026-11-02 15:30")  # 3 November 00:30 in Tokyo
    punch(tokyo, "2002", "2026-11-02 14:59")  # 2 November 23:59 in Tokyo: too old
    assert sync_at(START).sent == 2
    assert sorted(key[2] for key in crm.punches()) == [
        "2026-11-03T00:00:00+00:00",
        "2026-11-03T00:30:00+09:00",
    ]
    # Read again within the margin, and still not registered.
    assert sync_at(START + M).sent == 0
    assert PunchDelivery.objects.count() == 2
    assert sync_at(START + datetime.timedelta(hours=1)).sent == 0
    # Once the watermark has passed them, not even lowering the cut-off sends them.
    settings.CRM_SYNC_FROM = None
    assert sync_at(START + datetime.timedelta(hours=1, minutes=1)).sent == 0


def test_a_suspect_punch_is_held_back_until_its_verdict_is_cleared(crm, door):
    good = punch(door, "1001", "2026-11-02 08:00")
    bad = punch(door, "1001", "2030-01-01 08:00", is_suspect=True, suspect_reason="future")
    assert sync_at(START).sent == 1
    assert PunchDelivery.objects.get(pk=bad.pk).sync_state == "held"
    assert sync_at(START + M).sent == 0
    RawAttendance.objects.filter(pk=bad.pk).update(is_suspect=False, suspect_override=False)
    assert sync_at(START + 2 * M).sent == 1
    assert len(crm.punches()) == 2
    assert PunchDelivery.objects.get(pk=good.pk).sync_state == "synced"


def test_two_punch_runs_at_once_send_each_punch_once(crm, door, settings):
    from django.db import connection

    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip("needs PostgreSQL or a SQLite file, not the in-memory test database")
    crm.latency_ms = 20
    settings.CRM_BATCH_SIZE = 10
    RawAttendance.objects.bulk_create(
        RawAttendance(
            device=door,
            user_id=str(1000 + n % 20),
            timestamp=datetime.datetime(2026, 11, 2, 8, tzinfo=UTC) + n * M,
        )
        for n in range(150)
    )
    results, errors = [], []

    def run():
        try:
            results.append(crm_punch_sync())
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sum(result.sent for result in results) == 150
    assert len(crm.punches()) == 150 and crm.state.stats.punches_duplicated == 0


def test_sync_to_crm_and_test_crm_stats_report_punches(crm, door, settings, capsys):
    settings.CRM_API_URL = ""
    punch(door, "1001", "2026-11-02 08:00")
    punch(door, "1001", "2026-11-02 17:00")
    with time_machine.travel(START, tick=False):
        call_command("sync_to_crm")
    out = capsys.readouterr().out
    assert "raw punches: sent 2, failed 0, rejected 0 in 1 batches, 1 requests" in out
    assert "raw punches: 2 punches new since the last run" in out
    assert crm_punch_stats().by_state["synced"] == 2
    call_command("test_crm", stats=True)
    out = capsys.readouterr().out
    assert "raw punches: pending 0, synced 2, failed 0, rejected 0, held 0; in flight 0" in out
    assert f"{crm.punches_url}: reachable, credentials accepted" in out


def test_a_refused_batch_goes_punch_by_punch_and_only_the_bad_one_is_rejected(crm, door):
    crm.reject_user_ids = {"1003"}
    for n in range(4):
        punch(door, str(1001 + n), f"2026-11-02 08:0{n}")
    result = sync_at(START)
    assert (result.sent, result.rejected, result.requests) == (3, 1, 5)
    rejected = PunchDelivery.objects.get(sync_state="rejected")
    assert rejected.raw.user_id == "1003" and rejected.crm_status == 422
    assert "not known to this CRM" in rejected.crm_response
    assert {key[1] for key in crm.punches()} == {"1001", "1002", "1004"}
    # Not retried until someone acts on it.
    assert sync_at(START + M).requests == 0


def test_a_crash_after_the_post_resends_the_punches_under_the_same_key(crm, door):
    from core.crm import PUNCHES, JsonContractDestination, _claim, _Config, _punches_register

    punch(door, "1001", "2026-11-02 08:00")
    punch(door, "1001", "2026-11-02 17:00")
    with time_machine.travel(START, tick=False):
        _punches_register(sync_from=None)
        config = _Config.load(sleep=lambda seconds: None, batch_size=None)
        ((key, rows, records),) = _claim(limit=10, config=config, queue=PUNCHES)
        # The run POSTs, the CRM stores the batch, and the run dies before booking.
        destination = JsonContractDestination.from_settings(punches=True)
        assert (
            destination.send(records=records, key=key, envelope=PUNCHES.envelope(rows)).status
            == 200
        )
        destination.close()
    assert sync_at(START + M).sent == 0  # its lease is not over: nobody takes it
    result = sync_at(START + config.lease + 2 * M)
    assert (result.sent, result.replayed_batches) == (2, 1)
    assert crm.keys_seen() == [key, key]
    assert crm.state.stats.replays == 1 and crm.state.stats.punches_duplicated == 0


def test_sync_to_crm_dry_run_previews_the_first_punch_request_and_changes_nothing(
    crm, door, settings, capsys
):
    settings.CRM_API_URL = ""
    tokyo = DeviceFactory(name="Tokyo gate", ip_address="127.0.0.2", timezone="Asia/Tokyo")
    punch(tokyo, "2002", "2026-11-02 07:00")
    punch(door, "1001", "2026-11-02 08:00")
    punch(door, "1001", "2030-01-01 08:00", is_suspect=True, suspect_reason="future")
    with time_machine.travel(START, tick=False):
        call_command("sync_to_crm", dry_run=True)
    out = capsys.readouterr().out
    assert out.startswith(f"POST {crm.punches_url}")
    assert "Authorization: Token ****" in out and "secret-token" not in out
    body = json.loads(out[out.index("{") :])
    # One device per request: the lowest device id, and no suspect punch.
    assert body["device_info"]["name"] == "Front door"
    assert [(r["employee_id"], r["timestamp"]) for r in body["records"]] == [
        ("1001", "2026-11-02T08:00:00+00:00")
    ]
    assert crm.state.stats.requests == 0
    assert not PunchDelivery.objects.exists()
    assert not ProcessingState.objects.filter(name="crm_punches").exists()

    # Registered and due, the same punch is what the preview shows.
    with time_machine.travel(START, tick=False):
        from core.crm import _punches_register

        _punches_register(sync_from=None)
        before = list(PunchDelivery.objects.order_by("pk").values())
        call_command("sync_to_crm", dry_run=True)
    body = json.loads(capsys.readouterr().out.split("\n\n", 1)[1])
    assert [r["timestamp"] for r in body["records"]] == ["2026-11-02T08:00:00+00:00"]
    assert list(PunchDelivery.objects.order_by("pk").values()) == before


def test_sync_to_crm_dry_run_says_when_no_punch_would_go(crm, door, capsys):
    call_command("sync_to_crm", dry_run=True)
    assert "No raw punch is due" in capsys.readouterr().out


def test_a_registration_reads_in_chunks_and_reports_its_progress(crm, door, monkeypatch):
    monkeypatch.setattr("core.crm.REGISTER_CHUNK_IDS", 2)
    for minute in range(5):
        punch(door, "1001", f"2026-11-02 08:0{minute}")
    seen = []
    with time_machine.travel(START, tick=False):
        result = crm_punch_sync(register_progress=lambda done, total: seen.append((done, total)))
    assert (result.registered, result.sent) == (5, 5)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert len(crm.punches()) == 5


def test_sync_to_crm_shows_the_registration_progress_on_a_terminal(
    crm, door, settings, monkeypatch
):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    settings.CRM_API_URL = ""
    punch(door, "1001", "2026-11-02 08:00")
    punch(door, "1001", "2026-11-02 17:00")
    terminal, pipe, out = Terminal(), io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", terminal)
    with time_machine.travel(START, tick=False):
        call_command("sync_to_crm", stdout=out)
    assert "raw punches: registering" in terminal.getvalue()
    punch(door, "1001", "2026-11-02 18:00")
    monkeypatch.setattr("sys.stderr", pipe)
    with time_machine.travel(START + M, tick=False):
        call_command("sync_to_crm", stdout=out)
    assert pipe.getvalue() == "" and "raw punches: sent 1" in out.getvalue()
